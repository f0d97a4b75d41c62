"""Read the s390 AP bus from sysfs: adapters (``cardNN``), queues (``NN.DDDD``), usage domains.

Everything is read below a configurable sysfs root (``/sys`` in production, a temp dir or a
umockdev testbed in tests) through the bus's device links, so the layout under ``devices/``
does not matter. Nothing read here is trusted: a name that does not parse, an attribute with
garbage, a device vanishing mid-scan each become a *problem* (why an adapter or queue cannot be
used) or a scan note, never an exception.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from dpkit.core import get_logger, kv

log = get_logger("cex.apbus")

_CARD = re.compile(r"^card([0-9a-f]{2})$")
_QUEUE = re.compile(r"^([0-9a-f]{2})\.([0-9a-f]{4})$")
_TYPE = re.compile(r"^CEX([0-9]{1,2})([ACP])$")
_TYPE_MODES = {"A": "accel", "C": "cca", "P": "ep11"}
# AP function facility bits (kernel ap_bus.h), counted from the most significant bit.
_FUNC_BITS = (("ep11", 5), ("accel", 4), ("cca", 3))
# hwtype -> generation for cards whose ``type`` attribute is unreadable (AP_DEVICE_TYPE_CEX4..8)
_HWTYPE_GEN = {10: 4, 11: 5, 12: 6, 13: 7, 14: 8}
MAX_DOMAIN = 255


def read_attr(path: Path) -> str | None:
    """One sysfs attribute, stripped; None when missing, vanished or unreadable."""
    try:
        with open(path, "rb") as f:
            data = f.read(4096)
    except OSError:
        return None
    return data.decode("ascii", errors="replace").strip()


def _state_problems(path: Path, what: str) -> tuple[str, ...]:
    """Why a card or queue cannot be used, from its online / config / chkstop attributes."""
    problems = []
    online = read_attr(path / "online")
    if online is None:
        problems.append(f"{what} has no readable online attribute (vanished?)")
    elif online == "0":
        problems.append(f"{what} is offline")
    elif online != "1":
        problems.append(f"{what} online attribute holds {online[:20]!r}, not 0 or 1")
    config = read_attr(path / "config")  # absent on kernels before 5.10: no answer, no problem
    if config == "0":
        problems.append(f"{what} is configured off (config=0)")
    elif config not in (None, "1"):
        problems.append(f"{what} config attribute holds {config[:20]!r}, not 0 or 1")
    chkstop = read_attr(path / "chkstop")
    if chkstop == "1":
        problems.append(f"{what} is checkstopped")
    elif chkstop not in (None, "0"):
        problems.append(f"{what} chkstop attribute holds {chkstop[:20]!r}, not 0 or 1")
    return tuple(problems)


def _mode_from_functions(text: str | None) -> str | None:
    if text is None:
        return None
    try:
        functions = int(text, 16)
    except ValueError:
        return None
    for mode, bit in _FUNC_BITS:
        if functions & (0x80000000 >> bit):
            return mode
    return None


@dataclass(frozen=True)
class Adapter:
    """A crypto card; ``gen``/``mode`` None when sysfs did not say (it is then not advertised)."""

    number: int
    path: Path
    type: str
    gen: int | None
    mode: str | None
    problems: tuple[str, ...]

    @property
    def name(self) -> str:
        return f"card{self.number:02x}"

    @property
    def gen_name(self) -> str:
        return f"cex{self.gen}" if self.gen is not None else "unknown"


@dataclass(frozen=True)
class Queue:
    """An APQN: one domain of one adapter."""

    adapter: int
    domain: int
    path: Path
    problems: tuple[str, ...]

    @property
    def name(self) -> str:
        return apqn_name(self.adapter, self.domain)


def apqn_name(adapter: int, domain: int) -> str:
    """The kernel's (and lszcrypt's) spelling of an APQN: ``01.0005``."""
    return f"{adapter:02x}.{domain:04x}"


@dataclass(frozen=True)
class ApBus:
    """One scan of the AP bus. ``usage_domains`` is None when the mask could not be read."""

    root: Path
    present: bool
    adapters: dict[int, Adapter]
    queues: dict[tuple[int, int], Queue]
    usage_domains: frozenset[int] | None
    notes: tuple[str, ...]
    bus_dir: Path = Path("/sys/bus/ap")

    def request_count(self, queue: Queue) -> int | None:
        """The queue's ``request_count`` (requests processed), None when unreadable."""
        text = read_attr(queue.path / "request_count")
        return int(text) if text is not None and text.isdigit() else None


