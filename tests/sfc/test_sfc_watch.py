"""The uevent loop's bookkeeping, with a scripted monitor: removal hints, settling, resync, stop."""

from __future__ import annotations

import threading
from collections.abc import Collection
from typing import Any

import pytest

from dpkit.core.vendorapi.device import Device
from dpkit.sfc import watch
from dpkit.sfc.watch import follow_uevents

NET, PCI = "/sys/devices/pci0000:00/0000:03:00.0/net/ens3f0", "/sys/devices/pci0000:00/0000:03:00.0"
Batch = list[tuple[str, str, str]]


class ScriptedMonitor:
    """Hands out event batches in order; ``None`` lets the timeout pass; then stops the loop."""

    def __init__(self, script: list[Batch | None], stop: threading.Event) -> None:
        self.script = script
        self.stop = stop

    def wait(self, timeout: float, stop: threading.Event) -> Batch:
        if not self.script:
            self.stop.set()
            return []
        step = self.script.pop(0)
        if step is None:
            stop.wait(timeout + 0.005)  # a timer may fire a hair early; the loop must see it due
            return []
        return step


class Recorder:
    def __init__(self) -> None:
        self.calls: list[set[str]] = []
        self.sent: list[Any] = []

    def discover(self, gone: Collection[str]) -> Any:
        self.calls.append(set(gone))
        return {"solarflare.com/sfc": tuple(Device(f"d{n}") for n in range(len(gone)))}

    def snapshot(self, snapshot: Any) -> None:
        self.sent.append(len(snapshot["solarflare.com/sfc"]))

    def health(self, *args: Any) -> None:
        raise AssertionError("only snapshots are published")


@pytest.fixture(autouse=True)
def quick_settle(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(watch, "SETTLE_DELAY", 0.01)


def run(script: list[Batch | None], resync: float = 3600.0) -> Recorder:
    recorder, stop = Recorder(), threading.Event()
    thread = threading.Thread(target=follow_uevents,
                              args=(ScriptedMonitor(script, stop), recorder.discover, recorder, stop, resync))
    thread.start()
    thread.join(10)
    assert not thread.is_alive(), "the loop did not end when stop was set"
    return recorder


def test_removed_paths_are_skipped_until_the_settling_discovery() -> None:
    recorder = run([
        [("remove", "net", NET), ("remove", "pci", PCI)],  # announced while the directories still exist
        None,  # settle delay passes: one more discovery, still skipping them, then the hint is dropped
        [("remove", "pci", PCI), ("add", "pci", PCI)],  # re-inserted within one burst: not skipped
        None,
    ])
    assert recorder.calls == [set(), {NET, PCI}, {NET, PCI}, set(), set()]
    assert recorder.sent == [0, 2, 0]  # only answers that differ from the last one are published


def test_resync_without_events() -> None:
    recorder = run([None, None, None], resync=0.01)
    assert recorder.calls == [set(), set(), set(), set()]
    assert recorder.sent == [0]


def test_link_messages_rediscover_and_settle_without_touching_removals() -> None:
    recorder = run([
        [("remove", "net", NET)],
        [("newlink", "rtnetlink", "ens3f0"), ("overrun", "rtnetlink", "")],  # link down: no uevent, rtnetlink
        None,
    ])
    assert recorder.calls == [set(), {NET}, {NET}, {NET}]  # the link burst neither adds nor drops removals
