"""Child process for test_sfc_rtnl.py, started by ``unshare --net`` (not collected by pytest).

It runs in a network namespace of its own, so the link it creates and toggles exists nowhere
else and vanishes with the process; no real interface is touched. It creates ``dpk0`` (a dummy
link, or a veth pair where the dummy module is missing), opens the monitor the vendor uses,
toggles the link up and down from a second thread while the main thread sits in
``UeventMonitor.wait(5 s)``, and prints one JSON object: the wake latencies, or ``skip``.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from typing import Any

LINK = "dpk0"
TIMEOUT = 5.0
TOGGLES = ("up", "down", "up", "down")


def ip(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=10, check=False)


def report(result: dict[str, Any]) -> None:
    print(json.dumps(result))
    sys.stdout.flush()


def make_link() -> str | None:
    if ip("link", "add", LINK, "type", "dummy").returncode == 0:
        return "dummy"
    if ip("link", "add", LINK, "type", "veth", "peer", "name", "dpk1").returncode == 0:
        return "veth"
    return None


def toggle(state: str, started: list[float], fired: threading.Event) -> None:
    """Change the link once the main thread is inside ``wait()``; note when (just before ``ip``)."""
    time.sleep(0.2)
    started[0] = time.perf_counter()
    fired.set()
    result = ip("link", "set", LINK, state)
    if result.returncode != 0:
        print(f"ip link set {state}: {result.stderr}", file=sys.stderr)


def main() -> None:
    kind = make_link()
    if kind is None:
        report({"skip": "cannot create a dummy or veth link in the new network namespace"})
        return
    try:
        import pyudev

        from dpkit.sfc.udev import UeventMonitor

        context = pyudev.Context()
        # the vendor's monitor ignores software links (pod veths); this one counts the test link
        monitor = UeventMonitor(context, "kernel", link_kinds={kind})
        default = UeventMonitor(context, "kernel")
    except (ImportError, OSError) as exc:
        report({"skip": f"no udev monitor here: {exc}"})
        return
    if monitor.links_error:
        report({"skip": monitor.links_error})
        return
    stop = threading.Event()
    latencies, seen = [], []
    for state in TOGGLES:
        for _ in range(10):  # let messages from the last toggle (linkwatch runs later) pass
            if not monitor.wait(0.3, stop):
                break
        fired = threading.Event()
        started = [0.0]
        thread = threading.Thread(target=toggle, args=(state, started, fired))
        called = time.perf_counter()
        thread.start()
        events = monitor.wait(TIMEOUT, stop)
        woke = time.perf_counter()
        thread.join(15)
        seen.append(events)
        latencies.append({"state": state, "woke_after_s": round(woke - called, 4), "fired": fired.is_set(),
                          "latency_ms": round((woke - started[0]) * 1000, 2) if fired.is_set() else None})
    # the same messages, through a monitor as the vendor opens it: software links wake nothing
    ignored = default.wait(0.5, stop)
    monitor.close()
    default.close()
    report({"kind": kind, "timeout_s": TIMEOUT, "latencies": latencies, "events": seen, "default_monitor": ignored})


if __name__ == "__main__":
    main()
