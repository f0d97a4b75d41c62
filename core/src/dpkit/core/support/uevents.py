"""One uevent loop for every vendor: a pyudev monitor, bursts coalesced, one rescan per burst.

Vendors whose devices change with kernel uevents (PCI hotplug, driver binds, AP queues going
offline) all want the same loop on their ``watch`` thread: listen on a few subsystems, turn a
burst of events into one rescan, rescan on a timer anyway (for what sends no uevent), and keep
going when a rescan fails or when no monitor can be opened (no netlink in a sandbox, a test tree
instead of /sys). :class:`UeventWatcher` is that loop.

pyudev is imported only when a monitor is opened, so importing this module costs nothing.
"""

from __future__ import annotations

import errno
import os
import select
import threading
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

from dpkit.core.support.logs import RateLimiter, get_logger, kv

if TYPE_CHECKING:
    from dpkit.core.vendorapi.device import Snapshot
    from dpkit.core.vendorapi.vendor import EventSink

log = get_logger("uevents")

STOP_CHECK = 0.1  # seconds: how soon a set stop is noticed
DEBOUNCE = 0.01  # seconds of quiet that end a burst of events (what a change waits at least)
BURST_LIMIT = 10  # a burst ends at most BURST_LIMIT x debounce after its first event, however busy
_MAX_DRAIN = 1000  # monitor reads per wake-up: a flood cannot keep the loop from rescanning


class Uevent(NamedTuple):
    """One event: ``action`` (add, remove, bind...), ``subsystem``, and the sysfs path (or what a source names)."""

    action: str
    subsystem: str
    path: str


class EventSource(Protocol):
    """A readable descriptor watched beside the monitor (sfc's rtnetlink socket).

    ``drain`` returns every event waiting as (action, subsystem, path); an ``OSError`` from it
    closes and drops the source (a broken socket would stay readable and spin the loop).
    """

    def fileno(self) -> int: ...

    def drain(self) -> Sequence[tuple[str, str, str]]: ...

    def close(self) -> None: ...


#: ``rescan(reason, events)``; reason is start, uevent, wake, settle or timer. A snapshot it returns
#: goes to the sink when it differs from the last one sent; None sends nothing.
Rescan = Callable[[str, Sequence[Uevent]], "Snapshot | None"]


def open_monitor(source: str, subsystems: Sequence[str]) -> tuple[Any | None, str]:
    """A started pyudev monitor for ``subsystems`` (every one when empty), or None and why not."""
    try:
        import pyudev

        monitor = pyudev.Monitor.from_netlink(pyudev.Context(), source=source)
        for subsystem in subsystems:
            monitor.filter_by(subsystem)
        monitor.start()
        return monitor, ""
    except Exception as exc:  # ImportError, OSError from netlink, libudev missing...
        return None, str(exc) or type(exc).__name__


