"""Run a manager with a beating probe as PID 1 (started under `unshare --pid --fork`); print JSON."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from scripted_vendor import RES, ProbedVendor

from dpkit.core.engine.manager import Manager
from dpkit.core.support.config import Config
from dpkit.core.tools.kubelet import Kubelet
from dpkit.core.vendorapi.vendor import Probe


def main(work: Path) -> None:
    kubelet = Kubelet(work / "dp").start()
    probe = Probe("beats", "scripted_vendor:hanging_probe", {"hang_flag": str(work / "never")}, heartbeat_timeout=1.0)
    manager = Manager(ProbedVendor(probe=probe), Config(plugin_dir=str(work / "dp"), state_dir=str(work / "st")))
    manager.start()
    try:
        kubelet.wait_for(lambda k: k.allocatable(RES) == 4, 10)
        time.sleep(3.0)  # three heartbeat timeouts: a probe that quit would have been restarted by now
        state = manager.probes.probes["beats"] if manager.probes else None
        print(json.dumps({"pid": os.getpid(), "allocatable": kubelet.allocatable(RES),
                          "restarts": state.restarts if state else -1, "beats": state.beats if state else 0}))
    finally:
        manager.stop()
        kubelet.stop()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
