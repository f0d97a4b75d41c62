"""Child for test_umockdev: mediated devices appear and go away under a real pyudev monitor.

The mdev is added as a testbed device (its ``add`` uevent), gets its type and IOMMU group links,
then its ``bind`` uevent (the kernel binds a new mdev to its VFIO driver); the vendor's timer is an
hour away, so only uevents can explain the kubelet seeing a change.
"""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path
from typing import Any

import umock
from kvm_vfio.fakehost import FakeHost
from kvm_vfio.served import served

from dpkit.kvm_vfio.vendor import KvmVfioVendor

VGPU = "nvidia.com/GRID_T4-1Q"
UUID = "4b20d080-1b54-4048-85b3-a6a62d165c01"
ENV = "MDEV_PCI_RESOURCE_NVIDIA_COM_GRID_T4-1Q"


def main() -> None:
    work = Path(sys.argv[1])
    tb = umock.testbed()
    sys_root = umock.testbed_dir() / "sys"
    host = FakeHost(sys_root, work / "dev")
    host.vfio_nodes("20")
    parent = umock.add_device(tb, "pci", "0000:3b:00.0", properties={"PCI_SLOT_NAME": "0000:3b:00.0"},
                              attributes={"vendor": "0x10de", "device": "0x1eb8", "class": "0x030200",
                                          "numa_node": "1"})
    types = sys_root / parent.lstrip("/").removeprefix("sys/") / "mdev_supported_types/nvidia-222"
    types.mkdir(parents=True)
    (types / "name").write_text("GRID T4-1Q\n")
    vendor = KvmVfioVendor({
        "sys_root": "/sys", "dev_root": str(host.dev), "kvm_slots": 0, "vhost_net_slots": 0, "tun_slots": 0,
        "health_interval": 3600, "permittedHostDevices": {"mediatedDevices": [
            {"mdevNameSelector": "GRID T4-1Q", "resourceName": VGPU, "externalResourceProvider": True}]},
    })
    scanned = threading.Event()  # set after every rescan, so steps never race the previous uevent's
    discover = vendor.discover

    def discover_and_tell() -> Any:
        snapshot = discover()
        scanned.set()
        return snapshot

    vendor.discover = discover_and_tell  # type: ignore[method-assign]
    result: dict[str, Any] = {}
    with served(vendor, work) as (kubelet, _manager):
        result["listening"] = vendor.listening.wait(10)
        result["registered_empty"] = kubelet.wait_for(lambda k: k.registered(VGPU) and k.capacity(VGPU) == 0, 10)
        scanned.clear()
        mdev = umock.add_device(tb, "mdev", UUID, parent=parent, properties={"MDEV_TYPE": "nvidia-222"})
        result["add_rescanned"] = scanned.wait(5)  # the add uevent's rescan: no type link yet, so not matched
        device_dir = sys_root / mdev.lstrip("/").removeprefix("sys/")
        (device_dir / "mdev_type").symlink_to(types)
        host.set_group(UUID, "20", bus="mdev")
        result["seen_without_uevent"] = kubelet.wait_for(lambda k: k.capacity(VGPU) == 1, timeout=0.3)
        start = time.monotonic()
        umock.uevent(tb, mdev, "bind")
        result["bind_ok"] = kubelet.wait_for(lambda k: k.allocatable(VGPU) == 1, 5)
        result["bind_ms"] = round((time.monotonic() - start) * 1000, 1)
        result["devices"] = {i: [s.health, list(s.numa)] for i, s in kubelet.devices(VGPU).items()}
        ids, response = kubelet.allocate(VGPU, 1)
        result["allocated"] = [ids, dict(response.envs), sorted(d.container_path for d in response.devices)]

        start = time.monotonic()
        (sys_root / "bus/mdev/devices" / UUID).unlink()
        umock.uevent(tb, mdev, "remove")
        result["remove_ok"] = kubelet.wait_for(lambda k: k.capacity(VGPU) == 0, 5)
        result["remove_ms"] = round((time.monotonic() - start) * 1000, 1)
    umock.write_result(result)


if __name__ == "__main__":
    main()
