"""Shadow sysfs: a read-only view of the AP bus that shows a container only its own APQNs.

Tools in the container (``lszcrypt``, ``ivp.e``, openCryptoki) explore ``/sys/bus/ap`` and
``/sys/devices/ap``; mounted over those, the shadow tree shows just the allocated adapters,
domains and queues, with masks to match. It is a static copy taken at allocation, counters at
0, as in IBM's plugin. With *live sysfs* each allocated queue's real directory is mounted over
its shadow copy as well, so ``online``, counters and ``mkvps`` stay current. As in IBM's plugin the
mount target is the queue's bus link, ``/sys/bus/ap/devices/AA.DDDD`` (the runtime follows it to
the shadow queue directory), and the card's ``online`` and counters link to the queue's files.

The tree is built in a scratch directory and renamed into place, so a half-made tree is
never mounted. Its root (never mounted) holds a marker naming the APQNs it shows: a key is a
device ID, which the kubelet may hand to a new container with other APQNs while the old tree
still waits out its grace period, and :func:`matches` tells the caller to rebuild it.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from dpkit.cex.apbus import ApBus, apqn_name, format_mask, read_attr
from dpkit.core import DpkitError

PREFIX = "sysfs-"
MARKER = ".apqns"  # in the tree's root: the APQNs it was built for, "01.0005,02.0005"
_KEY = re.compile(r"^apqn-[0-9]{1,3}-[0-9]{1,3}-[0-9]{1,4}$")
_BUS_FILES = ("ap_interrupts", "ap_max_domain_id", "ap_max_adapter_id", "poll_thread", "poll_timeout")
_CARD_FILES = ("ap_functions", "depth", "hwtype", "raw_hwtype", "type", "API_ordinalnr", "FW_version",
               "op_modes", "serialnr", "online", "config", "chkstop")
_QUEUE_FILES = ("interrupt", "reset", "mkvps", "op_modes", "online", "config", "chkstop")
_COUNTERS = ("load", "pendingq_count", "request_count", "requestq_count")
_LIVE_CARD_LINKS = ("online", "pendingq_count", "request_count", "requestq_count")  # -> the queue's files
CONTAINER_BUS_DEVICES = "/sys/bus/ap/devices"  # where IBM's plugin mounts a live queue


class ShadowError(DpkitError):
    """The shadow tree could not be built."""


@dataclass(frozen=True)
class ShadowTree:
    """Where a container's shadow lives, and the live queue mounts (host path, container path)."""

    root: Path
    bus_dir: Path
    devices_dir: Path
    live: tuple[tuple[str, str], ...] = ()


def _file(path: Path, text: str) -> None:
    path.write_text(text)
    path.chmod(0o444)


def _link(path: Path, target: str) -> None:
    path.symlink_to(target)


def _copy(src_dir: Path, dst_dir: Path, names: Sequence[str]) -> None:
    for name in names:
        value = read_attr(src_dir / name)
        if value is not None:
            _file(dst_dir / name, value + "\n")


def _populate(top: Path, bus: ApBus, apqns: Sequence[tuple[int, int]], live: bool) -> None:
    adapters = sorted({a for a, _ in apqns})
    domains = sorted({d for _, d in apqns})
    bus_dir, devices_dir = top / "bus" / "ap", top / "devices" / "ap"
    for d in (bus_dir / "devices", bus_dir / "drivers" / "cex4card", bus_dir / "drivers" / "cex4queue", devices_dir):
        d.mkdir(parents=True, mode=0o755)
    _copy(bus.bus_dir, bus_dir, _BUS_FILES)
    _file(bus_dir / "ap_adapter_mask", format_mask(set(adapters)) + "\n")
    _file(bus_dir / "ap_usage_domain_mask", format_mask(set(domains)) + "\n")
    _file(bus_dir / "ap_control_domain_mask", format_mask(set()) + "\n")
    _file(bus_dir / "apmask", format_mask(set(range(256))) + "\n")
    _file(bus_dir / "aqmask", format_mask(set(range(256))) + "\n")
    _file(bus_dir / "ap_domain", f"{domains[0]}\n")
    for number in adapters:
        card = f"card{number:02x}"
        card_dir = devices_dir / card
        card_dir.mkdir(mode=0o755)
        _copy(bus.adapters[number].path, card_dir, _CARD_FILES)
        for counter in _COUNTERS:
            _file(card_dir / counter, "0\n")
        if live:  # IBM's live view: the card shows its (first) queue's state and counters
            first_queue = apqn_name(number, min(d for a, d in apqns if a == number))
            for name in _LIVE_CARD_LINKS:
                (card_dir / name).unlink(missing_ok=True)
                _link(card_dir / name, f"{first_queue}/{name}")
        _link(card_dir / "driver", "../../../bus/ap/drivers/cex4card")
        _link(card_dir / "subsystem", "../../../bus/ap")
        _link(bus_dir / "devices" / card, f"../../../devices/ap/{card}")
        _link(bus_dir / "drivers" / "cex4card" / card, f"../../../../devices/ap/{card}")
    for adapter, domain in sorted(apqns):
        name, card = apqn_name(adapter, domain), f"card{adapter:02x}"
        queue_dir = devices_dir / card / name
        queue_dir.mkdir(mode=0o755)
        _copy(bus.queues[(adapter, domain)].path, queue_dir, _QUEUE_FILES)
        for counter in _COUNTERS:
            _file(queue_dir / counter, "0\n")
        _link(queue_dir / "driver", "../../../../bus/ap/drivers/cex4queue")
        _link(queue_dir / "subsystem", "../../../../bus/ap")
        _link(bus_dir / "devices" / name, f"../../../devices/ap/{card}/{name}")
        _link(bus_dir / "drivers" / "cex4queue" / name, f"../../../../devices/ap/{card}/{name}")


