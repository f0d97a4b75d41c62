#!/usr/bin/env python3
"""Check the NVIDIA vendor on a real GPU node: discovery, doctor, the health probe, and allocation.

Run from a checkout: ``python plugins/nvidia/scripts/hardware_check.py``. Only dpkit-core, this
package and their dependencies are needed (they are taken from the checkout when not installed).
Everything runs in a temp dir with dpkit's kubelet emulator: no real kubelet, nothing written
outside the temp dir, and only read-only NVML calls; the GPU is never reset or reconfigured.

Prints, in order: ``dpkit discover`` (JSON), ``dpkit doctor`` checks, a health-probe run of
``--seconds`` (heartbeats and health events), and the container spec the kubelet gets for one
GPU under each device-list strategy. Exits 0 when every step ran and found at least one GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[3]
try:
    import dpkit.core
    import dpkit.nvidia  # noqa: F401
except ImportError:  # a plain checkout: use the sources, and hand them to the probe process too
    sources = [str(REPO / "core/src"), str(REPO / "plugins/nvidia/src")]
    sys.path[:0] = sources
    os.environ["PYTHONPATH"] = os.pathsep.join([*sources, os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)

from dpkit.core.engine.manager import Manager  # noqa: E402
from dpkit.core.support.config import Config  # noqa: E402
from dpkit.core.support.logs import setup_logging  # noqa: E402
from dpkit.core.tools.discovery import explain  # noqa: E402
from dpkit.core.tools.kubelet import Kubelet  # noqa: E402
from dpkit.nvidia.vendor import NvidiaVendor  # noqa: E402

STRATEGIES = ("envvar", "volume-mounts", "cdi-annotations", "cdi-cri")


def heading(title: str) -> None:
    print(f"\n=== {title} ===", flush=True)


def vendor_config(args: argparse.Namespace, work: Path, strategy: str = "envvar") -> dict[str, Any]:
    flags: dict[str, Any] = {"plugin": {"deviceListStrategy": strategy, "passDeviceSpecs": args.pass_device_specs}}
    if args.dev_root:
        flags["nvidiaDevRoot"] = args.dev_root
    config: dict[str, Any] = {"config": {"version": "v1", "flags": flags},
                              "health_state_file": str(work / "nvidia-health.json"),
                              "health_interval": 1.0, "poll_interval": 5.0}
    for key in ("nvml_library", "sysfs_root", "proc_root"):
        if getattr(args, key):
            config[key] = getattr(args, key)
    return config


def run_manager(config: dict[str, Any], work: Path, name: str) -> tuple[Kubelet, Manager]:
    root = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=work))
    kubelet = Kubelet(root / "dp").start()
    manager = Manager(NvidiaVendor(config), Config(plugin_dir=str(root / "dp"), state_dir=str(root / "st"),
                                                   probe_heartbeat_timeout=20.0))
    manager.start()
    return kubelet, manager


def response_dict(response: Any) -> dict[str, Any]:
    return {
        "envs": dict(response.envs),
        "mounts": [{"container_path": m.container_path, "host_path": m.host_path, "read_only": m.read_only}
                   for m in response.mounts],
        "devices": [{"container_path": d.container_path, "host_path": d.host_path, "permissions": d.permissions}
                    for d in response.devices],
        "annotations": dict(response.annotations),
        "cdi_devices": [c.name for c in response.cdi_devices],
    }


def check(args: argparse.Namespace, work: Path) -> int:
    heading("dpkit discover nvidia")
    vendor = NvidiaVendor(vendor_config(args, work))
    report = explain(vendor)
    print(json.dumps(report, indent=2))
    gpus = sum(len(r["devices"]) for r in report["resources"])
    resource = next((r["name"] for r in report["resources"] if r["devices"]), "nvidia.com/gpu")

    heading("dpkit doctor nvidia (vendor checks)")
    for c in vendor.doctor():
        print(f"[{'ok  ' if c.ok else 'FAIL'}] {c.name}: {c.detail}" + (f"\n       fix: {c.hint}" if not c.ok else ""))
    vendor.close()
    if not gpus:
        print("\nno GPU advertised; see the findings above", flush=True)
        return 1

    heading(f"health probe for {args.seconds:.0f} s")
    kubelet, manager = run_manager(vendor_config(args, work), work, "health")
    try:
        kubelet.wait_for(lambda k: k.allocatable(resource) > 0, 30)
        started = time.monotonic()
        while time.monotonic() - started < args.seconds:
            time.sleep(1.0)
            probe = manager.status()["probes"][0]
            devices = [d for r in manager.status()["resources"] for d in r["devices"]]
            print(f"t={time.monotonic() - started:4.1f}s probe pid={probe['pid']} alive={probe['alive']} "
                  f"heartbeats={probe['heartbeats']} silent={probe['silent']} restarts={probe['restarts']} "
                  f"healthy={sum(d['health'] == 'Healthy' for d in devices)}/{len(devices)}", flush=True)
        for d in (d for r in manager.status()["resources"] for d in r["devices"]):
            print(f"  {d['id']} {d['health']} {d['reason']}")
        beats = manager.status()["probes"][0]["heartbeats"]
    finally:
        manager.stop()
        kubelet.stop()
    if beats == 0:
        print("the health probe never sent a heartbeat", flush=True)
        return 1

    for strategy in STRATEGIES:
        heading(f"allocation of 1 x {resource}, deviceListStrategy={strategy}")
        kubelet, manager = run_manager(vendor_config(args, work, strategy), work, strategy)
        try:
            if not kubelet.wait_for(lambda k: k.allocatable(resource) > 0, 30):
                print("nothing allocatable", flush=True)
                return 1
            chosen, response = kubelet.allocate(resource, 1, pod=f"check-{strategy}")
            print(json.dumps({"device_ids": chosen, "response": response_dict(response)}, indent=2), flush=True)
        finally:
            manager.stop()
            kubelet.stop()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="how long to watch the health probe")
    parser.add_argument("--nvml-library", help="libnvidia-ml.so.1 to use (default: the loader's)")
    parser.add_argument("--sysfs-root", help="default /sys")
    parser.add_argument("--proc-root", help="default /proc")
    parser.add_argument("--dev-root", help="nvidiaDevRoot (default /)")
    parser.add_argument("--pass-device-specs", action="store_true", help="also pass /dev nodes")
    parser.add_argument("--verbose", action="store_true", help="show dpkit's info logs")
    args = parser.parse_args(argv)
    setup_logging("human", "info" if args.verbose else "warning")
    work = Path(tempfile.mkdtemp(prefix="dpk-hw-", dir="/tmp"))  # short: unix socket paths are limited
    try:
        return check(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
