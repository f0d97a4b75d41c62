"""The core's UeventWatcher: bursts, wake, settle, timer fallback, failing rescans and sources, stop.

Events come from a real socket (a datagram socketpair given as an extra source, the way sfc
gives its rtnetlink socket) or, under umockdev, from a real pyudev monitor fed testbed uevents
(umock_uevents_child.py). The host's own uevents never reach these tests: in-process watchers
open no monitor (``listen=False``) unless one is refused on purpose.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import umock

from dpkit.core import Uevent, UeventWatcher
from dpkit.core.support import uevents

HERE = Path(__file__).parent


class PairSource:
    """An extra event source over a real datagram socketpair: one ``action subsystem path`` per datagram."""

    def __init__(self) -> None:
        self.reader, self.writer = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.reader.setblocking(False)
        self.closed = False
        self.fail: OSError | None = None

    def send(self, action: str, path: str = "/sys/devices/x") -> None:
        self.writer.send(f"{action} test {path}".encode())

    def fileno(self) -> int:
        return self.reader.fileno()

    def drain(self) -> list[tuple[str, str, str]]:
        if self.fail is not None:
            raise self.fail
        events: list[tuple[str, str, str]] = []
        while True:
            try:
                action, subsystem, path = self.reader.recv(4096).decode().split(" ", 2)
            except BlockingIOError:
                return events
            events.append((action, subsystem, path))

    def close(self) -> None:
        self.closed = True
        self.reader.close()


class Rescans:
    """Records each rescan (reason, events, when); ``results`` are returned in turn (an exception is raised)."""

    def __init__(self, results: Sequence[Any] = ()) -> None:
        self.calls: list[tuple[str, tuple[Uevent, ...], float]] = []
        self.results = list(results)
        self.cond = threading.Condition()

    def __call__(self, reason: str, events: Sequence[Uevent]) -> Any:
        with self.cond:
            self.calls.append((reason, tuple(events), time.monotonic()))
            self.cond.notify_all()
        result = self.results.pop(0) if self.results else None
        if isinstance(result, Exception):
            raise result
        return result

    def reasons(self) -> list[str]:
        with self.cond:
            return [reason for reason, _, _ in self.calls]

    def wait_for(self, predicate: Callable[[list[str]], bool], timeout: float = 5.0) -> bool:
        with self.cond:
            return self.cond.wait_for(lambda: predicate([r for r, _, _ in self.calls]), timeout)

    def wait_calls(self, count: int) -> bool:
        return self.wait_for(lambda reasons: len(reasons) == count)


class Sink:
    def __init__(self) -> None:
        self.snapshots: list[Any] = []

    def snapshot(self, snapshot: Any) -> None:
        self.snapshots.append(snapshot)

    def health(self, *args: Any) -> None:
        raise AssertionError("only snapshots are published")


class Running:
    def __init__(self, watcher: UeventWatcher) -> None:
        self.watcher, self.stop, self.listening = watcher, threading.Event(), threading.Event()
        self.thread = threading.Thread(target=watcher.run, args=(self.stop, self.listening), daemon=True)

    def halt(self, within: float = 2.0) -> float:
        """Set stop; how long the watcher took to return (it must within ``within`` s)."""
        started = time.monotonic()
        self.stop.set()
        self.thread.join(within)
        assert not self.thread.is_alive(), f"the watcher did not stop within {within} s"
        return time.monotonic() - started


@pytest.fixture
def run() -> Iterator[Callable[..., Running]]:
    started: list[Running] = []

    def start(rescan: Rescans, **options: Any) -> Running:
        options.setdefault("interval", 3600.0)
        options.setdefault("listen", False)
        running = Running(UeventWatcher(rescan, **options))
        running.thread.start()
        started.append(running)
        assert running.listening.wait(5), "the first rescan never ran"
        return running

    yield start
    for running in started:
        running.halt(5.0)


def test_a_burst_is_debounced_into_one_rescan(run: Callable[..., Running]) -> None:
    source, rescans = PairSource(), Rescans()
    run(rescans, sources=[source], debounce=0.5)  # a generous window: a loaded machine still sends within it
    for n in range(20):
        source.send("add", f"/sys/devices/d{n}")
    assert rescans.wait_for(lambda r: r == ["start", "uevent"])
    assert not rescans.wait_for(lambda r: len(r) > 2, timeout=1.0)  # nothing else followed
    assert [e.path for e in rescans.calls[1][1]] == [f"/sys/devices/d{n}" for n in range(20)]
    assert rescans.calls[1][1][0] == Uevent("add", "test", "/sys/devices/d0")


def test_an_event_causes_a_rescan_at_once_and_the_timer_waits(run: Callable[..., Running]) -> None:
    source, rescans = PairSource(), Rescans()
    run(rescans, sources=[source])  # default debounce, timer an hour away
    sent = time.monotonic()
    source.send("remove")
    assert rescans.wait_for(lambda r: r == ["start", "uevent"])
    latency = rescans.calls[1][2] - sent
    print(f"event -> rescan: {latency * 1000:.1f} ms (debounce {uevents.DEBOUNCE * 1000:g} ms)")
    assert latency < 1.0


def test_a_flood_still_gets_rescans_while_it_lasts(run: Callable[..., Running]) -> None:
    source, rescans = PairSource(), Rescans()
    run(rescans, sources=[source], debounce=0.1)  # a burst ends at most 1 s after its first event
    flood_end = time.monotonic() + 2.5
    sent = 0
    while time.monotonic() < flood_end:
        source.send("change")
        sent += 1
        time.sleep(0.02)
    assert rescans.wait_for(lambda r: r.count("uevent") >= 2)
    first_rescan = rescans.calls[1][2]
    assert first_rescan < flood_end, "no rescan until the flood ended"
    assert rescans.wait_for(lambda r: sum(len(e) for _, e, _ in rescans.calls) == sent)  # every event delivered
    assert rescans.reasons().count("uevent") < sent / 4  # coalesced, not one rescan per event


def test_stop_returns_within_two_seconds_and_closes_the_sources(run: Callable[..., Running]) -> None:
    source, rescans = PairSource(), Rescans()
    running = run(rescans, sources=[source])
    took = running.halt(within=2.0)
    assert took < 2.0 and source.closed
    assert rescans.reasons() == ["start"]
    running.watcher.wake()  # after the watcher ended: nothing to wake, no error


def test_a_failing_rescan_is_logged_rate_limited_and_the_loop_goes_on(
        run: Callable[..., Running], caplog: pytest.LogCaptureFixture) -> None:
    source, sink = PairSource(), Sink()
    rescans = Rescans([RuntimeError("sysfs exploded")] * 8 + [{"r": ()}])
    caplog.set_level(logging.ERROR, logger="dpkit")
    run(rescans, sources=[source], sink=sink, debounce=0)
    for n in range(8):
        source.send("change")
        assert rescans.wait_calls(n + 2), rescans.reasons()
    assert sink.snapshots == [{"r": ()}]  # the ninth rescan worked and was published
    failed = [r for r in caplog.records if r.getMessage().startswith("rescan failed")]
    assert len(failed) == 5  # 8 failures, at most 5 lines a minute
    assert failed[0].exc_info is not None and str(failed[0].exc_info[1]) == "sysfs exploded"


def test_without_a_monitor_the_timer_rescans(run: Callable[..., Running], monkeypatch: pytest.MonkeyPatch,
                                             caplog: pytest.LogCaptureFixture) -> None:
    pyudev = pytest.importorskip("pyudev")

    def refused(*args: Any, **kwargs: Any) -> Any:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(pyudev.Monitor, "from_netlink", refused)
    caplog.set_level(logging.WARNING, logger="dpkit")
    rescans = Rescans()
    run(rescans, listen=True, subsystems=("pci",), interval=0.05)
    assert rescans.wait_for(lambda r: r.count("timer") >= 3)
    assert rescans.reasons()[0] == "start"
    warning = [r for r in caplog.records if r.getMessage().startswith("no uevent monitor")]
    assert len(warning) == 1 and "rescanning every 0.05 s" in warning[0].getMessage()
    assert "Operation not permitted" in warning[0].fields["error"]  # type: ignore[attr-defined]
    assert UeventWatcher.monitor_problem() == "[Errno 1] Operation not permitted"


def test_listen_false_is_the_timer_alone_without_a_warning(run: Callable[..., Running],
                                                           caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="dpkit")
    rescans = Rescans()
    run(rescans, interval=0.05)
    assert rescans.wait_for(lambda r: r.count("timer") >= 2)
    assert not [r for r in caplog.records if "uevent monitor" in r.getMessage()]


def test_wake_rescans_at_once(run: Callable[..., Running]) -> None:
    rescans = Rescans()
    running = run(rescans, debounce=0.3)
    running.watcher.wake()
    running.watcher.wake()  # two wakes within one window: one rescan
    assert rescans.wait_for(lambda r: r == ["start", "wake"])
    assert not rescans.wait_for(lambda r: len(r) > 2, timeout=0.5)


def test_settle_rescans_once_after_the_last_burst(run: Callable[..., Running]) -> None:
    source, rescans = PairSource(), Rescans()
    run(rescans, sources=[source], settle=0.5)  # long enough that the second event comes before it
    source.send("remove")
    assert rescans.wait_for(lambda r: r == ["start", "uevent"])
    source.send("add")
    assert rescans.wait_for(lambda r: r == ["start", "uevent", "uevent", "settle"])
    settled_after = rescans.calls[3][2] - rescans.calls[2][2]
    assert settled_after >= 0.5 - 0.01  # counted from the last burst
    assert not rescans.wait_for(lambda r: len(r) > 4, timeout=0.5)  # once, not again and again


def test_only_changed_snapshots_reach_the_sink(run: Callable[..., Running]) -> None:
    source, sink = PairSource(), Sink()
    rescans = Rescans([{"a": ()}, {"a": ()}, None, {"b": ()}])
    run(rescans, sources=[source], sink=sink, debounce=0)
    for n in range(3):
        source.send("change")
        assert rescans.wait_calls(n + 2)
    assert sink.snapshots == [{"a": ()}, {"b": ()}]  # the same answer again and None send nothing


def test_a_failing_source_is_dropped_and_the_watcher_goes_on(run: Callable[..., Running]) -> None:
    broken, working, rescans = PairSource(), PairSource(), Rescans()
    run(rescans, sources=[broken, working], debounce=0)
    broken.fail = OSError(9, "Bad file descriptor")
    broken.send("change")  # readable, and drain fails: dropped, closed, and one rescan for what may be lost
    assert rescans.wait_for(lambda r: r == ["start", "uevent"])
    assert rescans.calls[1][1] == (Uevent("overrun", "PairSource", ""),) and broken.closed
    assert not rescans.wait_for(lambda r: len(r) > 2, timeout=0.3)  # no spin on the dead socket
    working.send("add")
    assert rescans.wait_for(lambda r: r == ["start", "uevent", "uevent"])


def test_bad_timing_values_are_refused() -> None:
    for options in ({"interval": 0}, {"interval": 1, "debounce": -1}, {"interval": 1, "settle": -0.1}):
        with pytest.raises(ValueError):
            UeventWatcher(Rescans(), **options)


@umock.skip_unless_available()
def test_a_real_pyudev_monitor_filters_subsystems_and_debounces(tmp_path: Path) -> None:
    result = umock.run_wrapped(HERE / "umock_uevents_child.py", tmp_path)
    assert result["listening"]
    assert result["filtered_out"] == ["start"]  # a block uevent: not a watched subsystem
    assert result["burst"] == ["start", "uevent"]  # five uevents, one rescan
    assert result["burst_events"] == [["bind", "pci", result["path"]]] * 5
    assert result["accepted"] == ["start", "uevent"] and result["rejected_by_accept"] is True
    print(f"testbed uevent -> rescan: {result['latency_ms']} ms")
    assert result["latency_ms"] < 1000
    assert result["stopped_in_s"] < 2.0