def parse_mask(text: str | None, bits: int = 256) -> frozenset[int] | None:
    """A sysfs 256-bit mask (``0x`` + hex, bit 0 is the most significant) -> set bit numbers."""
    if text is None:
        return None
    digits = text[2:] if text.lower().startswith("0x") else text
    if not digits or len(digits) > bits // 4 or not re.fullmatch(r"[0-9a-fA-F]+", digits):
        return None
    value = int(digits, 16)
    width = len(digits) * 4
    return frozenset(i for i in range(width) if value >> (width - 1 - i) & 1)


def format_mask(members: set[int] | frozenset[int], bits: int = 256) -> str:
    """The inverse of :func:`parse_mask`: ``0x`` and ``bits/4`` hex digits."""
    value = 0
    for i in members:
        if not 0 <= i < bits:
            raise ValueError(f"bit {i} outside a {bits}-bit mask")
        value |= 1 << (bits - 1 - i)
    return f"0x{value:0{bits // 4}x}"


def _adapter(number: int, path: Path) -> Adapter:
    what = f"adapter card{number:02x}"
    type_text = read_attr(path / "type") or ""
    match = _TYPE.match(type_text)
    gen = int(match.group(1)) if match else None
    if gen is None:
        hwtype = read_attr(path / "hwtype")
        gen = _HWTYPE_GEN.get(int(hwtype)) if hwtype is not None and hwtype.isdigit() else None
    mode = _mode_from_functions(read_attr(path / "ap_functions"))
    if mode is None and match:
        mode = _TYPE_MODES.get(match.group(2))
    return Adapter(number, path, type_text[:16], gen, mode, _state_problems(path, what))


def scan(root: str | Path, bus_dir: str | Path | None = None) -> ApBus:
    """Scan ``bus_dir`` (default ``<root>/bus/ap``; IBM's ``APSYSFS_BUSDIR``); never raises for what sysfs holds."""
    root = Path(root)
    bus = Path(bus_dir) if bus_dir is not None else root / "bus" / "ap"
    notes: list[str] = []
    try:
        names = sorted(os.listdir(bus / "devices"))
    except OSError as exc:
        present = bus.is_dir()
        if present:
            notes.append(f"cannot list {bus / 'devices'}: {exc.strerror or exc}")
        return ApBus(root, present, {}, {}, None, tuple(notes), bus)
    adapters: dict[int, Adapter] = {}
    queue_names: list[tuple[int, int, str]] = []
    for name in names:
        card = _CARD.match(name)
        queue = _QUEUE.match(name)
        if card:
            adapters[int(card.group(1), 16)] = _adapter(int(card.group(1), 16), bus / "devices" / name)
        elif queue:
            queue_names.append((int(queue.group(1), 16), int(queue.group(2), 16), name))
        else:
            notes.append(f"ignored unexpected AP bus entry {name[:40]!r}")
    queues: dict[tuple[int, int], Queue] = {}
    for adapter, domain, name in queue_names:
        if domain > MAX_DOMAIN:
            notes.append(f"ignored queue {name}: domain {domain} is above {MAX_DOMAIN}")
            continue
        if adapter not in adapters:
            notes.append(f"ignored queue {name}: its adapter card{adapter:02x} is not on the bus")
            continue
        path = bus / "devices" / name
        queues[(adapter, domain)] = Queue(adapter, domain, path, _state_problems(path, f"APQN {name}"))
    mask_text = read_attr(bus / "ap_usage_domain_mask")
    usage = parse_mask(mask_text)
    if usage is None:
        notes.append("ap_usage_domain_mask is missing or unreadable"
                     + (f" ({mask_text[:70]!r})" if mask_text else "") + "; not filtering by usage domain")
    if notes:
        log.debug("AP bus scan notes", extra=kv(notes="; ".join(notes)))
    return ApBus(root, True, adapters, queues, usage, tuple(notes), bus)
