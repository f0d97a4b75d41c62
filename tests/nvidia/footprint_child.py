"""Run in a fresh interpreter by test_nvidia_footprint.py: a whole NVIDIA plugin (Manager, emulated
kubelet, real probe process) on the fake NVML, then report what the serving process holds.

``python footprint_child.py OUT_JSON ROOT LIBRARY``: writes what was seen to OUT_JSON. A fresh
process because the test session itself loads pynvml (the unit tests drive it directly).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # fakenvml

from fakenvml import FakeHost, FakeNode, gpu_uuid

from dpkit.core.engine.manager import Manager
from dpkit.core.support.config import Config
from dpkit.core.tools.kubelet import Kubelet
from dpkit.nvidia.vendor import NvidiaVendor

GPU = "nvidia.com/gpu"
#: modules that load or drive NVML: the discovery subprocess and the probe import them, never the server
NVML_SIDE = ("pynvml", "dpkit.nvidia.nvml", "dpkit.nvidia.gpus", "dpkit.nvidia.health", "dpkit.nvidia.discover_json")


def rss_kb(pid: int | str) -> int:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return int(next(line.split()[1] for line in lines if line.startswith("VmRSS:")))


def health(kubelet: Kubelet, device_id: str) -> str | None:
    state = kubelet.devices(GPU).get(device_id)
    return state.health if state else None


def main(out: str, root: str, library: str) -> None:
    host = FakeHost(Path(root) / "host", Path(library))
    host.root.mkdir(parents=True)
    node = host.apply(FakeNode.with_gpus(2))
    kubelet = Kubelet(Path(root) / "dp", pod_resources_socket=Path(root) / "pr" / "kubelet.sock").start()
    config = Config(plugin_dir=str(Path(root) / "dp"), state_dir=str(Path(root) / "st"),
                    pod_resources_socket=str(Path(root) / "pr" / "kubelet.sock"))
    manager = Manager(NvidiaVendor(host.vendor_config(), environ={}), config)
    seen: dict[str, Any] = {}
    manager.start()
    try:
        seen["served"] = kubelet.wait_for(lambda k: k.allocatable(GPU) == 2, 20)
        probe = manager.probes.probes["nvml-health"]
        seen["probe_beats"] = kubelet.wait_for(lambda k: probe.beats > 2, 20)
        node.xid(1, 79)
        seen["xid_unhealthy"] = kubelet.wait_for(lambda k: health(k, gpu_uuid(1)) == "Unhealthy", 20)
        seen["other_healthy"] = health(kubelet, gpu_uuid(0)) == "Healthy"
        seen["pynvml_loaded"] = "pynvml" in sys.modules
        seen["nvml_modules"] = sorted(m for m in sys.modules if m.startswith(NVML_SIDE))
        seen["nvml_mapped"] = [line.split()[-1] for line in Path("/proc/self/maps").read_text().splitlines()
                               if "libnvidia-ml" in line]
        seen["serving_rss_kb"] = rss_kb("self")
        seen["probe_rss_kb"] = rss_kb(probe.process.pid) if probe.process else None
        probe_maps = Path(f"/proc/{probe.process.pid}/maps").read_text() if probe.process else ""
        seen["probe_maps_nvml"] = "libnvidia-ml" in probe_maps
    finally:
        manager.stop()
        kubelet.stop()
    Path(out).write_text(json.dumps(seen))


if __name__ == "__main__":
    main(*sys.argv[1:4])