def layout(base: str | Path, key: str, apqns: Sequence[tuple[int, int]], *, live: bool,
           bus_dir: str | Path, devices_dir: str | Path | None = None) -> ShadowTree:
    """Where ``key``'s tree lives and, with live sysfs, which real queue directories go over it.

    A live queue's host path is ``<devices_dir>/cardAA/AA.DDDD`` when ``devices_dir`` (IBM's
    ``APSYSFS_DEVSDIR``) is given, else wherever the bus's link ``<bus_dir>/devices/AA.DDDD``
    leads (the same place on a real kernel); its container path is IBM's
    ``/sys/bus/ap/devices/AA.DDDD``. Builds nothing.
    """
    if not _KEY.match(key):
        raise ShadowError(f"invalid shadow key {key!r}")
    root = Path(base) / f"{PREFIX}{key}"

    def host(adapter: int, domain: int) -> str:
        if devices_dir is not None:
            return str(Path(devices_dir) / f"card{adapter:02x}" / apqn_name(adapter, domain))
        return os.path.realpath(Path(bus_dir) / "devices" / apqn_name(adapter, domain))

    mounts = tuple((host(a, d), f"{CONTAINER_BUS_DEVICES}/{apqn_name(a, d)}")
                   for a, d in sorted(set(apqns))) if live else ()
    return ShadowTree(root, root / "bus" / "ap", root / "devices" / "ap", mounts)


def _apqn_list(apqns: Sequence[tuple[int, int]]) -> str:
    return ",".join(apqn_name(a, d) for a, d in sorted(set(apqns)))


def build(base: str | Path, key: str, bus: ApBus, apqns: Sequence[tuple[int, int]], *, live: bool,
          devices_dir: str | Path | None = None) -> ShadowTree:
    """(Re)build ``<base>/sysfs-<key>`` for ``apqns``, which must all be on ``bus``.

    ``devices_dir`` as for :func:`layout`.
    """
    missing = [apqn_name(a, d) for a, d in apqns if (a, d) not in bus.queues]
    if not apqns or missing:
        raise ShadowError(f"cannot shadow APQN(s) not on the AP bus: {', '.join(missing) or 'none given'}")
    tree = layout(base, key, apqns, live=live, bus_dir=bus.bus_dir, devices_dir=devices_dir)
    base = Path(base)
    try:
        base.mkdir(parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(prefix=f".{PREFIX}", dir=base))
        scratch.chmod(0o755)
    except OSError as exc:
        raise ShadowError(f"cannot create a shadow sysfs in {base}: {exc.strerror or exc}") from None
    old: Path | None = None
    try:
        _populate(scratch, bus, apqns, live)
        _file(scratch / MARKER, _apqn_list(apqns) + "\n")
        if tree.root.exists() or tree.root.is_symlink():  # set the old tree aside whole, then swap
            old = Path(tempfile.mkdtemp(prefix=f".old-{PREFIX}", dir=base))
            os.rename(tree.root, old / "tree")
        os.rename(scratch, tree.root)
    except OSError as exc:
        shutil.rmtree(scratch, ignore_errors=True)
        if old is not None and not tree.root.exists():  # put the old tree back rather than none
            with contextlib.suppress(OSError):
                os.rename(old / "tree", tree.root)
        raise ShadowError(f"cannot build shadow sysfs {tree.root}: {exc.strerror or exc}") from None
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    return tree


def matches(base: str | Path, key: str, apqns: Sequence[tuple[int, int]]) -> bool:
    """Whether ``key``'s tree exists and was built for exactly ``apqns``."""
    try:
        built_for = (Path(base) / f"{PREFIX}{key}" / MARKER).read_text().strip()
    except (OSError, UnicodeDecodeError):
        return False  # no tree, or one without a marker (an earlier version's, IBM's)
    return built_for == _apqn_list(apqns)


def exists(base: str | Path, key: str) -> bool:
    return (Path(base) / f"{PREFIX}{key}").is_dir()


def remove(base: str | Path, key: str) -> None:
    if _KEY.match(key):
        shutil.rmtree(Path(base) / f"{PREFIX}{key}", ignore_errors=True)


def keys(base: str | Path) -> list[str]:
    """Keys of the shadow trees present (ours, or an earlier run's)."""
    try:
        names = os.listdir(base)
    except OSError:
        return []
    return sorted(n[len(PREFIX):] for n in names if n.startswith(PREFIX) and _KEY.match(n[len(PREFIX):]))
