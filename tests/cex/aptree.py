"""Test stand-ins for the s390 AP bus and the zcrypt driver, as plain files (never a real /sys).

:class:`ApTree` lays out ``bus/ap`` and ``devices/ap`` the way the kernel does, below any root
(a temp dir, or a umockdev testbed's ``sys``). :class:`FakeZcryptKernel` plays the zcrypt
driver's part for the ``class/zcrypt/create`` and ``destroy`` files, which stay plain files: it
reacts to each write (inotify, no polling) by making or removing
``devices/virtual/zcrypt/<name>`` and the ``/dev`` node, as the kernel and udev would.
"""

from __future__ import annotations

import json
import shutil
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from inotify_simple import INotify, flags

# ap_functions as the kernel shows them: MEX4K|CRT4K|APXA plus the mode bit (EP11 cards lack the first two)
FUNCTIONS = {"C": "0x72000000", "P": "0x06000000", "A": "0x6a000000"}
ALL_DOMAINS = range(256)


def mask(members: Iterable[int]) -> str:
    value = 0
    for i in members:
        value |= 1 << (255 - i)
    return f"0x{value:064x}"


class ApTree:
    """A fake AP bus below ``root`` (the directory that plays ``/sys``)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.bus = root / "bus" / "ap"
        self.devices = root / "devices" / "ap"
        (self.bus / "devices").mkdir(parents=True, exist_ok=True)
        self.devices.mkdir(parents=True, exist_ok=True)
        (self.bus / "ap_max_domain_id").write_text("84\n")
        (self.bus / "ap_interrupts").write_text("1\n")
        self.zcrypt_class = root / "class" / "zcrypt"
        self.zcrypt_class.mkdir(parents=True, exist_ok=True)
        for name in ("create", "destroy"):
            (self.zcrypt_class / name).write_text("")
        (root / "devices" / "virtual" / "zcrypt").mkdir(parents=True, exist_ok=True)
        self.usage_domains(ALL_DOMAINS)

    def usage_domains(self, domains: Iterable[int]) -> None:
        (self.bus / "ap_usage_domain_mask").write_text(mask(domains) + "\n")

    def _attrs(self, path: Path, attrs: dict[str, str]) -> None:
        path.mkdir(parents=True, exist_ok=True)
        for name, value in attrs.items():
            (path / name).write_text(f"{value}\n")

    def adapter(self, number: int, type: str = "CEX7C", *, functions: str | None = None, **attrs: str) -> Path:
        """Add ``cardNN``; ``attrs`` override online/config/chkstop/request_count/hwtype."""
        card = f"card{number:02x}"
        values = {"type": type, "hwtype": "13", "raw_hwtype": "13", "depth": "8",
                  "ap_functions": functions or FUNCTIONS.get(type[-1:], "0x00000000"),
                  "online": "1", "config": "1", "chkstop": "0", "request_count": "0", **attrs}
        path = self.devices / card
        self._attrs(path, values)
        (self.bus / "devices" / card).symlink_to(f"../../../devices/ap/{card}")
        return path

    def queue(self, adapter: int, domain: int, **attrs: str) -> Path:
        """Add queue ``AA.DDDD`` under its card; ``attrs`` override online/config/chkstop/request_count."""
        name = f"{adapter:02x}.{domain:04x}"
        values = {"online": "1", "config": "1", "chkstop": "0", "request_count": "0", "interrupt": "1",
                  "mkvps": "AES CUR: valid 0x1234", **attrs}
        path = self.devices / f"card{adapter:02x}" / name
        self._attrs(path, values)
        (self.bus / "devices" / name).symlink_to(f"../../../devices/ap/card{adapter:02x}/{name}")
        return path

    def path(self, name: str) -> Path:
        return self.bus / "devices" / name

    def set(self, name: str, attr: str, value: str) -> None:
        """Change one attribute of ``cardNN`` or ``AA.DDDD``."""
        (self.path(name) / attr).write_text(f"{value}\n")

    def remove(self, name: str) -> None:
        """Hot-unplug: the bus link and the device directory go."""
        target = self.path(name).resolve()
        self.path(name).unlink()
        shutil.rmtree(target)


def standard_tree(root: Path) -> ApTree:
    """Several adapters, modes, generations and domains; usage domains 5 and 6 only.

    card01, card02: CEX7C (cca, gen 7), domains 5 and 6; card03: CEX8P (ep11), domain 5;
    card04: CEX6A (accel), domain 5; card05: CEX5C (cca, gen 5), domain 5; card06: CEX7C, domain 7.
    """
    tree = ApTree(root)
    for number, type in ((1, "CEX7C"), (2, "CEX7C"), (3, "CEX8P"), (4, "CEX6A"), (5, "CEX5C"), (6, "CEX7C")):
        tree.adapter(number, type, hwtype=str(6 + int(type[3])))
    for adapter, domain in ((1, 5), (1, 6), (2, 5), (2, 6), (3, 5), (4, 5), (5, 5), (6, 7)):
        tree.queue(adapter, domain)
    tree.usage_domains((5, 6))
    return tree


# Sets over the standard tree: what each APQN exercises is noted beside it.
STANDARD_SETS: list[dict[str, Any]] = [
    {"setname": "cca-blue", "project": "blue", "cexmode": "cca", "mincexgen": "cex6", "overcommit": 2,
     "apqns": [{"adapter": 1, "domain": 5, "machineid": ""},   # advertised
               {"adapter": 2, "domain": 5},                    # advertised
               {"adapter": 1, "domain": 6},                    # advertised
               {"adapter": 5, "domain": 5}]},                  # CEX5C: generation too old
    {"setname": "ep11-red", "project": "red", "cexmode": "ep11",
     "apqns": [{"adapter": 3, "domain": 5},                    # advertised
               {"adapter": 4, "domain": 5}]},                  # CEX6A: accelerator, wrong mode
    {"setname": "any-green", "project": "green",
     "apqns": [{"adapter": 6, "domain": 7},                    # domain 7: not a usage domain
               {"adapter": 9, "domain": 5}]},                  # no card09 on this node
]


def write_sets(path: Path, sets: list[dict[str, Any]]) -> Path:
    path.write_text(json.dumps({"cryptoconfigsets": sets}, indent=2))
    return path


class FakeZcryptKernel:
    """Plays the zcrypt driver and udev for writes to ``class/zcrypt/create`` and ``destroy``."""

    def __init__(self, sysfs: Path, dev_dir: Path, *, make_dev: bool = True, honour_create: bool = True) -> None:
        self.class_dir = sysfs / "class" / "zcrypt"
        self.nodes_dir = sysfs / "devices" / "virtual" / "zcrypt"
        self.dev_dir = dev_dir
        self.make_dev = make_dev
        self.honour_create = honour_create
        self.created: list[str] = []
        self.destroyed: list[str] = []
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._inotify = INotify()
        self._thread = threading.Thread(target=self._run, name="fake-zcrypt", daemon=True)

    def __enter__(self) -> FakeZcryptKernel:
        self.dev_dir.mkdir(parents=True, exist_ok=True)
        self._inotify.add_watch(str(self.class_dir), flags.CLOSE_WRITE)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)
        self._inotify.close()

    def _run(self) -> None:
        while not self._stop.is_set():
            for event in self._inotify.read(timeout=100):
                if event.name in ("create", "destroy"):
                    name = (self.class_dir / event.name).read_text().strip()
                    if name:
                        getattr(self, f"_{event.name}")(name)

    def _create(self, name: str) -> None:
        # record the write before its effects are visible: a caller that saw the node appear
        # must also see it in ``created`` (no race between the two)
        with self._cond:
            self.created.append(name)
            self._cond.notify_all()
        if self.honour_create and not (self.nodes_dir / name).exists():
            # the kernel's device appears whole: build it aside, then rename it into place
            scratch = self.nodes_dir.parent / f".new-{name}"
            scratch.mkdir()
            for attr in ("apmask", "aqmask", "ioctlmask", "admask"):
                (scratch / attr).write_text(mask(()) + "\n")
            scratch.rename(self.nodes_dir / name)
            (self.class_dir / name).symlink_to(f"../../devices/virtual/zcrypt/{name}")
            if self.make_dev:
                (self.dev_dir / name).write_text("")
                (self.dev_dir / name).chmod(0o600)

    def _destroy(self, name: str) -> None:
        with self._cond:
            self.destroyed.append(name)
            self._cond.notify_all()
        shutil.rmtree(self.nodes_dir / name, ignore_errors=True)
        (self.class_dir / name).unlink(missing_ok=True)
        (self.dev_dir / name).unlink(missing_ok=True)

    def node(self, name: str) -> Path:
        return self.nodes_dir / name

    def wait_for(self, predicate: Callable[[FakeZcryptKernel], bool], timeout: float = 10.0) -> bool:
        deadline = time.monotonic() + timeout
        with self._cond:
            while not predicate(self):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._cond.wait(min(remaining, 0.25))
        return True
