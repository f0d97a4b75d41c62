"""The removal hints the watch loop keeps between discoveries: removal, settling, resync, link bursts.

The rescan is called the way the core's UeventWatcher calls it (reason, events); the watcher's own
timing (bursts, settle delay, timer, stop) is tested in tests/core/test_uevents.py.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

from dpkit.core import Uevent
from dpkit.core.vendorapi.device import Device
from dpkit.sfc.udev import RemovalHints

NET, PCI = "/sys/devices/pci0000:00/0000:03:00.0/net/ens3f0", "/sys/devices/pci0000:00/0000:03:00.0"
Batch = list[tuple[str, str, str]]


class Recorder:
    def __init__(self) -> None:
        self.calls: list[set[str]] = []
        self.sent: list[Any] = []
        self.last: Any = None

    def discover(self, gone: Collection[str]) -> Any:
        self.calls.append(set(gone))
        return {"solarflare.com/sfc": tuple(Device(f"d{n}") for n in range(len(gone)))}

    def publish(self, snapshot: Any) -> None:  # what the watcher does with the answer
        if snapshot != self.last:
            self.sent.append(len(snapshot["solarflare.com/sfc"]))
            self.last = snapshot


def run(script: list[Batch | str]) -> Recorder:
    """``script``: event batches (a burst), or a reason the watcher rescans for without events."""
    recorder = Recorder()
    hints = RemovalHints(recorder.discover)
    recorder.publish(hints("start", ()))
    for step in script:
        if isinstance(step, str):
            recorder.publish(hints(step, ()))
        else:
            recorder.publish(hints("uevent", [Uevent(*event) for event in step]))
    return recorder


def test_removed_paths_are_skipped_until_the_settling_discovery() -> None:
    recorder = run([
        [("remove", "net", NET), ("remove", "pci", PCI)],  # announced while the directories still exist
        "settle",  # settle delay passes: one more discovery, still skipping them, then the hint is dropped
        [("remove", "pci", PCI), ("add", "pci", PCI)],  # re-inserted within one burst: not skipped
        "settle",
    ])
    assert recorder.calls == [set(), {NET, PCI}, {NET, PCI}, set(), set()]
    assert recorder.sent == [0, 2, 0]  # only answers that differ from the last one are published


def test_resync_without_events() -> None:
    recorder = run(["timer", "timer", "timer"])
    assert recorder.calls == [set(), set(), set(), set()]
    assert recorder.sent == [0]


def test_link_messages_rediscover_and_settle_without_touching_removals() -> None:
    recorder = run([
        [("remove", "net", NET)],
        [("newlink", "rtnetlink", "ens3f0"), ("overrun", "rtnetlink", "")],  # link down: no uevent, rtnetlink
        "settle",
    ])
    assert recorder.calls == [set(), {NET}, {NET}, {NET}]  # the link burst neither adds nor drops removals


def test_a_timer_before_the_settling_discovery_keeps_the_hints() -> None:
    recorder = run([[("remove", "pci", PCI)], "timer", "settle", "timer"])
    assert recorder.calls == [set(), {PCI}, {PCI}, {PCI}, set()]
