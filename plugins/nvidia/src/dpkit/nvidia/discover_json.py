"""The discovery subprocess: read the node through NVML once, print it as JSON, exit.

``python -m dpkit.nvidia.discover_json`` takes a request on stdin (library, sysfs root, per-call
deadline, whether to read the PCIe topology, and the serving process's memory of earlier
readings) and prints ``{"node": ..., "memory": ...}`` or
``{"error": ...}``. It is the only place discovery loads the driver library, so a hung driver
call stalls this process, which the serving process kills at its deadline, and never the
kubelet path (:mod:`dpkit.nvidia.remote`).
"""

from __future__ import annotations

import json
import os
import signal
import sys
from typing import Any

from dpkit.core import setup_logging
from dpkit.nvidia import nvml
from dpkit.nvidia.gpus import NodeReader
from dpkit.nvidia.guard import Guard, Hung
from dpkit.nvidia.nodeinfo import NvmlUnavailable, node_to_json


def discover(request: dict[str, Any]) -> dict[str, Any]:
    """One reading of the node, or the error that stopped it, as a JSON-ready dict."""
    reader = NodeReader(str(request["library"]), str(request["sysfs_root"]), Guard(float(request["nvml_timeout"])))
    reader.restore(request.get("memory", {}))
    try:
        node = reader.read(topology=bool(request.get("topology", True)))
    except NvmlUnavailable as exc:
        return {"error": "unavailable", "kind": exc.kind, "message": str(exc)}
    except Hung as exc:
        return {"error": "hung", "key": exc.key, "seconds": exc.seconds}
    except nvml.NVMLError as exc:
        return {"error": "nvml", "name": nvml.error_name(exc)}
    finally:
        reader.close()
    return {"node": node_to_json(node), "memory": reader.memory()}


def main() -> None:
    # the serving process blocks these for its threads and a child inherits the mask
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM, signal.SIGINT, signal.SIGHUP})
    setup_logging(os.environ.get("DPKIT_LOG_FORMAT", "human"), os.environ.get("DPKIT_LOG_LEVEL", "info"))
    try:
        reply = discover(json.loads(sys.stdin.read()))
    except Exception as exc:  # anything else is reported, not a traceback the parent cannot parse
        reply = {"error": "failed", "message": f"{type(exc).__name__}: {exc}"}
    sys.stdout.write(json.dumps(reply))
    sys.stdout.flush()
    # A call stuck in the driver holds a thread that a normal exit would wait on at shutdown
    # (or nvmlShutdown would hang behind it): leave at once, the answer is written.
    os._exit(0)


if __name__ == "__main__":
    main()
