"""Level-triggered device state waiting for the manager: the latest report wins, nothing queues.

Watch threads write here instead of into a message queue. A health report for a device
replaces that source's previous report in O(1); a snapshot replaces the previous unconsumed
snapshot. The manager takes everything in one swap per loop pass, so a burst of a million
reports about a thousand devices costs a thousand entries, never drops the last word about a
device, and never holds more than one entry per (resource, device, source).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from dpkit.core.vendorapi.device import Health, Snapshot

ReportKey = tuple[str, str, str]  # (resource, device_id, source)
Report = tuple[Health, str]  # (health, reason)


@dataclass
class Pending:
    """What accumulated since the manager's last pass."""

    snapshot: tuple[str, Snapshot] | None = None
    reports: dict[ReportKey, Report] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return self.snapshot is not None or bool(self.reports)


class HealthBoard:
    """Thread-safe holding area between in-process watchers and the manager loop.

    ``wake`` is called once per batch (the first write after a :meth:`take`), so a burst costs
    one wake-up of the manager, not one per report.
    """

    def __init__(self, wake: Callable[[], None]) -> None:
        self._wake = wake
        self._lock = threading.Lock()
        self._pending = Pending()
        self._woken = False
        self.reports_received = 0
        self.reports_coalesced = 0

    def report(self, source: str, resource: str, device_id: str, health: Health, reason: str) -> None:
        key = (resource, device_id, source)
        with self._lock:
            self.reports_received += 1
            if key in self._pending.reports:
                self.reports_coalesced += 1
            self._pending.reports[key] = (health, reason)
            wake = self._mark()
        if wake:
            self._wake()

    def offer_snapshot(self, source: str, snapshot: Snapshot) -> None:
        with self._lock:
            self._pending.snapshot = (source, snapshot)
            wake = self._mark()
        if wake:
            self._wake()

    def take(self) -> Pending:
        """Everything since the last call, in one swap; the next write wakes the manager again."""
        with self._lock:
            pending, self._pending = self._pending, Pending()
            self._woken = False
        return pending

    def _mark(self) -> bool:
        if self._woken:
            return False
        self._woken = True
        return True
