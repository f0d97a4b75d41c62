"""Child for test_umock_helper: reports what pyudev and plain reads see under umockdev."""

from __future__ import annotations

import os
import select
import sys

import pyudev
import umock


def main() -> None:
    mode = sys.argv[1]
    context = pyudev.Context()
    result: dict[str, object] = {"mode": mode}
    if mode == "wrapped":
        tb = umock.testbed()
        monitor = pyudev.Monitor.from_netlink(context)
        monitor.filter_by("pci")
        monitor.start()
        path = umock.add_device(tb, "pci", "0000:00:04.0", attributes={"vendor": "0x10de"},
                                properties={"PCI_SLOT_NAME": "0000:00:04.0"})
        umock.uevent(tb, path, "change")
        events: list[list[str]] = []
        while len(events) < 2 and select.select([monitor], [], [], 5.0)[0]:
            event = monitor.poll(timeout=0)
            if event is not None:
                events.append([event.action, event.sys_name])
        result["events"] = events
    umock.write_sys_file("kernel/iommu_groups/7/type", "DMA\n")
    umock.symlink_sys("kernel/iommu_groups/7/devices/0000:00:04.0", "/sys/devices/0000:00:04.0")
    result["pyudev"] = sorted((d.sys_name, (d.attributes.get("vendor") or b"").decode())
                              for d in context.list_devices(subsystem="pci"))
    with open("/sys/kernel/iommu_groups/7/type") as handle:
        result["group_type"] = handle.read().strip()
    result["group_devices"] = os.listdir("/sys/kernel/iommu_groups/7/devices")
    umock.write_result(result)


if __name__ == "__main__":
    main()
