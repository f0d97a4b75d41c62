"""The pyudev side: enumerate PCI functions and wait for events that may change what we serve.

Enumeration only yields sysfs paths; the facts are read from those paths by
:mod:`dpkit.sfc.sysfs`, so the udev and the plain-directory code paths share one reader.
Uevents cover add/remove/bind/unbind; link state (carrier, operstate) changes send no uevent
and come from rtnetlink (:mod:`dpkit.sfc.rtnl`), watched in the same ``select``.
"""

from __future__ import annotations

import select
import threading
import time
from collections.abc import Collection
from pathlib import Path
from typing import Any

import pyudev

from dpkit.core import get_logger
from dpkit.sfc.rtnl import LinkMonitor

log = get_logger("sfc.udev")
WATCHED_SUBSYSTEMS = ("pci", "net")
_links_warned = False


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
    """A started netlink monitor for the PCI and net subsystems, plus rtnetlink for link state.

    When the rtnetlink socket cannot be opened, this is logged once (per process) and link
    changes are seen only by the caller's periodic re-discovery; ``links_error`` says why.
    """

    def __init__(self, context: pyudev.Context, source: str, link_kinds: Collection[str] = ()) -> None:
        self._monitor = pyudev.Monitor.from_netlink(context, source=source)
        for subsystem in WATCHED_SUBSYSTEMS:
            self._monitor.filter_by(subsystem)
        self._monitor.start()
        self._links: LinkMonitor | None = None
        self.links_error = ""
        try:
            self._links = LinkMonitor(link_kinds)
        except OSError as exc:
            self._links_failed(f"cannot open an rtnetlink socket ({exc})")
        except ImportError as exc:  # pyroute2 missing from a hand-built image
            self._links_failed(f"cannot decode rtnetlink without pyroute2 ({exc})")

    def _links_failed(self, reason: str) -> None:
        global _links_warned
        self.links_error = f"{reason}; link up/down is seen only by the periodic resync"
        if not _links_warned:
            _links_warned = True
            log.warning(self.links_error)

    def wait(self, timeout: float, stop: threading.Event) -> list[tuple[str, str, str]]:
        """Block up to ``timeout`` for events; return every relevant one waiting, as (action, subsystem, path).

        Uevents give (action, ``pci``/``net``, sysfs path); link changes give (``newlink``/
        ``dellink``/``overrun``, ``rtnetlink``, interface name). Irrelevant events (virtual
        interfaces) are consumed and the wait goes on. Returns early (and empty) once ``stop``
        is set; it is checked at least every 0.1 s.
        """
        deadline = time.monotonic() + timeout
        while not stop.is_set():
            left = deadline - time.monotonic()
            if left <= 0:
                return []
            sources: list[Any] = [self._monitor] if self._links is None else [self._monitor, self._links]
            ready, _, _ = select.select(sources, [], [], min(0.1, left))
            if ready:
                events = self._drain() + self._drain_links()
                if events:
                    return events
        return []

    def _drain(self) -> list[tuple[str, str, str]]:
        events: list[tuple[str, str, str]] = []
        while True:
            device = self._monitor.poll(timeout=0)
            if device is None:
                return events
            if relevant(device):
                events.append((str(device.action), str(device.subsystem), str(device.sys_path)))

    def _drain_links(self) -> list[tuple[str, str, str]]:
        if self._links is None:
            return []
        try:
            return self._links.drain()
        except OSError as exc:  # a broken socket would stay readable: drop it rather than spin
            self._links.close()
            self._links = None
            self._links_failed(f"rtnetlink socket failed ({exc})")
            return [("overrun", "rtnetlink", "")]

    def close(self) -> None:
        if self._links is not None:
            self._links.close()
            self._links = None
