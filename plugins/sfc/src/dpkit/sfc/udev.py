"""The pyudev side: enumerate PCI functions, and decide which events may change what we serve.

Enumeration only yields sysfs paths; the facts are read from those paths by
:mod:`dpkit.sfc.sysfs`, so the udev and the plain-directory code paths share one reader.
Uevents cover add/remove/bind/unbind; link state (carrier, operstate) changes send no uevent
and come from rtnetlink (:mod:`dpkit.sfc.rtnl`), watched in the same wait by the core's
:class:`~dpkit.core.UeventWatcher`.

The kernel sends a ``remove`` uevent while the sysfs directory still exists, and a bound driver
creates its netdev a moment after ``bind``, so a discovery right at the event can see a
half-done change. Two things cover that: paths announced as removed are skipped by the
discoveries until the settling one has run (:class:`RemovalHints`), and that second discovery
comes ``SETTLE_DELAY`` after the last event and sees the finished result.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from pathlib import Path
from typing import Any

import pyudev

from dpkit.core import Snapshot, Uevent

WATCHED_SUBSYSTEMS = ("pci", "net")
#: seconds after the last uevent before the settling discovery
SETTLE_DELAY = 0.2


class Udev:
    """A libudev context; creating it fails with an ``ImportError``/``OSError`` when libudev is absent."""

    def __init__(self) -> None:
        self.context = pyudev.Context()

    def pci_paths(self) -> list[Path]:
        """Every PCI function udev knows of (the caller filters by vendor)."""
        return sorted(Path(device.sys_path) for device in self.context.list_devices(subsystem="pci"))


def relevant(device: Any) -> bool:
    """Events that can change a Solarflare NIC: PCI add/remove/bind/unbind, and physical net devices.

    Virtual interfaces (veth pairs created for every pod) come and go all the time and are
    ignored, so pod churn does not trigger re-discovery.
    """
    subsystem = device.subsystem
    if subsystem == "pci":
        return True
    return subsystem == "net" and "/devices/virtual/" not in device.sys_path


class RemovalHints:
    """The watcher's rescan: ``discover(gone)``, where ``gone`` holds the paths announced as removed.

    A path stays in ``gone`` until the settling discovery has run (an ``add`` takes it out
    earlier); link messages neither add nor drop any.
    """

    def __init__(self, discover: Callable[[Collection[str]], Snapshot]) -> None:
        self.discover = discover
        self.gone: set[str] = set()

    def __call__(self, reason: str, events: Sequence[Uevent]) -> Snapshot:
        for action, _, path in events:
            if action == "remove":
                self.gone.add(path)
            elif action == "add":
                self.gone.discard(path)
        snapshot = self.discover(frozenset(self.gone))
        if reason == "settle":
            self.gone.clear()
        return snapshot
