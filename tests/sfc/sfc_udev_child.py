"""Child process for test_sfc_udev.py: real pyudev over a umockdev tree (not collected by pytest).

Both run under ``umockdev-wrapper``. ``enumerate``: build a tree, discover through udev and through
a plain walk of the same testbed, and report both. ``watch``: under ``umockdev-wrapper``: build a testbed, run the
manager and the kubelet emulator, emit uevents and time how long until the kubelet sees each change.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import umock

from dpkit.core.engine.manager import Manager
from dpkit.core.support.config import Config
from dpkit.core.tools.kubelet import Kubelet
from dpkit.sfc.vendor import SfcVendor

RESOURCE = "solarflare.com/sfc"
BRIDGE = "/devices/pci0000:00/0000:00:03.0"


def pci(address: str, *, vendor: str = "0x1924", driver: str | None = "sfc", numa: str = "0") -> umock.MockDevice:
    properties = {"SUBSYSTEM": "pci", "PCI_SLOT_NAME": address, "PCI_ID": f"{vendor[2:].upper()}:0B03"}
    links = {}
    if driver:
        properties["DRIVER"] = driver
        links["driver"] = f"../../../../bus/pci/drivers/{driver}"
    return umock.MockDevice(f"{BRIDGE}/{address}", properties,
                            {"vendor": vendor, "device": "0x0b03", "numa_node": numa}, links)


def net(address: str, name: str, operstate: str = "up") -> umock.MockDevice:
    return umock.MockDevice(
        f"{BRIDGE}/{address}/net/{name}", {"SUBSYSTEM": "net", "INTERFACE": name},
        {"address": "00:0f:53:00:03:0" + address[-1], "operstate": operstate,
         "carrier": "1" if operstate == "up" else "0", "speed": "25000"})


def summary(snapshot: Any) -> dict[str, list[list[str]]]:
    return {r: [[d.id, str(d.health), d.attributes.get("interfaces", ""), d.reason] for d in devs]
            for r, devs in snapshot.items()}


def enumerate_mode(onload_dir: str) -> None:
    tb = umock.testbed()
    for device in (
        pci("0000:03:00.0", numa="1"), net("0000:03:00.0", "ens3f0"),
        pci("0000:03:00.1", numa="1"), net("0000:03:00.1", "ens3f1", "down"),
        pci("0000:04:00.0", driver="vfio-pci"),  # passed to a VM: explained, not advertised
        pci("0000:05:00.0", vendor="0x8086", driver="ixgbe"), net("0000:05:00.0", "eno1"),
    ):
        tb.add_from_string(device.record())
    base = {"dev_root": onload_dir, "onload": {"library_path": onload_dir}}
    through_udev = SfcVendor(base)
    walked = SfcVendor({**base, "sys_root": str(umock.testbed_dir() / "sys")})
    umock.write_result({
        "udev": summary(through_udev.discover()),
        "walk": summary(walked.discover()),
        "udev_used": through_udev._udev is not None,
        "findings": [[f.subject, f.reason] for f in through_udev.explain()],
        "doctor": {c.name: c.ok for c in through_udev.doctor()},
    })


class Stage:
    """Emit one change and time it until the kubelet's view satisfies ``done``."""

    def __init__(self, kubelet: Kubelet) -> None:
        self.kubelet = kubelet
        self.timings: dict[str, float] = {}

    def __call__(self, name: str, emit: Any, done: Any) -> None:
        started = time.perf_counter()
        emit()
        if not self.kubelet.wait_for(done, timeout=10):
            raise AssertionError(f"{name}: the kubelet never saw the change: {self.kubelet.devices(RESOURCE)}")
        self.timings[name] = round((time.perf_counter() - started) * 1000, 2)


def health(kubelet: Kubelet, device: str) -> str:
    state = kubelet.devices(RESOURCE).get(device)
    return state.health if state else "absent"


def wait_reason(manager: Manager, device: str, expected: str, timeout: float = 5.0) -> str:
    deadline = time.monotonic() + timeout
    while True:
        reason = next(d["reason"] for d in manager.status()["resources"][0]["devices"] if d["id"] == device)
        if reason == expected or time.monotonic() > deadline:
            return str(reason)
        time.sleep(0.01)


