"""The kubelet emulator in a process of its own, so its stream parsing competes with no measuring client.

``python bench/kubelet_proc.py PLUGIN_DIR POD_RESOURCES_SOCKET`` serves ``kubelet.sock`` (and the
pod-resources API), prints ``ready``, then answers one stdin line at a time:
``wait RESOURCE COUNT TIMEOUT`` -> ``ok T`` once the resource is registered and its list holds
COUNT devices (T: ``time.monotonic()`` when seen) or ``timeout``. EOF on stdin stops it.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from dpkit.core.tools.kubelet import Kubelet


def wait_registered(kubelet: Kubelet, resource: str, count: int, timeout: float) -> float | None:
    """When the kubelet first held ``count`` devices of a registered ``resource``; None on timeout."""
    seen: list[float] = []

    def registered(k: Kubelet) -> bool:
        if k.registered(resource) and k.capacity(resource) == count:
            seen.append(time.monotonic())
            return True
        return False

    return seen[0] if kubelet.wait_for(registered, timeout) else None


def main() -> int:
    kubelet = Kubelet(Path(sys.argv[1]), pod_resources_socket=Path(sys.argv[2])).start()
    print("ready", flush=True)
    try:
        for line in sys.stdin:
            _, resource, count, timeout = line.split()
            seen = wait_registered(kubelet, resource, int(count), float(timeout))
            print("timeout" if seen is None else f"ok {seen!r}", flush=True)
    finally:
        kubelet.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
