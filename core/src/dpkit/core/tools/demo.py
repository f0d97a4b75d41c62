"""``dpkit demo``: the whole flow on an emulated kubelet and simulated devices, in a few seconds.

Starts the kubelet emulator in a temporary directory, runs the manager with the built-in
simulated vendor, shows the device table as the kubelet sees it through a scripted failure,
hotplug and recovery, allocates devices, restarts the kubelet and shows re-registration.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import TextIO

from dpkit.core.engine.control import format_status, query
from dpkit.core.engine.manager import Manager
from dpkit.core.integrations.observers import attach_observers
from dpkit.core.support.config import Config
from dpkit.core.tools.kubelet import Kubelet
from dpkit.core.tools.sim import SimulatedVendor


def _table(kubelet: Kubelet, out: TextIO, title: str) -> None:
    out.write(f"\n== {title}\n")
    with kubelet._cond:
        resources = sorted(kubelet.endpoints)
        held = {(a.resource, i): f"{a.namespace}/{a.pod}/{a.container}"
                for a in kubelet.allocations for i in a.device_ids}
    for resource in resources:
        devices = kubelet.devices(resource)
        mine = [i for i in devices if (resource, i) in held]
        # healthy and held, not "allocatable": a healthy device a pod holds is not free
        out.write(f"  {resource}: capacity {len(devices)}, healthy {kubelet.allocatable(resource)}, "
                  f"held {len(mine)}\n")
        for device_id, state in sorted(devices.items()):
            numa = ",".join(map(str, state.numa)) or "-"
            by = f"  held by {held[resource, device_id]}" if (resource, device_id) in held else ""
            out.write(f"    {device_id:<10} {state.health:<9} numa {numa}{by}\n")
    out.flush()


def _follow(kubelet: Kubelet, resources: list[str], vendor: SimulatedVendor, out: TextIO) -> None:
    """Print each device-list update the kubelet receives until the script has played out."""
    seen = {r: kubelet.updates(r) for r in resources}
    shown = {r: kubelet.devices(r) for r in resources}
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        changed = kubelet.wait_for(lambda k: any(k.updates(r) != seen[r] for r in resources), 0.5)
        if not changed:
            if vendor.script_done.is_set():
                return
            continue
        for resource in resources:
            if kubelet.updates(resource) == seen[resource]:
                continue
            seen[resource] = kubelet.updates(resource)
            now = kubelet.devices(resource)
            before = shown[resource]
            notes = [f"+{i}" for i in sorted(set(now) - set(before))]
            notes += [f"-{i}" for i in sorted(set(before) - set(now))]
            notes += [f"{i}: {before[i].health} -> {now[i].health}" for i in sorted(set(now) & set(before))
                      if now[i].health != before[i].health]
            shown[resource] = now
            out.write(f"  {resource}: healthy {kubelet.allocatable(resource)}/{len(now)}  {'; '.join(notes)}\n")
            out.flush()


def run_demo(devices_file: Path | None = None, out: TextIO | None = None) -> int:
    import sys

    out = out or sys.stdout
    widget = "example.com/widget"
    with tempfile.TemporaryDirectory(prefix="dpkit-demo-") as tmp:
        root = Path(tmp)
        kubelet = Kubelet(root / "device-plugins", pod_resources_socket=root / "pod-resources" / "kubelet.sock").start()
        vendor_config = {"devices_file": str(devices_file)} if devices_file else {}
        config = Config(plugin_dir=str(root / "device-plugins"), state_dir=str(root / "state"), vendor=vendor_config,
                        pod_resources_socket=str(root / "pod-resources" / "kubelet.sock"),
                        cdi_dir=str(root / "cdi"), nfd_features_dir="")
        vendor = SimulatedVendor(config.vendor)
        vendor.script_done.clear()
        manager = Manager(vendor, config)
        attach_observers(manager)  # pod-resources view ("HELD BY") and CDI spec files, as `dpkit run` does
        started = time.perf_counter()
        manager.start()
        try:
            names = sorted(manager.calls.discover())
            if not kubelet.wait_for(lambda k: all(k.registered(r) and k.updates(r) for r in names), 10):
                out.write("demo: the plugin did not register within 10 s\n")
                return 1
            out.write(f"dpkit demo: simulated vendor registered {len(names)} resource(s) with the emulated kubelet "
                      f"in {(time.perf_counter() - started) * 1000:.0f} ms\n")
            _table(kubelet, out, "devices as the kubelet sees them")
            out.write("\n== live updates from ListAndWatch while the simulated node changes\n")
            _follow(kubelet, names, vendor, out)
            _table(kubelet, out, "after the script: widget-1 failed and recovered, widget-4 hotplugged, "
                                 "gadget-0 removed")
            ids, response = kubelet.allocate(widget, 2, pod="demo-pod", container="app")
            out.write(f"\n== allocated {', '.join(ids)} to default/demo-pod (preferred: packed on one NUMA node)\n")
            for name, value in sorted(response.envs.items()):
                out.write(f"  env    {name}={value}\n")
            for dev in response.devices:
                out.write(f"  device {dev.host_path} -> {dev.container_path} ({dev.permissions})\n")
            for mount in response.mounts:
                out.write(f"  mount  {mount.host_path} -> {mount.container_path} (ro={mount.read_only})\n")
            out.write("\n== `dpkit status` of the running plugin (read over its control socket)\n")
            out.write(format_status(query(config.state_dir)["status"]) + "\n")
            t0 = time.perf_counter()
            kubelet.restart()
            ok = kubelet.wait_for(lambda k: all(k.registered(r) for r in manager.servers), 10)
            took = (time.perf_counter() - t0) * 1000
            kubelet.wait_for(lambda k: all(k.updates(r) for r in manager.servers), 5)
            out.write(f"\n== kubelet restarted (plugin dir wiped): "
                      f"{'re-registered' if ok else 'NOT re-registered'} in {took:.0f} ms\n")
            _table(kubelet, out, "after the kubelet restart")
            return 0 if ok else 1
        finally:
            manager.stop()
            kubelet.stop()
            left = sorted(p.name for p in (root / "device-plugins").glob("dpkit-*.sock"))
            out.write(f"\n== plugin stopped; sockets left behind: {left or 'none'}\n")