def watch_mode(source: str) -> None:
    tb = umock.testbed()
    sys_dir = umock.testbed_dir() / "sys"
    a, b = "0000:03:00.0", "0000:03:00.1"
    for device in (pci(a), net(a, "ens3f0")):
        tb.add_from_string(device.record())
    a_path, a_net = f"/sys{BRIDGE}/{a}", f"/sys{BRIDGE}/{a}/net/ens3f0"
    short = Path(tempfile.mkdtemp(prefix="dpk-sfc-", dir="/tmp"))
    kubelet = Kubelet(short / "dp").start()
    vendor = SfcVendor({"dev_root": str(short), "onload": {"library_path": str(short)}, "resync_interval": 3600,
                         "udev_source": source})
    manager = Manager(vendor, Config(plugin_dir=str(short / "dp"), state_dir=str(short / "st")))
    try:
        manager.start()
        if not kubelet.wait_for(lambda k: health(k, a) == "Healthy", timeout=10):
            raise AssertionError(f"never registered: {kubelet.devices(RESOURCE)}")
        stage = Stage(kubelet)

        # The kernel sends no uevent for carrier/operstate changes (rtnetlink RTM_NEWLINK does,
        # tested for real in test_sfc_rtnl.py) and umockdev cannot fake rtnetlink. These stages
        # use a net 'change' uevent only to check that the changed sysfs state reaches the kubelet.
        def link(state: str) -> None:
            tb.set_attribute(a_net, "operstate", state)
            tb.set_attribute(a_net, "carrier", "1" if state == "up" else "0")
            tb.uevent(a_net, "change")

        stage("link_down", lambda: link("down"), lambda k: health(k, a) == "Unhealthy")
        reasons = {"link_down": wait_reason(manager, a, "link down on ens3f0 (down)")}
        stage("link_up", lambda: link("up"), lambda k: health(k, a) == "Healthy")

        def unbind() -> None:
            tb.uevent(a_net, "remove")
            tb.remove_device(a_net)
            (sys_dir / BRIDGE.lstrip("/") / a / "driver").unlink()
            tb.uevent(a_path, "unbind")

        stage("unbind", unbind, lambda k: health(k, a) == "Unhealthy")
        reasons["unbind"] = wait_reason(manager, a, "driver unbound (now none)")

        def bind() -> None:
            umock.symlink_sys(f"{BRIDGE}/{a}/driver", "../../../../bus/pci/drivers/sfc")
            tb.add_from_string(net(a, "ens3f0").record())
            tb.uevent(a_net, "add")
            tb.uevent(a_path, "bind")

        stage("bind", bind, lambda k: health(k, a) == "Healthy")

        def hotplug() -> None:
            tb.add_from_string(pci(b, numa="1").record())
            tb.add_from_string(net(b, "ens3f1").record())
            tb.uevent(f"/sys{BRIDGE}/{b}", "add")
            tb.uevent(f"/sys{BRIDGE}/{b}/net/ens3f1", "add")

        stage("hotplug", hotplug, lambda k: health(k, b) == "Healthy")

        def remove() -> None:
            tb.uevent(f"/sys{BRIDGE}/{b}/net/ens3f1", "remove")
            tb.uevent(f"/sys{BRIDGE}/{b}", "remove")
            tb.remove_device(f"/sys{BRIDGE}/{b}/net/ens3f1")
            tb.remove_device(f"/sys{BRIDGE}/{b}")

        stage("remove", remove, lambda k: health(k, b) == "Unhealthy")
        # the remove uevent comes while the directory still exists (as from the kernel); the
        # settling re-discovery after it must find the function gone
        reasons["remove"] = wait_reason(manager, b, "removed from the host")
        numa = list(kubelet.devices(RESOURCE)[a].numa)

        def veth() -> None:  # pod churn: virtual interfaces must not cause work, but must not break either
            tb.add_from_string(umock.MockDevice("/devices/virtual/net/veth0", {"SUBSYSTEM": "net"}).record())
            tb.uevent("/sys/devices/virtual/net/veth0", "add")
            link("down")

        stage("after_veth", veth, lambda k: health(k, a) == "Unhealthy")
        capacity = kubelet.capacity(RESOURCE)
    finally:
        manager.stop()
        kubelet.stop()
        shutil.rmtree(short, ignore_errors=True)
    watching = [t.name for t in threading.enumerate() if t.name == "vendor-watch"]
    umock.write_result({"timings_ms": stage.timings, "reasons": reasons, "numa_a": numa,
                        "capacity": capacity, "watch_threads_after_stop": watching})


if __name__ == "__main__":
    mode = sys.argv[1]
    if mode == "enumerate":
        enumerate_mode(sys.argv[2])
    elif mode == "watch":
        watch_mode(sys.argv[2])
    else:
        raise SystemExit(f"unknown mode {mode!r}")

