"""plugins/nvidia/scripts/hardware_check.py runs end to end against the fake NVML, as it will on a GPU node."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from fakenvml import FakeNode, gpu_uuid

SCRIPT = Path(__file__).resolve().parents[2] / "plugins/nvidia/scripts/hardware_check.py"


def test_hardware_check_script_against_the_fake_library(host):
    host.apply(FakeNode.with_gpus(2))
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--seconds", "1.5", "--pass-device-specs",
         "--nvml-library", str(host.library), "--sysfs-root", str(host.sys), "--proc-root", str(host.proc),
         "--dev-root", str(host.dev_root)],
        capture_output=True, text=True, timeout=90, env=dict(os.environ),
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = result.stdout
    discover = json.loads(out.split("=== dpkit discover nvidia ===\n", 1)[1].split("\n===", 1)[0])
    assert [d["id"] for d in discover["resources"][0]["devices"]] == [gpu_uuid(0), gpu_uuid(1)]
    assert "[ok  ] NVIDIA driver loaded" in out
    assert "heartbeats=" in out and "alive=True" in out
    for strategy in ("envvar", "volume-mounts", "cdi-annotations", "cdi-cri"):
        section = out.split(f"deviceListStrategy={strategy} ===\n", 1)[1].split("\n===", 1)[0]
        response = json.loads(section)["response"]
        if strategy == "envvar":
            assert response["envs"]["NVIDIA_VISIBLE_DEVICES"] in (gpu_uuid(0), gpu_uuid(1))
            assert "/dev/nvidiactl" in [d["container_path"] for d in response["devices"]]
        elif strategy == "volume-mounts":
            assert response["mounts"][0]["container_path"].startswith("/var/run/nvidia-container-devices/GPU-")
        elif strategy == "cdi-annotations":
            assert next(iter(response["annotations"])).startswith("cdi.k8s.io/nvidia-device-plugin_")
        else:
            assert response["cdi_devices"][0].startswith("nvidia.com/gpu=GPU-")
