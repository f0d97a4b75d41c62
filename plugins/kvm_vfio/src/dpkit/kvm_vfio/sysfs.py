"""Read PCI functions and IOMMU groups from sysfs, trusting nothing.

Plain file reads under a configurable root (``/sys`` normally, a fake tree in tests; under
umockdev ``/sys`` itself is the fake tree). Anything malformed is reported as a problem string
and the function skipped; a device vanishing mid-read is the same as a device not there.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

_ADDRESS = re.compile(r"^[0-9a-f]{4}:[0-9a-f]{2}:[0-9a-f]{2}\.[0-7]$")
_HEX_ID = re.compile(r"^0x[0-9a-f]{4}$")
_HEX_CLASS = re.compile(r"^0x[0-9a-f]{6}$")
_NAME = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")
_MEMBER = re.compile(r"^[A-Za-z0-9_.:\-]{1,64}$")
_GROUP = re.compile(r"^[0-9]{1,9}$")
_VFIO_CDEV = re.compile(r"^vfio[0-9]{1,9}$")


@dataclass(frozen=True)
class PciFunction:
    """One PCI function as sysfs shows it; ids are lower-case hex without ``0x``."""

    address: str
    vendor: str
    device: str
    pci_class: str
    driver: str  # "" when no driver is bound
    iommu_group: str  # "" when the function has no IOMMU group (IOMMU off)
    numa_node: int | None
    vfio_cdev: str = ""  # "vfioN" when the kernel offers the iommufd device node


def read_attr(path: Path) -> str:
    """A sysfs attribute, stripped (at most 256 bytes: attributes are short, garbage is not)."""
    return _read(path)


def link_name(path: Path) -> str:
    """The last component of a symlink's target, or "" when there is no link."""
    return _link_name(path)


def listdir(path: Path) -> list[str]:
    """The names in a directory, or none when it cannot be read."""
    return _listdir(path)


def numa_node(sys_root: str, address: str) -> int | None:
    """A PCI function's NUMA node as sysfs writes it (None: unknown, -1, or not a number)."""
    try:
        raw = _read(Path(sys_root, "bus/pci/devices", address, "numa_node"))
    except OSError:
        return None
    numa = int(raw) if re.fullmatch(r"-?[0-9]{1,4}", raw) else None
    return numa if numa is not None and numa >= 0 else None


def _read(path: Path) -> str:
    with open(path, encoding="ascii", errors="replace") as handle:
        return handle.read(256).strip()


def _link_name(path: Path) -> str:
    """The last component of a symlink's target, or "" when there is no link."""
    try:
        return os.path.basename(os.readlink(path))
    except OSError:
        return ""


def driver_of(sys_root: str, address: str) -> str:
    """The driver bound to a PCI function ("" when unbound); garbage reads as ``?``."""
    name = _link_name(Path(sys_root, "bus/pci/devices", address, "driver"))
    return name if not name or _NAME.match(name) else "?"


def read_function(sys_root: str, address: str) -> PciFunction:
    """One function's facts; raises ValueError (malformed) or OSError (vanished, unreadable)."""
    base = Path(sys_root, "bus/pci/devices", address)
    vendor, device, pci_class = (_read(base / name).lower() for name in ("vendor", "device", "class"))
    for name, value, pattern in (("vendor", vendor, _HEX_ID), ("device", device, _HEX_ID),
                                 ("class", pci_class, _HEX_CLASS)):
        if not pattern.match(value):
            raise ValueError(f"{name} is {value[:40]!r}, not a hex ID")
    group = _link_name(base / "iommu_group")
    numa = numa_node(sys_root, address)
    cdevs = sorted(n for n in _listdir(base / "vfio-dev") if _VFIO_CDEV.match(n))
    return PciFunction(
        address=address,
        vendor=vendor[2:],
        device=device[2:],
        pci_class=pci_class[2:],
        driver=driver_of(sys_root, address),
        iommu_group=group if _GROUP.match(group) else "",
        numa_node=numa,
        vfio_cdev=cdevs[0] if cdevs else "",
    )


def read_functions(sys_root: str) -> tuple[list[PciFunction], list[str]]:
    """Every readable PCI function, sorted by address, and the problems met on the way."""
    functions: list[PciFunction] = []
    problems: list[str] = []
    for name in sorted(_listdir(Path(sys_root, "bus/pci/devices"))):
        if not _ADDRESS.match(name):
            problems.append(f"ignoring {name[:40]!r} in {sys_root}/bus/pci/devices: not a PCI address")
            continue
        try:
            functions.append(read_function(sys_root, name))
        except FileNotFoundError:
            continue  # removed while we looked: the next uevent brings a fresh view
        except (OSError, ValueError) as exc:
            problems.append(f"ignoring PCI function {name}: {exc}")
    return functions, problems


def is_group(name: str) -> bool:
    """Whether ``name`` is an IOMMU group number (what sysfs links to, never trusted blindly)."""
    return bool(_GROUP.match(name))


def iommu_groups(sys_root: str) -> list[str]:
    """The IOMMU group numbers the kernel created; empty when the IOMMU is off."""
    return sorted((g for g in _listdir(Path(sys_root, "kernel/iommu_groups")) if _GROUP.match(g)), key=int)


def group_members(sys_root: str, group: str) -> list[str]:
    """The devices of an IOMMU group, by name (PCI addresses for PCI devices)."""
    return sorted(n for n in _listdir(Path(sys_root, "kernel/iommu_groups", group, "devices")) if _MEMBER.match(n))


def _listdir(path: Path) -> list[str]:
    try:
        return os.listdir(path)
    except OSError:
        return []
