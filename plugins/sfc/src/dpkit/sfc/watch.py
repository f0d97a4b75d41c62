"""The uevent loop: one fresh discovery per burst of uevents, one more once things settle.

The kernel sends a ``remove`` uevent while the sysfs directory still exists, and a bound driver
creates its netdev a moment after ``bind``, so a discovery right at the event can see a
half-done change. Two things cover that: paths announced as removed are skipped by the
discoveries until the settling one has run, and that second discovery comes ``SETTLE_DELAY``
after the last event and sees the finished result.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Collection

from dpkit.core import EventSink, Snapshot, get_logger, kv
from dpkit.sfc.udev import UeventMonitor

log = get_logger("sfc.watch")

#: seconds after the last uevent before the settling discovery
SETTLE_DELAY = 0.2


def follow_uevents(monitor: UeventMonitor, discover: Callable[[Collection[str]], Snapshot], sink: EventSink,
                   stop: threading.Event, resync_interval: float) -> None:
    """Publish a snapshot whenever discovery's answer changes, until ``stop`` is set.

    ``discover(gone)`` runs on every burst of relevant uevents, ``SETTLE_DELAY`` after the
    last one, and every ``resync_interval`` seconds in any case.
    """
    last = discover(frozenset())  # what changed between the first discovery and the monitor start
    sink.snapshot(last)
    resync_at = time.monotonic() + resync_interval
    settle_at: float | None = None
    gone: set[str] = set()
    while not stop.is_set():
        due = resync_at if settle_at is None else min(resync_at, settle_at)
        events = monitor.wait(max(0.0, due - time.monotonic()), stop)
        if stop.is_set():
            return
        now = time.monotonic()
        if events:
            for action, subsystem, path in events:
                log.debug("uevent", extra=kv(action=action, subsystem=subsystem, path=path))
                if action == "remove":
                    gone.add(path)
                elif action == "add":
                    gone.discard(path)
            settle_at = now + SETTLE_DELAY
        elif now < due:
            continue  # woken by irrelevant events only (virtual interfaces)
        current = discover(gone)
        if not events and settle_at is not None and now >= settle_at:
            settle_at = None
            gone.clear()
        resync_at = time.monotonic() + resync_interval
        if current != last:
            sink.snapshot(current)
            last = current
