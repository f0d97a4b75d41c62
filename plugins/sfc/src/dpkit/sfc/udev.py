"""The pyudev side: enumerate PCI functions and wait for uevents that may change what we serve.

Enumeration only yields sysfs paths; the facts are read from those paths by
:mod:`dpkit.sfc.sysfs`, so the udev and the plain-directory code paths share one reader.
"""

from __future__ import annotations

import select
import threading
from pathlib import Path
from typing import Any

import pyudev

WATCHED_SUBSYSTEMS = ("pci", "net")


class Udev:
    """A libudev context; creating it fails with an ``ImportError``/``OSError`` when libudev is absent."""

    def __init__(self, source: str = "udev") -> None:
        self.source = source
        self.context = pyudev.Context()

    def pci_paths(self) -> list[Path]:
        """Every PCI function udev knows of (the caller filters by vendor)."""
        return sorted(Path(device.sys_path) for device in self.context.list_devices(subsystem="pci"))

    def monitor(self) -> UeventMonitor:
        return UeventMonitor(self.context, self.source)


def relevant(device: Any) -> bool:
    """Events that can change a Solarflare NIC: PCI add/remove/bind/unbind, and physical net devices.

    Virtual interfaces (veth pairs created for every pod) come and go all the time and are
    ignored, so pod churn does not trigger re-discovery.
    """
    subsystem = device.subsystem
    if subsystem == "pci":
        return True
    return subsystem == "net" and "/devices/virtual/" not in device.sys_path


class UeventMonitor:
    """A started netlink monitor for the PCI and net subsystems."""

    def __init__(self, context: pyudev.Context, source: str) -> None:
        self._monitor = pyudev.Monitor.from_netlink(context, source=source)
        for subsystem in WATCHED_SUBSYSTEMS:
            self._monitor.filter_by(subsystem)
        self._monitor.start()

    def wait(self, timeout: float, stop: threading.Event) -> list[tuple[str, str, str]]:
        """Block up to ``timeout`` for events; return every relevant one waiting, as (action, subsystem, path).

        Returns early (and empty) once ``stop`` is set; it is checked at least every 0.1 s.
        """
        deadline = timeout
        while deadline > 0 and not stop.is_set():
            step = min(0.1, deadline)
            ready, _, _ = select.select([self._monitor], [], [], step)
            deadline -= step
            if ready:
                return self._drain()
        return []

    def _drain(self) -> list[tuple[str, str, str]]:
        events: list[tuple[str, str, str]] = []
        while True:
            device = self._monitor.poll(timeout=0)
            if device is None:
                return events
            if relevant(device):
                events.append((str(device.action), str(device.subsystem), str(device.sys_path)))
