"""Uevent-driven rescans: a pyudev monitor wakes the watch loop the moment a device changes.

Hotplug, removal and driver re-binds arrive as ``add``/``remove``/``bind``/``unbind`` uevents on
the ``pci``, ``vfio``, ``misc`` and ``mdev`` subsystems (and ``usb`` when USB devices are served);
every burst triggers one full rescan. A timer
rescans too, for what sends no uevent (a node's permissions changing). When no monitor can be
opened (no netlink access), the timer alone keeps the view fresh, and that is logged.
"""

from __future__ import annotations

import select
import threading
import time
from collections.abc import Callable
from typing import Any

from dpkit.core import get_logger, kv

log = get_logger("kvm_vfio.watch")

SUBSYSTEMS = ("pci", "vfio", "vfio-dev", "misc", "mdev")
STOP_CHECK = 0.25  # seconds: how quickly a stop request is noticed


def open_monitor(source: str, subsystems: tuple[str, ...] = SUBSYSTEMS) -> Any | None:
    """A started pyudev monitor for ``subsystems``, or None (logged) when netlink is unavailable."""
    try:
        import pyudev

        monitor = pyudev.Monitor.from_netlink(pyudev.Context(), source=source)
        for subsystem in subsystems:
            monitor.filter_by(subsystem)
        monitor.start()
        return monitor
    except Exception as exc:  # ImportError, OSError from netlink, libudev missing...
        log.warning("no uevent monitor; rescanning on the timer only", extra=kv(source=source, error=str(exc)))
        return None


def drain(monitor: Any) -> list[str]:
    """Every uevent already queued, as ``action subsystem name`` strings."""
    events: list[str] = []
    while True:
        device = monitor.poll(timeout=0)
        if device is None:
            return events
        events.append(f"{device.action} {device.subsystem} {device.sys_name}")


def run(rescan: Callable[[str], None], stop: threading.Event, interval: float, source: str,
        listening: threading.Event | None = None, subsystems: tuple[str, ...] = SUBSYSTEMS) -> None:
    """Call ``rescan(why)`` after each burst of uevents and every ``interval`` s, until ``stop``.

    One rescan runs as soon as the monitor listens, catching changes made before it did;
    ``listening`` is set after it (also when only the timer could be had).
    """
    monitor = open_monitor(source, subsystems)
    rescan("start")
    if listening is not None:
        listening.set()
    next_timer = time.monotonic() + interval
    while not stop.is_set():  # the monitor's socket closes when it is garbage-collected
        wait = max(0.0, min(STOP_CHECK, next_timer - time.monotonic()))
        events: list[str] = []
        if monitor is not None:
            if select.select([monitor], [], [], wait)[0]:
                events = drain(monitor)
        elif wait:
            stop.wait(wait)
        if events:
            log.debug("uevents", extra=kv(events="; ".join(events[:10]), count=len(events)))
            rescan("uevent")
        elif time.monotonic() >= next_timer:
            next_timer = time.monotonic() + interval
            rescan("timer")