class UeventWatcher:
    """Calls ``rescan`` at start, after each burst of uevents, on :meth:`wake` and every ``interval`` s.

    ``subsystems``: the monitor's filter (empty: all); ``source``: ``udev`` (after udev's rules)
    or ``kernel``; ``listen=False``: no monitor at all, the timer alone (no warning). ``accept``
    drops pyudev devices that do not matter (pod veths) before they count as events.
    ``sources``: further descriptors in the same wait. A burst ends after ``debounce`` s of quiet
    (at most ``BURST_LIMIT`` times that after it began); ``settle``: one more rescan that long after
    the last burst, for changes that finish after their event. The timer runs ``interval`` s after
    the last rescan of any kind; with no monitor it is the only trigger besides the sources.
    A rescan that raises is logged (at most 5 lines a minute) and the loop goes on.
    """

    def __init__(self, rescan: Rescan, *, interval: float, subsystems: Sequence[str] = (), source: str = "udev",
                 listen: bool = True, accept: Callable[[Any], bool] | None = None,
                 sources: Sequence[EventSource] = (), debounce: float = DEBOUNCE, settle: float | None = None,
                 sink: EventSink | None = None) -> None:
        if interval <= 0 or debounce < 0 or (settle is not None and settle < 0):
            raise ValueError("interval must be positive, debounce and settle not negative")
        self.rescan, self.interval, self.subsystems, self.source = rescan, interval, tuple(subsystems), source
        self.listen, self.accept, self.debounce, self.settle, self.sink = listen, accept, debounce, settle, sink
        self._sources = list(sources)
        self._monitor: Any | None = None
        self._wake_r: int | None = None
        self._wake_w: int | None = None
        self._lock = threading.Lock()  # guards the wake pipe against wake() racing close
        self._failures = RateLimiter(burst=5, interval=60.0)
        self._last: Snapshot | None = None

    @staticmethod
    def monitor_problem(source: str = "udev") -> str:
        """Why no uevent monitor can be opened here ("" when one can): for ``doctor``."""
        return open_monitor(source, ())[1]

    def wake(self) -> None:
        """Rescan as soon as possible (any thread; nothing happens unless :meth:`run` is running)."""
        with self._lock:
            if self._wake_w is not None:
                try:
                    os.write(self._wake_w, b"\0")
                except BlockingIOError:  # the pipe is full: a wake is pending anyway
                    pass

    def run(self, stop: threading.Event, listening: threading.Event | None = None) -> None:
        """Watch until ``stop`` is set (noticed within ``STOP_CHECK`` s, after a rescan in progress).

        The monitor opens before the first rescan, so nothing changed after that rescan is
        missed; ``listening`` is set after it and cleared on return. The monitor and the
        sources are closed on return.
        """
        self._open()
        try:
            self._call("start", ())
            if listening is not None:
                listening.set()
            self._loop(stop)
        finally:
            if listening is not None:
                listening.clear()
            self._close()

    def _open(self) -> None:
        if self.listen:
            self._monitor, problem = open_monitor(self.source, self.subsystems)
            if self._monitor is None:
                log.warning(f"no uevent monitor; rescanning every {self.interval:g} s",
                            extra=kv(source=self.source, subsystems=",".join(self.subsystems) or "all",
                                     error=problem))
        wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        with self._lock:
            self._wake_r, self._wake_w = wake_r, wake_w

    def _close(self) -> None:
        self._monitor = None  # pyudev closes its socket when the monitor is freed
        for source in self._sources:
            source.close()
        self._sources.clear()
        with self._lock:
            for fd in (self._wake_r, self._wake_w):
                if fd is not None:
                    os.close(fd)
            self._wake_r = self._wake_w = None

    def _loop(self, stop: threading.Event) -> None:
        next_timer = time.monotonic() + self.interval
        settle_at: float | None = None
        while not stop.is_set():
            events, woken = self._wait(next_timer if settle_at is None else min(next_timer, settle_at), stop)
            if stop.is_set():
                return
            now = time.monotonic()
            if events:
                reason = "uevent"
                if self.settle is not None:
                    settle_at = now + self.settle
            elif woken:
                reason = "wake"
            elif settle_at is not None and now >= settle_at:
                reason, settle_at = "settle", None
            elif now >= next_timer:
                reason = "timer"
            else:
                continue  # only events that do not matter arrived
            self._call(reason, events)
            next_timer = time.monotonic() + self.interval

    def _wait(self, due: float, stop: threading.Event) -> tuple[list[Uevent], bool]:
        """The events of one burst and whether :meth:`wake` was called; ([], False) at ``due`` or on stop."""
        events: list[Uevent] = []
        woken = False
        burst_end: float | None = None
        while not stop.is_set():
            now = time.monotonic()
            timeout = min(due - now, STOP_CHECK) if burst_end is None else min(self.debounce, burst_end - now)
            if timeout <= 0:
                break
            readable: list[Any] = [self._wake_r, *self._sources]
            if self._monitor is not None:
                readable.append(self._monitor)
            ready = select.select(readable, [], [], timeout)[0]
            if not ready:
                if burst_end is not None:
                    break  # quiet for the debounce window: the burst is over
                continue
            woken = self._read(ready, events) or woken
            if burst_end is None and (events or woken):
                burst_end = time.monotonic() + self.debounce * BURST_LIMIT
        return events, woken

    def _read(self, ready: list[Any], events: list[Uevent]) -> bool:
        """Append what ``ready`` holds to ``events``; True when the wake pipe was among them."""
        woken = False
        for item in ready:
            if isinstance(item, int):
                woken = True
                try:
                    while os.read(item, 512):
                        pass
                except BlockingIOError:
                    pass
            elif item is self._monitor:
                events += self._drain_monitor(item)
            else:
                events += self._drain_source(item)
        return woken

    def _drain_monitor(self, monitor: Any) -> list[Uevent]:
        events: list[Uevent] = []
        for _ in range(_MAX_DRAIN):
            try:
                device = monitor.poll(timeout=0)
            except OSError as exc:
                if exc.errno != errno.ENOBUFS:  # a broken socket would stay readable: drop it
                    log.warning(f"uevent monitor failed; rescanning every {self.interval:g} s",
                                extra=kv(error=str(exc)))
                    self._monitor = None
                events.append(Uevent("overrun", "udev", ""))  # events were lost: assume one mattered
                break
            if device is None:
                break
            if self.accept is None or self.accept(device):
                events.append(Uevent(str(device.action), str(device.subsystem), str(device.sys_path)))
        return events

    def _drain_source(self, source: EventSource) -> list[Uevent]:
        try:
            return [Uevent(*event) for event in source.drain()]
        except OSError as exc:
            name = type(source).__name__
            log.warning("event source failed; its changes are seen only by the periodic rescan",
                        extra=kv(source=name, error=str(exc)))
            self._sources.remove(source)
            source.close()
            return [Uevent("overrun", name, "")]

    def _call(self, reason: str, events: Sequence[Uevent]) -> None:
        if events:
            log.debug("uevents", extra=kv(count=len(events), events="; ".join(" ".join(e) for e in events[:10])))
        try:
            snapshot = self.rescan(reason, tuple(events))
            if self.sink is not None and snapshot is not None and snapshot != self._last:
                self.sink.snapshot(snapshot)
                self._last = snapshot
        except Exception:
            if self._failures.allow():
                log.exception("rescan failed; keeping the last view",
                              extra=kv(trigger=reason, suppressed=self._failures.suppressed()))
