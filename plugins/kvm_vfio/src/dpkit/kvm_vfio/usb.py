"""USB host devices for ``usb`` entries of ``permittedHostDevices``, as KubeVirt's USB plugin serves them.

A USB device is a directory of ``/sys/bus/usb/devices`` with an ``idVendor`` file (root hubs
``usbN`` and interfaces ``1-1:1.0`` are skipped); its ``uevent`` gives ``BUSNUM``, ``DEVNUM``,
``PRODUCT`` (``vendor/product/bcd`` in hex) and ``DEVNAME`` (``bus/usb/001/004``). Each entry takes,
in sysfs order, one device per selector to make one allocatable unit, and keeps going while every
selector still finds a free device; a device goes to one unit only. Allocate gives the units'
``/dev/bus/usb/BBB/DDD`` nodes (``mrw``) and ``USB_RESOURCE_<NAME>=<bus>:<device>,...``.

IDs differ from KubeVirt's on purpose: KubeVirt draws a random part at every start
(``<resource>-<random>-<index>``), which no checkpoint can match; dpkit names a unit after its
devices' sysfs port paths (``usb-1-1.4``), stable while the devices stay in their ports.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from dpkit.core import MAX_DEVICE_ID, ContainerSpec, Device, DeviceNode, Finding, Health, ValidationError
from dpkit.kvm_vfio.names import USB_RESOURCE_PREFIX, resource_env
from dpkit.kvm_vfio.selectors import UsbSelector
from dpkit.kvm_vfio.sysfs import listdir

_SYSNAME = re.compile(r"^[0-9]{1,3}-[0-9.]{1,40}$")
_DEVNAME = re.compile(r"^bus/usb/[0-9]{3}/[0-9]{3}$")
_PRODUCT = re.compile(r"^([0-9a-fA-F]{1,4})/([0-9a-fA-F]{1,4})/[0-9a-fA-F]{1,4}$")
PERMISSIONS = "mrw"  # what KubeVirt gives USB nodes
USB_HINT = "plug the device in, or check the vendor/product IDs with lsusb"


@dataclass(frozen=True)
class UsbDevice:
    """One USB device from sysfs; ``vendor``/``product`` are 4-digit lower-case hex."""

    sysname: str  # port path, e.g. 1-1.4
    vendor: str
    product: str
    bus: int
    devnum: int
    devname: str  # below /dev: bus/usb/001/004


def read_devices(sys_root: str) -> tuple[list[UsbDevice], list[str]]:
    """Every USB device sysfs shows, in name order, and the problems met on the way."""
    devices: list[UsbDevice] = []
    problems: list[str] = []
    base = Path(sys_root, "bus/usb/devices")
    for name in sorted(listdir(base)):
        if name.startswith("usb") or ":" in name or not os.path.exists(base / name / "idVendor"):
            continue  # root hubs, interfaces, and whatever is not a device
        if not _SYSNAME.match(name):
            problems.append(f"ignoring {name[:40]!r} in {base}: not a USB port path")
            continue
        try:
            devices.append(_read(base / name, name))
        except FileNotFoundError:
            continue  # unplugged while we looked
        except (OSError, ValueError) as exc:
            problems.append(f"ignoring USB device {name}: {exc}")
    return devices, problems


def _read(path: Path, name: str) -> UsbDevice:
    with open(path / "uevent", encoding="ascii", errors="replace") as handle:
        fields = dict(line.strip().partition("=")[::2] for line in handle.read(4096).splitlines() if "=" in line)
    product = _PRODUCT.match(fields.get("PRODUCT", ""))
    devname = fields.get("DEVNAME", "")
    bus, devnum = fields.get("BUSNUM", ""), fields.get("DEVNUM", "")
    if not product or not _DEVNAME.match(devname) or not (bus.isdigit() and devnum.isdigit()):
        raise ValueError("uevent lacks a valid PRODUCT, BUSNUM, DEVNUM or DEVNAME")
    return UsbDevice(name, f"{int(product[1], 16):04x}", f"{int(product[2], 16):04x}", int(bus[:3]),
                     int(devnum[:3]), devname)


def scan(selectors: Sequence[UsbSelector], sys_root: str, dev_root: str
         ) -> tuple[dict[str, list[Device]], list[Finding]]:
    """Units per resource (entries in order, each device used once) and notes for ``dpkit discover``."""
    resources: dict[str, list[Device]] = {s.resource_name: [] for s in selectors}
    devices, problems = read_devices(sys_root)
    findings = [Finding(f"{sys_root}/bus/usb/devices", False, p) for p in problems]
    free = list(devices)
    for selector in selectors:
        units = 0
        while selector.ids:
            unit = _take(free, selector.ids)
            if unit is None:
                break
            resources[selector.resource_name].append(_device(unit, selector.resource_name, dev_root))
            units += 1
        if not units:
            wanted = ", ".join(f"{v}:{p}" for v, p in selector.ids) or "(no valid selector)"
            findings.append(Finding(f"usb {wanted}", False, "no (complete) set of USB devices matches",
                                    selector.resource_name, USB_HINT))
    return resources, findings


def _take(free: list[UsbDevice], ids: Sequence[tuple[str, str]]) -> list[UsbDevice] | None:
    """One free device per (vendor, product), removed from ``free``; None when one is missing."""
    unit: list[UsbDevice] = []
    for vendor, product in ids:
        match = next((d for d in free if (d.vendor, d.product) == (vendor, product) and d not in unit), None)
        if match is None:
            return None
        unit.append(match)
    for device in unit:
        free.remove(device)
    return unit


def unit_id(unit: Sequence[UsbDevice]) -> str:
    """``usb-<port>[_<port>...]``; a hash of it when that would pass the kubelet's length limit."""
    name = "usb-" + "_".join(d.sysname for d in unit)
    if len(name) <= MAX_DEVICE_ID:
        return name
    import hashlib  # only for such long names: hashlib starts OpenSSL's digests (about 0.6 MB resident)

    return "usb-" + hashlib.sha256(name.encode()).hexdigest()[:32]


def _device(unit: Sequence[UsbDevice], resource: str, dev_root: str) -> Device:
    ident = unit_id(unit)
    attributes = {"usb": ",".join(f"{d.vendor}:{d.product}" for d in unit),
                  "ports": ",".join(d.sysname for d in unit),
                  "bus_device": ",".join(f"{d.bus}:{d.devnum}" for d in unit)}
    missing = [d.devname for d in unit if not os.path.exists(os.path.join(dev_root, d.devname))]
    problem = f"{os.path.join(dev_root, missing[0])} does not exist" if missing else ""
    try:
        spec = ContainerSpec(
            devices=tuple(DeviceNode(os.path.join(dev_root, d.devname), f"/dev/{d.devname}", PERMISSIONS)
                          for d in unit),
            env={resource_env(USB_RESOURCE_PREFIX, resource): ",".join(f"{d.bus}:{d.devnum}" for d in unit)},
        )
        return Device(ident, Health.UNHEALTHY if problem else Health.HEALTHY, (), spec, problem, attributes)
    except ValidationError as exc:
        return Device(ident, Health.UNHEALTHY, (), ContainerSpec(), f"invalid device data: {exc}", attributes)
