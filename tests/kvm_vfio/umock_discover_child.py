"""Child for test_umockdev: discovery and ``dpkit discover`` over a umockdev-run device file.

The IOMMU group directories are not devices, so they are written into the testbed here.
"""

from __future__ import annotations

import sys

import umock
from kvm_vfio.fakehost import FakeHost

from dpkit.core.tools.discovery import explain
from dpkit.kvm_vfio.vendor import KvmVfioVendor


def main() -> None:
    dev_root = sys.argv[1]
    host = FakeHost(umock.testbed_dir() / "sys", umock.testbed_dir() / "unused-dev")
    for address, group in (("0000:3b:00.0", "7"), ("0000:3b:00.1", "7"), ("0000:5e:00.0", "9")):
        host.set_group(address, group)
    vendor = KvmVfioVendor({"sys_root": "/sys", "dev_root": dev_root, "kvm_slots": 2,
                            "pci_host_devices": [{"pci_vendor_selector": "10DE:1EB8"}]})
    umock.write_result(explain(vendor))


if __name__ == "__main__":
    main()
