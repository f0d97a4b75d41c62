"""Child for test_umockdev: the vendor, a real Manager and the kubelet emulator in a umockdev testbed.

Every change is announced with a testbed uevent while the vendor's timer is an hour away, so
only the pyudev monitor can explain the kubelet seeing it. Reports each step's latency: from
just before the uevent to the kubelet holding the new device list.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import umock
from kvm_vfio.fakehost import FakeHost
from kvm_vfio.served import served

from dpkit.core.tools.kubelet import Kubelet
from dpkit.kvm_vfio.vendor import KvmVfioVendor

GPU = "nvidia.com/TU104GL_Tesla_T4"
KVM = "devices.kubevirt.io/kvm"
NEW = "0000:5e:00.0"


def add_function(tb: Any, address: str, numa: int) -> str:
    return umock.add_device(
        tb, "pci", address,
        attributes={"vendor": "0x10de", "device": "0x1eb8", "class": "0x030200", "numa_node": str(numa)},
        properties={"PCI_SLOT_NAME": address, "PCI_ID": "10DE:1EB8"},
    )


def timed(kubelet: Kubelet, action: Callable[[], None], done: Callable[[Kubelet], bool]) -> dict[str, Any]:
    start = time.monotonic()
    action()
    ok = kubelet.wait_for(done, timeout=5.0)
    return {"ok": ok, "ms": round((time.monotonic() - start) * 1000, 1)}


def main() -> None:
    work = Path(sys.argv[1])
    tb = umock.testbed()
    host = FakeHost(umock.testbed_dir() / "sys", work / "dev")
    host.add_node("kvm")
    host.vfio_nodes("7", "9")
    add_function(tb, "0000:3b:00.0", numa=0)
    host.set_group("0000:3b:00.0", "7")
    host.set_driver("0000:3b:00.0", "vfio-pci")
    kvm_misc = umock.add_device(tb, "misc", "kvm", properties={"DEVNAME": "/dev/kvm"})

    vendor = KvmVfioVendor({
        "sys_root": "/sys", "dev_root": str(host.dev), "kvm_slots": 4, "vhost_net_slots": 0, "tun_slots": 0,
        "health_interval": 3600, "pci_host_devices": [{"pci_vendor_selector": "10de:1eb8", "resource_name": GPU}],
    })
    result: dict[str, Any] = {}
    with served(vendor, work) as (kubelet, manager):
        result["listening"] = vendor.listening.wait(10)
        result["initial"] = kubelet.wait_for(lambda k: k.allocatable(GPU) == 1 and k.allocatable(KVM) == 4, 10)
        result["initial_numa"] = [list(s.numa) for s in kubelet.devices(GPU).values()]

        path: list[str] = []
        # hotplug: the function appears (no driver yet, so Unhealthy)...
        result["add"] = timed(kubelet, lambda: path.append(add_function(tb, NEW, numa=1)),
                              lambda k: k.capacity(GPU) == 2)
        result["add_health"] = kubelet.devices(GPU)[NEW].health

        # ...then vfio-pci binds it: Healthy. Control: with no uevent yet, nothing changes.
        host.set_group(NEW, "9")
        host.set_driver(NEW, "vfio-pci")
        result["seen_without_uevent"] = kubelet.wait_for(lambda k: k.allocatable(GPU) == 2, timeout=0.3)
        result["bind"] = timed(kubelet, lambda: umock.uevent(tb, path[0], "bind"),
                               lambda k: k.allocatable(GPU) == 2)

        # re-bound to another driver: unbound (Unhealthy at once), then bound to nvidia
        def unbind() -> None:
            host.set_driver(NEW, "")
            umock.uevent(tb, path[0], "unbind")

        result["unbind"] = timed(kubelet, unbind, lambda k: k.allocatable(GPU) == 1 and k.capacity(GPU) == 2)
        result["unbind_reason"] = manager.effective[GPU][NEW].reason
        host.set_driver(NEW, "nvidia")
        umock.uevent(tb, path[0], "bind")
        # the kubelet sees no change (Unhealthy either way); the manager's view carries the reason
        result["rebind_reason"] = kubelet.wait_for(
            lambda k: manager.effective[GPU][NEW].reason == "bound to nvidia, not vfio-pci", timeout=5.0)

        # removed: gone from the bus first, then the remove uevent (as the kernel orders them)
        def remove() -> None:
            (umock.testbed_dir() / "sys/bus/pci/devices" / NEW).unlink()
            umock.uevent(tb, path[0], "remove")

        result["remove"] = timed(kubelet, remove, lambda k: k.capacity(GPU) == 1)
        tb.remove_device(path[0])

        # /dev/kvm goes away with its misc device, and comes back
        def kvm_gone() -> None:
            host.remove_node("kvm")
            umock.uevent(tb, kvm_misc, "remove")

        result["kvm_gone"] = timed(kubelet, kvm_gone, lambda k: k.allocatable(KVM) == 0 and k.capacity(KVM) == 4)

        def kvm_back() -> None:
            host.add_node("kvm")
            umock.uevent(tb, kvm_misc, "add")

        result["kvm_back"] = timed(kubelet, kvm_back, lambda k: k.allocatable(KVM) == 4)
    umock.write_result(result)


if __name__ == "__main__":
    main()
