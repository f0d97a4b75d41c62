"""Facts about one PCI function and its network interfaces, read from plain sysfs files.

Nothing read here is trusted: a file that is missing, unreadable, binary or malformed gives
``None`` (or is skipped) and a line in ``problems``, never an exception. The same code reads
the real ``/sys`` (paths come from udev), a fake one under umockdev, or a temp tree in tests.
"""

from __future__ import annotations

import os
import re
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

PCI_ADDRESS = re.compile(r"^[0-9a-f]{4}:[0-9a-f]{2}:[0-9a-f]{2}\.[0-7]$")
# Linux allows nearly any byte in an interface name; we accept the sane subset (IFNAMSIZ 16).
IFNAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,14}$")
MAC = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")
VERSION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,62}$")
NUMBER = re.compile(r"^-?[0-9]{1,40}$")
#: highest NUMA node accepted (the kernel's MAX_NUMNODES is at most 1024)
MAX_NUMA_NODE = 1023
_MAX_READ = 4096


@dataclass(frozen=True)
class NetInterface:
    name: str
    mac: str  # "" when unreadable or malformed
    operstate: str  # "up", "down", "unknown"... "" when unreadable
    carrier: bool | None
    speed_mbps: int | None

    @property
    def link_up(self) -> bool:
        """Up per operstate; drivers that report 'unknown' are judged by carrier."""
        if self.operstate == "up":
            return True
        return self.operstate in ("unknown", "") and self.carrier is True


@dataclass(frozen=True)
class PciFunction:
    address: str
    sys_path: str
    vendor_id: str  # "0x1924", "" when unreadable
    device_id: str
    driver: str  # "" when no driver is bound
    numa_node: int | None
    interfaces: tuple[NetInterface, ...]
    problems: tuple[str, ...] = ()

    @property
    def nic(self) -> str:
        """The physical card: functions of one PCI device (domain:bus:slot) share it."""
        return self.address.rsplit(".", 1)[0]


def read_text(path: Path | str) -> str | None:
    """A sysfs attribute as stripped text, or None when missing, unreadable or not text."""
    try:
        with open(path, "rb") as handle:
            data = handle.read(_MAX_READ)
        return data.decode("ascii").strip()
    except (OSError, UnicodeDecodeError, ValueError):
        return None


def _read_int(path: Path, problems: list[str]) -> int | None:
    text = read_text(path)
    if text is None:
        return None
    try:
        return int(text, 0)
    except ValueError:
        problems.append(f"{path.name}: not a number: {text[:40]!r}")
        return None


def read_numa_node(path: Path, problems: list[str]) -> int | None:
    """A ``numa_node`` file: 0..MAX_NUMA_NODE, else None (-1 and a missing file mean no NUMA info).

    Anything else (not a decimal number, out of range) is None with a line in ``problems``, so
    a garbage value never reaches the kubelet's topology hints.
    """
    text = read_text(path)
    if text is None:
        if os.path.lexists(path):
            problems.append(f"{path.name}: unreadable or not text; NUMA node unknown")
        return None
    if not NUMBER.match(text):
        problems.append(f"{path.name}: not a number: {text[:40]!r}; NUMA node unknown")
        return None
    node = int(text)
    if node == -1:
        return None
    if not 0 <= node <= MAX_NUMA_NODE:
        problems.append(f"{path.name}: {text[:40]} is not a NUMA node (0-{MAX_NUMA_NODE}); NUMA node unknown")
        return None
    return node


def link_target_name(path: Path) -> str:
    """The last component of a sysfs symlink (``driver`` -> ``.../drivers/sfc`` gives ``sfc``)."""
    try:
        return os.path.basename(os.readlink(path).rstrip("/"))
    except OSError:
        return ""


def read_version(path: Path) -> str:
    """A module version file, or "" when absent or not a sane version string."""
    text = read_text(path)
    return text if text and VERSION.match(text) else ""


def read_interface(path: Path, problems: list[str]) -> NetInterface | None:
    name = path.name
    if not IFNAME.match(name):
        problems.append(f"interface name {name[:40]!r} is not a valid interface name; skipped")
        return None
    mac = (read_text(path / "address") or "").lower()
    if mac and not MAC.match(mac):
        problems.append(f"{name}: MAC address {mac[:40]!r} is malformed")
        mac = ""
    operstate = (read_text(path / "operstate") or "").lower()
    if operstate and not operstate.isalpha():
        problems.append(f"{name}: operstate {operstate[:40]!r} is malformed")
        operstate = ""
    carrier_value = _read_int(path / "carrier", problems)
    speed = _read_int(path / "speed", problems)
    return NetInterface(
        name=name,
        mac=mac,
        operstate=operstate,
        carrier=None if carrier_value is None else carrier_value == 1,
        speed_mbps=speed if speed is not None and speed > 0 else None,
    )


def read_function(path: Path | str, gone: Collection[str] = ()) -> PciFunction | None:
    """Everything we need from one PCI function's sysfs directory; None when it is not one.

    Interfaces whose sysfs path is in ``gone`` (a remove uevent arrived, the directory may
    linger for a moment) are left out.
    """
    path = Path(path)
    address = path.name.lower()
    if not PCI_ADDRESS.match(address):
        return None
    problems: list[str] = []
    numa = read_numa_node(path / "numa_node", problems)
    interfaces: list[NetInterface] = []
    try:
        names = sorted(os.listdir(path / "net"))
    except OSError:
        names = []
    for name in names:
        if str(path / "net" / name) in gone:
            continue
        interface = read_interface(path / "net" / name, problems)
        if interface is not None:
            interfaces.append(interface)
    return PciFunction(
        address=address,
        sys_path=str(path),
        vendor_id=(read_text(path / "vendor") or "").lower(),
        device_id=(read_text(path / "device") or "").lower(),
        driver=link_target_name(path / "driver"),
        numa_node=numa,
        interfaces=tuple(interfaces),
        problems=tuple(problems),
    )


def walk_pci(sys_root: str) -> list[Path]:
    """PCI function directories under ``sys_root/bus/pci/devices`` (no udev needed)."""
    base = Path(sys_root) / "bus" / "pci" / "devices"
    try:
        return [base / name for name in sorted(os.listdir(base))]
    except OSError:
        return []
