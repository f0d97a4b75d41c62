"""Child for test_umockdev: PCI device names from the udev database that umockdev serves.

Each function gets udev's hwdb properties (``ID_MODEL_FROM_DATABASE``, ``ID_VENDOR_FROM_DATABASE``)
as testbed properties, which libudev returns like the host's /run/udev database entries.
"""

from __future__ import annotations

import sys
import time
from typing import Any

import umock
from kvm_vfio.fakehost import FakeHost

from dpkit.kvm_vfio.names import DeviceNames
from dpkit.kvm_vfio.vendor import KvmVfioVendor

FUNCTIONS = {  # address: (vendor, device, class, udev properties)
    "0000:3b:00.0": ("0x10de", "0x1eb8", "0x030200", {"ID_VENDOR_FROM_DATABASE": "NVIDIA Corporation",
                                                      "ID_MODEL_FROM_DATABASE": "TU104GL [Tesla T4]"}),
    "0000:00:04.0": ("0x1af4", "0x1000", "0x020000", {"ID_MODEL_FROM_DATABASE": "Virtio network device"}),
    "0000:00:05.0": ("0x8086", "0x0001", "0x020000", {}),  # udev knows no name for it
}
SELECTORS = [{"pci_vendor_selector": ids} for ids in ("10de:1eb8", "1af4:1000", "8086:0001", "10de:abcd")]


def _resources(vendor: KvmVfioVendor) -> dict[str, Any]:
    return {r: [[d.id, d.attributes.get("name", "")] for d in devs] for r, devs in vendor.discover().items()}


def main() -> None:
    dev_root = sys.argv[1]
    tb = umock.testbed()
    paths = {}
    for address, (vendor_id, device_id, pci_class, properties) in FUNCTIONS.items():
        paths[address] = umock.add_device(tb, "pci", address, properties={"PCI_SLOT_NAME": address, **properties},
                                          attributes={"vendor": vendor_id, "device": device_id, "class": pci_class,
                                                      "numa_node": "0"})
    host = FakeHost(umock.testbed_dir() / "sys", umock.testbed_dir() / "unused-dev")
    host.set_group("0000:3b:00.0", "7")
    config = {"sys_root": "/sys", "dev_root": dev_root, "kvm_slots": 0, "vhost_net_slots": 0, "tun_slots": 0,
              "pci_host_devices": SELECTORS}
    result: dict[str, Any] = {}
    vendor = KvmVfioVendor({**config, "pci_ids": "/usr/share/misc/pci.ids"})  # accepted, no longer read
    result["first"] = _resources(vendor)
    result["notes"] = [[f.subject, f.reason] for f in vendor.explain() if f.subject == "vendor.pci_ids"]
    tb.remove_device(paths["0000:3b:00.0"])  # the last T4 goes away: its resource keeps its name
    result["after_unplug"] = _resources(vendor)
    result["fresh_after_unplug"] = _resources(KvmVfioVendor(config))
    # a tree that is not libudev's /sys has no udev names (they would belong to another tree)
    result["other_root"] = sorted(_resources(KvmVfioVendor({**config, "sys_root": str(umock.testbed_dir() / "sys")})))
    names = DeviceNames("/sys")
    started = time.perf_counter()
    names.learn([("0000:00:04.0", "1af4", "1000")])
    result["lookup_ms"] = (time.perf_counter() - started) * 1000  # first: loads libudev, makes the context
    started = time.perf_counter()
    for n in range(200):
        names.learn([("0000:00:05.0", "8086", f"{n:04x}")])  # unknown IDs: one udev lookup each
    result["per_lookup_us"] = (time.perf_counter() - started) / 200 * 1e6
    umock.write_result(result)


if __name__ == "__main__":
    main()
