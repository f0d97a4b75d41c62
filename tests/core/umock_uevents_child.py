"""Run under umockdev-wrapper by test_uevents.py (not a test module): UeventWatcher with a real
pyudev monitor, fed testbed uevents. Reports one JSON object through umock.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from typing import Any

import umock

from dpkit.core import Uevent, UeventWatcher


class Watched:
    """A watcher on its own thread; its rescans (reason, events) are recorded."""

    def __init__(self, **options: Any) -> None:
        self.calls: list[tuple[str, list[list[str]], float]] = []
        self.cond = threading.Condition()
        self.stop, self.listening = threading.Event(), threading.Event()
        watcher = UeventWatcher(self.rescan, interval=3600, subsystems=("pci",), **options)
        self.thread = threading.Thread(target=watcher.run, args=(self.stop, self.listening))
        self.thread.start()

    def rescan(self, reason: str, events: Sequence[Uevent]) -> None:
        with self.cond:
            self.calls.append((reason, [list(e) for e in events], time.monotonic()))
            self.cond.notify_all()

    def reasons(self, settle: float, count: int = 0) -> list[str]:
        """The reasons so far, once ``count`` rescans happened (5 s at most) and ``settle`` s more passed."""
        with self.cond:
            self.cond.wait_for(lambda: len(self.calls) >= count, 5.0)
        time.sleep(settle)  # nothing may follow: waiting for an absence needs a fixed window
        with self.cond:
            return [reason for reason, _, _ in self.calls]

    def halt(self) -> float:
        started = time.monotonic()
        self.stop.set()
        self.thread.join(5)
        return time.monotonic() - started


def main() -> None:
    tb = umock.testbed()
    pci = umock.add_device(tb, "pci", "0000:3b:00.0", attributes={"vendor": "0x10de"},
                           properties={"PCI_SLOT_NAME": "0000:3b:00.0"})
    block = umock.add_device(tb, "block", "loop9")
    result: dict[str, Any] = {"path": pci}

    slow = Watched(debounce=0.3)  # a wide window, so the burst below is one however loaded the machine
    quick = Watched(accept=lambda device: device.action != "change")
    result["listening"] = slow.listening.wait(5) and quick.listening.wait(5)

    umock.uevent(tb, block, "change")
    result["filtered_out"] = slow.reasons(settle=0.6, count=1)

    for _ in range(5):
        umock.uevent(tb, pci, "bind")
    result["burst"] = slow.reasons(settle=0.6, count=2)
    result["burst_events"] = slow.calls[1][1] if len(slow.calls) > 1 else []

    before = len(quick.reasons(settle=0.3))  # quick has seen the bind burst too, in one or more rescans
    umock.uevent(tb, pci, "change")
    result["rejected_by_accept"] = len(quick.reasons(settle=0.5)) == before
    sent = time.monotonic()
    umock.uevent(tb, pci, "add")
    reasons = quick.reasons(settle=0.3, count=before + 1)
    result["accepted"] = [reasons[0], *reasons[before:]]
    result["latency_ms"] = round((quick.calls[before][2] - sent) * 1000, 1) if len(quick.calls) > before else None
    result["stopped_in_s"] = round(max(slow.halt(), quick.halt()), 3)
    umock.write_result(result)


if __name__ == "__main__":
    main()
