"""A fake host for kvm_vfio tests: a sysfs tree laid out as the kernel does, and a /dev directory.

Works on a plain temp directory and on a umockdev testbed's ``sys/`` alike: functions are found
through ``bus/pci/devices/<address>`` links, whoever created them. Never touches real paths.
"""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path


class FakeHost:
    def __init__(self, sys_root: Path, dev_root: Path) -> None:
        self.sys = sys_root
        self.dev = dev_root
        self.sys.mkdir(parents=True, exist_ok=True)
        self.dev.mkdir(parents=True, exist_ok=True)

    # -- sysfs -------------------------------------------------------------------------------
    def _link(self, link: Path, target: Path) -> None:
        link.parent.mkdir(parents=True, exist_ok=True)
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(os.path.relpath(target, link.parent))

    def device_dir(self, address: str) -> Path:
        return (self.sys / "bus/pci/devices" / address).resolve()

    def add_pci(self, address: str, vendor: str = "10de", device: str = "1eb8", pci_class: str = "030200", *,
                driver: str = "vfio-pci", group: str | None = "7", numa: int = 0, vfio_cdev: str = "") -> Path:
        """A PCI function with its attribute files, bus link, driver and IOMMU group."""
        path = self.sys / "devices/pci0000:00" / address
        path.mkdir(parents=True, exist_ok=True)
        for name, value in (("vendor", f"0x{vendor}"), ("device", f"0x{device}"), ("class", f"0x{pci_class}"),
                            ("numa_node", str(numa)),
                            ("uevent", f"PCI_SLOT_NAME={address}\nPCI_ID={vendor.upper()}:{device.upper()}\n")):
            (path / name).write_text(value + "\n")
        self._link(self.sys / "bus/pci/devices" / address, path)
        self.set_driver(address, driver)
        if group is not None:
            self.set_group(address, group)
        if vfio_cdev:
            (path / "vfio-dev" / vfio_cdev).mkdir(parents=True, exist_ok=True)
        return path

    def set_driver(self, address: str, driver: str) -> None:
        """Bind to ``driver`` ("" unbinds) by rewriting the ``driver`` link, as a re-bind does."""
        link = self.device_dir(address) / "driver"
        if link.is_symlink():
            link.unlink()
        if driver:
            drivers = self.sys / "bus/pci/drivers" / driver
            drivers.mkdir(parents=True, exist_ok=True)
            self._link(link, drivers)

    def set_group(self, address: str, group: str, bus: str = "pci") -> None:
        device = (self.sys / "bus" / bus / "devices" / address).resolve()
        group_dir = self.sys / "kernel/iommu_groups" / group
        (group_dir / "devices").mkdir(parents=True, exist_ok=True)
        self._link(group_dir / "devices" / address, device)
        self._link(device / "iommu_group", group_dir)

    def add_mdev(self, uuid: str, parent: str, type_id: str = "nvidia-222", name: str | None = "GRID T4-1Q",
                 group: str | None = "20") -> Path:
        """A mediated device under PCI function ``parent``, laid out as the kernel's mdev core does."""
        parent_dir = self.device_dir(parent)
        type_dir = parent_dir / "mdev_supported_types" / type_id
        type_dir.mkdir(parents=True, exist_ok=True)
        if name is not None:
            (type_dir / "name").write_text(name + "\n")
        path = parent_dir / uuid
        path.mkdir()
        (path / "uevent").write_text(f"MDEV_TYPE={type_id}\n")
        self._link(path / "mdev_type", type_dir)
        self._link(self.sys / "bus/mdev/devices" / uuid, path)
        if group is not None:
            self.set_group(uuid, group, bus="mdev")
        return path

    def remove_mdev(self, uuid: str) -> None:
        path = (self.sys / "bus/mdev/devices" / uuid).resolve()
        for member in (self.sys / "kernel/iommu_groups").glob(f"*/devices/{uuid}"):
            member.unlink()
        (self.sys / "bus/mdev/devices" / uuid).unlink()
        shutil.rmtree(path)

    def add_usb(self, port: str, vendor: str, product: str, bus: int, devnum: int, *, node: bool = True) -> Path:
        """A USB device at ``port`` (e.g. ``1-1.4``) with its interface, bus link, uevent and /dev node."""
        hub = self.sys / f"devices/pci0000:00/0000:00:14.0/usb{bus}"
        if not (hub / "idVendor").exists():  # the root hub: has IDs, but KubeVirt skips "usb*"
            hub.mkdir(parents=True, exist_ok=True)
            (hub / "idVendor").write_text("1d6b\n")
            (hub / "uevent").write_text(f"BUSNUM={bus:03d}\nDEVNUM=001\nPRODUCT=1d6b/2/515\n"
                                        f"DEVNAME=bus/usb/{bus:03d}/001\n")
            self._link(self.sys / "bus/usb/devices" / f"usb{bus}", hub)
        path = hub / port
        path.mkdir()
        (path / "idVendor").write_text(vendor + "\n")
        (path / "idProduct").write_text(product + "\n")
        (path / "uevent").write_text(
            f"MAJOR=189\nMINOR={(bus - 1) * 128 + devnum - 1}\nDEVNAME=bus/usb/{bus:03d}/{devnum:03d}\n"
            f"DEVTYPE=usb_device\nDRIVER=usb\nPRODUCT={int(vendor, 16):x}/{int(product, 16):x}/100\n"
            f"TYPE=0/0/0\nBUSNUM={bus:03d}\nDEVNUM={devnum:03d}\n")
        interface = path / f"{port}:1.0"  # interfaces have no idVendor
        interface.mkdir()
        self._link(self.sys / "bus/usb/devices" / port, path)
        self._link(self.sys / "bus/usb/devices" / f"{port}:1.0", interface)
        if node:
            self.add_node(f"bus/usb/{bus:03d}/{devnum:03d}")
        return path

    def remove_pci(self, address: str) -> None:
        device = self.device_dir(address)
        for group in (self.sys / "kernel/iommu_groups").glob(f"*/devices/{address}"):
            group.unlink()
        (self.sys / "bus/pci/devices" / address).unlink()
        shutil.rmtree(device)

    def write(self, relative: str, content: str) -> None:
        path = self.sys / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content)

    # -- /dev ----------------------------------------------------------------------------------
    def add_node(self, relative: str) -> Path:
        """A node that opens read-write (a regular file stands in for the character device)."""
        path = self.dev / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()
        return path

    def add_dead_node(self, relative: str) -> Path:
        """A character device numbered 0:0 (never registered): exists, but opening fails (ENXIO).

        Raises PermissionError without CAP_MKNOD; callers skip then.
        """
        path = self.dev / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.unlink(missing_ok=True)
        os.mknod(path, stat.S_IFCHR | 0o600, os.makedev(0, 0))
        return path

    def remove_node(self, relative: str) -> None:
        (self.dev / relative).unlink()

    def vfio_nodes(self, *groups: str) -> None:
        self.add_node("vfio/vfio")
        for group in groups:
            self.add_node(f"vfio/{group}")

    def config(self, **extra: object) -> dict[str, object]:
        """A vendor config pointing at this host."""
        return {"sys_root": str(self.sys), "dev_root": str(self.dev), **extra}
