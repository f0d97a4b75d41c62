"""The manager: runs every resource of one vendor in one process and owns their lifecycle.

Data flow: vendor discovery / watch thread (health board) / probe processes (event socket) ->
this manager's loop -> effective device lists (vendor health overlaid with health reports) ->
each resource's server -> ListAndWatch streams -> kubelet. Resources appear and disappear with
the vendor's snapshots. Library code never exits the process: failures are logged, kept in
``errors`` for ``dpkit status``, and retried.

Health is level-triggered: every report replaces that source's previous word about the device,
and one loop pass turns everything that arrived into one update per changed device. Only the
changed devices are recomputed and sent to their resource's server. Everything else (CDI,
labels, metrics, the pod view, ``dpkit status``) sees an immutable :class:`PluginState` built by
this loop: observers get the newest one at most every ``OBSERVER_INTERVAL`` seconds, each on its
own thread (:mod:`~dpkit.core.engine.publisher`), so a burst never queues work and a slow or
failing observer never delays the kubelet.
"""

from __future__ import annotations

import collections
import dataclasses
import gc
import logging
import os
import threading
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from pathlib import Path
from types import MappingProxyType
from typing import Any

from dpkit.core.engine.control import ControlServer, clip, status_document
from dpkit.core.engine.events import BusSink, EventBus, connect_error, validate_snapshot
from dpkit.core.engine.probes import ProbeSupervisor
from dpkit.core.engine.publisher import Publisher
from dpkit.core.engine.registration import KubeletLink
from dpkit.core.engine.server import ResourceServer, RpcObserver
from dpkit.core.engine.state import (
    HealthCounters,
    KubeletState,
    Observer,
    PluginState,
    ProbeStatus,
    ResourceState,
    ServerFailure,
    Serving,
)
from dpkit.core.engine.vendor_calls import VendorCalls, VendorTimeout
from dpkit.core.support.config import Config
from dpkit.core.support.files import own_sockets, remove_own_socket, remove_staging_dirs
from dpkit.core.support.logs import RateLimiter, get_logger, kv
from dpkit.core.support.memory import release_free_memory
from dpkit.core.vendorapi.device import ContainerSpec, Device, Health, Snapshot
from dpkit.core.vendorapi.errors import ConfigError, DpkitError
from dpkit.core.vendorapi.validation import check_resource_name
from dpkit.core.vendorapi.vendor import Vendor

log = get_logger("manager")

Override = tuple[Health, str]
Marks = dict[str, Override]  # source -> its latest non-Healthy report
ALL = "*"
MAX_ORPHANS = 4096  # reports about devices not (yet) in a snapshot, kept until the next snapshot
OBSERVER_INTERVAL = 0.25  # seconds between observer refreshes during a burst
MIN_PASS_INTERVAL = 0.001  # seconds between two publishing passes: bounds the kubelet update rate
LOGGED_CHANGES_PER_PASS = 20  # device transitions logged one by one per pass; the rest summarised
FREEZE_AFTER_DEVICES = 1000  # a snapshot this large is frozen out of the garbage collector's walks
SERVER_RETRY_MAX = 60.0  # seconds: the longest wait between attempts to start a resource server
STATE_WAIT = 2.0  # seconds another thread waits for the loop to build a fresh state (then: the last one)
CdiSpec = Callable[[str, Sequence[Device]], ContainerSpec]  # Allocate's CDI answer (cdi_allocate)


class _ErrorKeeper(logging.Handler):
    """Keeps the last warnings and errors for ``dpkit status``."""

    def __init__(self, size: int = 30) -> None:
        super().__init__(logging.WARNING)
        self.entries: collections.deque[Mapping[str, object]] = collections.deque(maxlen=size)

    def emit(self, record: logging.LogRecord) -> None:
        fields = getattr(record, "fields", {}) or {}
        # Bounded: a message can carry what a peer or a file sent (a huge config value), and every
        # status reply repeats the kept entries. Read-only: every PluginState shares them.
        self.entries.append(MappingProxyType({
            "ts": round(record.created, 3), "level": record.levelname.lower(), "msg": clip(record.getMessage()),
            **{k: clip(str(v)) for k, v in fields.items()}}))


class Manager:
    """Lifecycle owner for one vendor: discovery, servers, registration, probes, control socket."""

    def __init__(
        self, vendor: Vendor, config: Config, *, vendor_factory: Callable[[Mapping[str, Any]], Vendor] | None = None
    ) -> None:
        # every vendor hook goes through this adapter, under vendor_call_timeout (see vendor_calls.py)
        self.calls = VendorCalls(vendor, config.vendor_call_timeout, config.vendor_scan_timeout)
        self.config = config
        self.vendor_factory = vendor_factory
        self.state_dir = Path(config.state_dir)
        self.bus = EventBus(self.state_dir)
        self.link = KubeletLink(config.plugin_dir, config.kubelet_socket,
                                backoff_max=config.register_backoff_max, on_event=self._link_event)
        self.servers: dict[str, ResourceServer] = {}
        self.snapshot: dict[str, tuple[Device, ...]] = {}
        self._index: dict[str, dict[str, Device]] = {}  # the snapshot by resource and device ID
        self.overrides: dict[tuple[str, str], Marks] = {}
        self._orphans: dict[tuple[str, str], Marks] = {}  # reports about devices not in the snapshot
        self._orphan_log = RateLimiter(burst=5, interval=60.0)
        self._observers_dirty = False
        self._observers_due = 0.0
        self._last_pass = 0.0
        self._logged = 0  # device transitions logged in this pass
        self.health_changes = 0  # effective health or reason changes published to servers
        self.server_failures: dict[str, dict[str, Any]] = {}  # resource -> attempts, error, next try
        self.silenced: dict[str, tuple[str, ...]] = {}  # probe -> resources it covers (ALL = every one)
        self.effective: dict[str, dict[str, Device]] = {}
        self.probes: ProbeSupervisor | None = None
        self.errors = _ErrorKeeper()
        self.started_at = time.time()
        # The side doors, set by attach_observers before start: observers see PluginState only; the
        # RPC observer (metrics) and the CDI answer are called by the servers.
        self.observers: list[Observer] = []
        self.rpc_observer: RpcObserver | None = None
        self.cdi_spec: CdiSpec | None = None
        self._publisher: Publisher | None = None
        self._state: PluginState | None = None  # the last one built, by the loop only
        self._changed: set[str] = set()  # resources whose effective devices changed since it was built
        self._vendor_generation = 0
        self._asks = threading.Condition()  # other threads asking the loop for a fresh state
        self._asked = 0
        self._answered = 0
        self._stop = threading.Event()
        self._loop: threading.Thread | None = None
        self._watch_thread: threading.Thread | None = None
        self._watch_stop = threading.Event()
        self._sinks: list[BusSink] = []
        self._control: ControlServer | None = None
        self._control_path = self.state_dir / "control.sock"  # until bound in the private state dir
        self._reload_requested = threading.Event()
        self._ready = threading.Event()
        self._started = threading.Event()  # start() returned (or never ran): stop() waits for it
        self._started.set()
        self._lifecycle = threading.Lock()  # orders a start beginning against a stop from another thread
        self._stopped_early = False  # stop() did not wait for start-up to end: start-up tears down what it made
        self._starter: threading.Thread | None = None  # the thread in start(): it alone builds states then
        self.reloads = 0

    @property
    def vendor(self) -> Vendor:
        return self.calls.vendor

    @vendor.setter
    def vendor(self, vendor: Vendor) -> None:
        self.calls.vendor = vendor

    # -- lifecycle -----------------------------------------------------------------------
    def start(self) -> None:
        """Bring everything up; returns once the first snapshot is served (registration continues).

        A stop() from another thread (SIGTERM during start-up) cuts it short: the vendor call in
        flight is abandoned and start returns at its next step, leaving the teardown to stop().
        """
        with self._lifecycle:
            if self._stop.is_set():  # stopped before it began
                return
            self._starter = threading.current_thread()
            self._started.clear()
        try:
            self._start()
        finally:
            with self._lifecycle:
                self._started.set()
                late = self._stopped_early
            if late:
                self._teardown_late()

    def _teardown_late(self) -> None:
        """A start-up that outlived stop()'s wait (a slow step no interrupt reaches): what it made
        after stop() tore down goes now (servers and their sockets, observers and their files, the watch)."""
        try:
            self._stop_vendor_threads()
            for resource in list(self.servers):
                self._remove_resource(resource)
            if self._publisher is not None:
                self._publisher.close()
                self._publisher = None
        except Exception:
            log.exception("late teardown after a slow start-up failed")

    def _start(self) -> None:
        logging.getLogger("dpkit").addHandler(self.errors)
        self.bus.start()
        self._control = ControlServer.bind(self.state_dir / "control.sock", self.status, self._ping)
        self._control_path = self._control.path
        self.probes = ProbeSupervisor(self.bus.probe_endpoint, self.config.probe_heartbeat_timeout,
                                      on_event=self._probe_event)
        self._remove_stale_sockets()
        self.link.start()
        snapshot = self._discover()
        if self._stop.is_set():
            return
        self._apply_snapshot("discover", snapshot)
        if self._stop.is_set():
            return
        publisher = self._publisher = Publisher(self.observers)  # a stop may clear the attribute meanwhile
        self._notify_observers()  # the first state, built before the loop runs
        self._start_vendor_threads()
        if self._stop.is_set():
            return
        self._loop = threading.Thread(target=self._run, name="manager-loop", daemon=True)
        self._loop.start()
        self._control.start()
        # The side doors get a bounded moment for their first look (CDI files, labels) while the
        # loop already serves the kubelet; a hung one is left behind on its own thread.
        end = time.monotonic() + self.config.vendor_call_timeout + 1.0
        while not publisher.wait_idle(min(0.1, end - time.monotonic())):
            if self._stop.is_set():
                return
            if time.monotonic() >= end:
                log.warning("an observer has not finished with the first state; starting without waiting for it")
                break
        release_free_memory()  # what start-up built and dropped (about 1 MB at 1 device) goes back
        self._ready.set()

    def stop(self) -> None:
        """Stop cleanly: probes ended, servers stopped, our sockets removed. Idempotent."""
        with self._lifecycle:
            if self._stop.is_set():
                return
            self._stop.set()
        self.calls.interrupt()  # a vendor call in flight (a start-up scan, a hung hook) is not waited for
        if not self._started.wait(2.0):
            with self._lifecycle:
                self._stopped_early = not self._started.is_set()
            log.warning("start-up still running; stopping anyway (it removes what it makes from now on)")
        with self._asks:
            self._asks.notify_all()  # nobody waits for a loop that is going away
        if self._loop is not None:  # the loop first, or it would restart the probes we stop
            self.bus.wake()
            self._loop.join(5)
        self._stop_vendor_threads()
        self.link.stop()
        for resource in list(self.servers):
            self._remove_resource(resource)
        if self._publisher is not None:
            self._publisher.close()
            self._publisher = None
        if self._control is not None:
            self._control.stop()
            remove_own_socket(self._control_path)
        self.bus.close()
        try:
            self.calls.close()
        except VendorTimeout:
            pass  # logged by the adapter
        except Exception as exc:
            self.calls.report("close", exc, "vendor close failed", traceback=True)
        logging.getLogger("dpkit").removeHandler(self.errors)
        log.info("stopped")

    def request_reload(self) -> None:
        """Called from a SIGHUP handler: the loop thread re-reads config and rediscovers."""
        self._reload_requested.set()
        self.bus.wake()

    def _start_vendor_threads(self) -> None:
        self._watch_stop = threading.Event()
        sink = self.bus.sink("watch")
        self._sinks.append(sink)
        if self.vendor.overrides("watch") or self.vendor.poll_interval > 0:
            self._watch_thread = threading.Thread(target=self._watch, args=(sink, self._watch_stop),
                                                  name="vendor-watch", daemon=True)
            self._watch_thread.start()
        assert self.probes is not None
        try:
            probes = self.calls.probes()
        except Exception as exc:
            if not isinstance(exc, VendorTimeout):  # a timeout is logged by the adapter
                self.calls.report("probes", exc, "vendor probes() failed; running without probes")
            probes = []
        self.silenced = {}
        self.probes.set_probes(probes)  # a probe that cannot start is retried by check(), never raised

    def _stop_vendor_threads(self) -> None:
        self._watch_stop.set()
        if self._watch_thread is not None:
            wait = min(5.0, self.config.vendor_call_timeout)
            self._watch_thread.join(wait)
            if self._watch_thread.is_alive():  # a daemon thread: abandoned, its late reports ignored
                log.warning("vendor watch did not stop in time; leaving its thread behind",
                            extra=kv(vendor=self.vendor.name, call="watch", kind="timeout", timeout=wait))
            self._watch_thread = None
        if self.probes is not None:
            self.probes.stop_all()
        for sink in self._sinks:
            sink.close()
        self._sinks.clear()

    def _watch(self, sink: BusSink, stop: threading.Event) -> None:
        backoff = 1.0
        while not stop.is_set():
            try:
                self.calls.watch(sink, stop)
                return
            except Exception as exc:
                self.calls.report("watch", exc, "vendor watch failed; restarting it", retry_in=backoff)
                if stop.wait(backoff):
                    return
                backoff = min(backoff * 2, 30.0)
                try:
                    sink.snapshot(self.calls.discover())
                except Exception as exc2:
                    if not isinstance(exc2, VendorTimeout):
                        self.calls.report("discover", exc2, "vendor discovery failed")

    def _discover(self) -> Snapshot:
        try:
            return self.calls.discover()
        except VendorTimeout as exc:  # the adapter logged the timeout; status shows why nothing changed
            log.error("vendor discovery failed; keeping the last device list", extra=kv(error=str(exc)))
            return self.snapshot
        except Exception as exc:
            self.calls.report("discover", exc, "vendor discovery failed; keeping the last device list")
            return self.snapshot

    def _remove_stale_sockets(self) -> None:
        """A previous run killed with SIGKILL leaves sockets and bind dirs behind."""
        # plugin_dir is shared by every device plugin of the node: only our own sockets nobody
        # listens on are removed, never following a link and never recursing (see files.py).
        plugin_dir = Path(self.config.plugin_dir)
        if not plugin_dir.is_dir():
            return

        def stale(path: Path) -> bool:
            return bool(connect_error(path, timeout=0.2))

        remove_staging_dirs(plugin_dir, stale)
        for path in own_sockets(plugin_dir, "dpkit-", ".sock"):
            if stale(path) and remove_own_socket(path):  # nobody listening: a killed run's leftover
                log.info("removing stale plugin socket", extra=kv(socket=str(path)))

    # -- the loop ------------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop.is_set():
            assert self.probes is not None
            timeout = 30.0  # every event wakes the poll; the timeout only serves the timers below
            for due in (self.probes.next_deadline(), self._next_timer()):
                if due is not None:
                    timeout = max(0.0, min(timeout, due - time.monotonic()))
            try:
                ready = self.bus.wait(timeout)
            except OSError:
                if self._stop.is_set():
                    return
                raise
            try:
                self._pass(ready)
                for state in self.probes.check():
                    covered = state.probe.resources or (ALL,)
                    self.silenced[state.probe.name] = covered
                    self._publish(f"probe {state.probe.name} silent")
                if self._reload_requested.is_set():
                    self._reload_requested.clear()
                    self._reload()
                self._retry_servers()
                if self._observers_dirty and time.monotonic() >= self._observers_due:
                    self._notify_observers()
            except Exception:
                log.exception("manager loop step failed; continuing")
            finally:
                if self._asked > self._answered:  # status and liveness get their answer whatever failed
                    try:
                        self._answer_asks()
                    except Exception:
                        log.exception("manager could not answer a state request; continuing")

    def _next_timer(self) -> float | None:
        """The earliest of: observers due, a resource server to retry."""
        dues = [f["next_try"] for f in self.server_failures.values()]
        if self._observers_dirty:
            dues.append(self._observers_due)
        return min(dues) if dues else None

    def _pass(self, ready: Collection[object]) -> None:
        """Take everything that arrived (board and probe socket) and publish it once."""
        assert self.probes is not None
        # A burst is taken in passes at most MIN_PASS_INTERVAL apart, so the kubelet sees at most
        # one update per resource per interval; everything reported meanwhile coalesces on the board.
        wait = self._last_pass + MIN_PASS_INTERVAL - time.monotonic()
        if wait > 0:
            self._stop.wait(wait)
        events = self.bus.drain(ready, self.probes.probes)
        pending = self.bus.board.take()
        if not pending and not events:
            return
        self._last_pass = time.monotonic()
        self._logged = 0
        if pending.snapshot is not None:
            self._apply_snapshot(*pending.snapshot)
        changed: set[tuple[str, str]] = set()
        for (resource, device_id, source), (health, reason) in pending.reports.items():
            if self._record(source, resource, device_id, health, reason):
                changed.add((resource, device_id))
        for event in events:
            if event[0] == "health":
                _, source, resource, device_id, health, reason = event
                if self._record(source, resource, device_id, health, reason):
                    changed.add((resource, device_id))
            elif event[0] == "heartbeat" and self.probes.heartbeat(event[1]):
                self.silenced.pop(event[1], None)
                self._publish(f"probe {event[1]} beating again")
        if changed:
            self._refresh(changed)
        self._log_summary()

    def _record(self, source: str, resource: str, device_id: str, health: Health, reason: str) -> bool:
        """Keep ``source``'s latest word about one device; True when a served device's marks changed."""
        key = (resource, device_id)
        live = device_id in self._index.get(resource, {})
        store = self.overrides if live else self._orphans
        marks = store.get(key)
        if health is Health.HEALTHY:
            if not marks or source not in marks:
                return False
            del marks[source]
            if not marks:
                del store[key]
            return live
        if marks is None:
            if not live and len(store) >= MAX_ORPHANS:
                if self._orphan_log.allow():
                    log.warning("health report for a device no snapshot has; ignored",
                                extra=kv(resource=resource, device=device_id, source=source,
                                         suppressed=self._orphan_log.suppressed()))
                return False
            marks = store[key] = {}
        if marks.get(source) == (health, reason):
            return False
        marks[source] = (health, reason)
        return live

    # -- state -----------------------------------------------------------------------------
    def _apply_snapshot(self, source: str, snapshot: Snapshot) -> None:
        clean, problems = validate_snapshot(snapshot, check_resource_name)
        for problem in problems:
            log.error("invalid vendor data ignored", extra=kv(problem=problem, source=source))
        for resource in [r for r in self.servers if r not in clean]:
            log.info("resource no longer offered by the vendor; stopping it", extra=kv(resource=resource))
            self._remove_resource(resource)
        for resource in [r for r in self.server_failures if r not in clean]:
            del self.server_failures[resource]
        self.snapshot = clean
        self._index = {r: {d.id: d for d in devs} for r, devs in clean.items()}
        for resource in clean:
            if resource not in self.servers and resource not in self.server_failures:
                self._add_resource(resource)
        # Reports that arrived before their device was in a snapshot count from now on; marks of
        # devices that are gone go with them.
        for key, marks in self._orphans.items():
            self.overrides.setdefault(key, {}).update(marks)
        self._orphans = {}
        self.overrides = {k: v for k, v in self.overrides.items() if v and k[1] in self._index.get(k[0], {})}
        self._publish(source)
        if sum(len(d) for d in clean.values()) >= FREEZE_AFTER_DEVICES:
            _freeze_heap()

    def _add_resource(self, resource: str) -> None:
        cdi_allocate = bool(self.config.cdi_allocate and self.cdi_spec is not None)
        server = ResourceServer(
            resource, self.vendor, self.config.plugin_dir,
            observer=self.rpc_observer,
            cdi_spec=self.cdi_spec if cdi_allocate else None,
            cdi_allocate=cdi_allocate,
            calls=self.calls,
        )
        try:
            server.start()
        except Exception as exc:
            failure = self.server_failures.get(resource, {"attempts": 0})
            attempts = failure["attempts"] + 1
            retry_in = min(SERVER_RETRY_MAX, 2.0 ** (attempts - 1))
            self.server_failures[resource] = {"attempts": attempts, "error": str(exc)[:500],
                                              "next_try": time.monotonic() + retry_in}
            log.error("cannot start resource server; will retry",
                      extra=kv(resource=resource, error=str(exc), attempt=attempts, retry_in=retry_in))
            server.stop()
            self._observers_dirty = True
            return
        if self.server_failures.pop(resource, None) is not None:
            log.info("resource server started after retrying", extra=kv(resource=resource))
        self.servers[resource] = server
        self.link.add(server)

    def _retry_servers(self) -> None:
        now = time.monotonic()
        due = [r for r, f in self.server_failures.items() if f["next_try"] <= now and r in self.snapshot]
        for resource in due:
            self._add_resource(resource)
            if resource in self.servers:
                self._publish("server started", only=resource)

    def _remove_resource(self, resource: str) -> None:
        self.link.remove(resource)
        server = self.servers.pop(resource, None)
        if server is not None:
            server.stop()
        self.effective.pop(resource, None)
        self._changed.add(resource)

    def effective_devices(self, resource: str) -> tuple[Device, ...]:
        """Vendor devices with health reports and probe silences laid over them."""
        silent = self._silent_for(resource)
        return tuple(self._effective(resource, d, silent) for d in self.snapshot.get(resource, ()))

    def _silent_for(self, resource: str) -> list[str]:
        return [p for p, covered in self.silenced.items() if ALL in covered or resource in covered]

    def _effective(self, resource: str, device: Device, silent: list[str]) -> Device:
        reasons = [] if device.healthy else [device.reason or "reported unhealthy by the vendor"]
        for source, (health, reason) in self.overrides.get((resource, device.id), {}).items():
            if health is Health.UNHEALTHY:
                reasons.append(reason or f"unhealthy per {source}")
        reasons += [f"health probe {p} stopped responding" for p in silent]
        if reasons:
            return device.with_health(Health.UNHEALTHY, "; ".join(reasons))
        return device if device.healthy else device.with_health(Health.HEALTHY)

    def _publish(self, source: str, only: str | None = None) -> None:
        """Recompute whole effective lists (of resource ``only`` when given) and serve them."""
        for resource, server in list(self.servers.items()):
            if only is not None and resource != only:
                continue
            devices = self.effective_devices(resource)
            before = self.effective.get(resource, {})
            for device in devices:
                self._log_transition(resource, before.get(device.id), device, source,
                                     at_start=not before and source == "discover")
            for gone in set(before) - {d.id for d in devices}:
                log.info("device removed", extra=kv(resource=resource, device=gone))
            effective = self.effective[resource] = self._shared_or_new(resource, devices)
            self._changed.add(resource)
            # the snapshot's index is never changed in place (``_refresh`` copies it first): the server may keep it
            server.update(devices, effective if effective is self._index.get(resource) else None)
        self._observers_dirty = True

    def _shared_or_new(self, resource: str, devices: tuple[Device, ...]) -> dict[str, Device]:
        """The effective devices by ID: the snapshot's own index while every device is the vendor's
        record as is (all healthy, nothing laid over them), else a dict of their own.

        At 100k devices the shared index saves one 100k-entry dict; ``_refresh`` copies it before
        its first change.
        """
        index = self._index.get(resource)
        if index is not None and len(index) == len(devices) and all(
                e is d for e, d in zip(devices, index.values(), strict=True)):
            return index
        return {d.id: d for d in devices}

    def _refresh(self, changed: set[tuple[str, str]]) -> None:
        """Recompute only the devices whose marks changed and send only those to their servers."""
        by_resource: dict[str, list[str]] = {}
        for resource, device_id in changed:
            by_resource.setdefault(resource, []).append(device_id)
        for resource, ids in by_resource.items():
            index = self._index.get(resource, {})
            effective = self.effective.setdefault(resource, {})
            silent = self._silent_for(resource)
            updated = []
            for device_id in ids:
                device = index.get(device_id)
                if device is None:
                    continue
                new = self._effective(resource, device, silent)
                old = effective.get(device_id)
                if old is not None and old.health == new.health and old.reason == new.reason:
                    continue
                self._log_transition(resource, old, new, "health report")
                if effective is index:  # shared with the snapshot's index (see _shared_or_new): copy first
                    effective = self.effective[resource] = dict(index)
                effective[device_id] = new
                updated.append(new)
            server = self.servers.get(resource)
            if updated:
                self._changed.add(resource)
                self._observers_dirty = True
            if updated and server is not None:
                self.health_changes += len(updated)
                server.patch(updated)

    def _log_transition(self, resource: str, old: Device | None, new: Device, source: str,
                        at_start: bool = False) -> None:
        """One line per device change, at most LOGGED_CHANGES_PER_PASS per pass (then a summary)."""
        if old is None:
            if new.healthy and at_start:
                return
            message, level = ("device added", logging.INFO) if new.healthy else ("device unhealthy", logging.WARNING)
        elif old.health != new.health:
            message, level = ("device healthy again", logging.INFO) if new.healthy else ("device unhealthy",
                                                                                         logging.WARNING)
        else:
            return
        self._logged += 1
        if self._logged <= LOGGED_CHANGES_PER_PASS:
            reason = {} if new.healthy else {"reason": new.reason}
            log.log(level, message, extra=kv(resource=resource, device=new.id, source=source, **reason))

    def _log_summary(self) -> None:
        if self._logged > LOGGED_CHANGES_PER_PASS:
            log.warning("more device health changes in one pass than logged one by one",
                        extra=kv(changes=self._logged, logged=LOGGED_CHANGES_PER_PASS))
        self._logged = 0

    def _notify_observers(self) -> None:
        """Hand the newest state to every observer's thread; never waits for one.

        From another thread it only asks the loop to do so at once.
        """
        if self._loop is not None and threading.current_thread() is not self._loop:
            self._observers_dirty, self._observers_due = True, 0.0
            self.bus.wake()
            return
        self._observers_dirty = False
        self._observers_due = time.monotonic() + OBSERVER_INTERVAL
        state = self._build_state()
        if self._publisher is not None:
            self._publisher.offer(state)

    def _reload(self) -> None:
        from dpkit.core.support.config import load_config

        self.reloads += 1
        source = self.config.source
        try:
            config = load_config(None if source == "<defaults>" else source)
            vendor = self.vendor_factory(config.vendor) if self.vendor_factory else self.vendor
        except (ConfigError, DpkitError) as exc:
            log.error("reload rejected; keeping the running configuration", extra=kv(error=str(exc)))
            return
        except Exception as exc:
            log.error("reload failed; keeping the running configuration", extra=kv(error=str(exc)))
            return
        # Only the vendor section is reloaded; sockets, integrations and timers are wired at start.
        changed = [f.name for f in dataclasses.fields(Config)
                   if f.name not in ("vendor", "source") and getattr(config, f.name) != getattr(self.config, f.name)]
        if changed:
            log.warning("these keys change only with a restart; keeping their running values",
                        extra=kv(keys=", ".join(changed)))
            config = config.replace(**{k: getattr(self.config, k) for k in changed})
        log.info("reloading configuration", extra=kv(source=source))
        self._stop_vendor_threads()
        # What the old watcher said last is still on the board: its health reports count, but its
        # snapshot describes the old configuration and must not replace the rediscovery below.
        stale = self.bus.board.take()
        for (resource, device_id, report_source), (health, reason) in stale.reports.items():
            self._record(report_source, resource, device_id, health, reason)
        old = self.vendor
        self.vendor, self.config = vendor, config  # the servers share self.calls: they see it too
        self._observers_dirty = True
        if old is not vendor:
            self._vendor_generation += 1
            try:
                self.calls.close(old)
            except Exception:
                log.exception("vendor close failed")
        # The old probes are gone: their silences and health reports go with them (the new
        # probes report afresh), or a mark nobody can clear would keep devices Unhealthy.
        self.silenced = {}
        self.overrides = {key: {src: v for src, v in marks.items() if not src.startswith("probe:")}
                          for key, marks in self.overrides.items()}
        self._apply_snapshot("reload", self._discover())
        self._start_vendor_threads()

    # -- state and status ------------------------------------------------------------------
    def _build_state(self) -> PluginState:
        """The current PluginState, built by the loop thread (or before it runs).

        Proportional to the change: a resource whose devices did not change (``_changed``) keeps
        its device tuple, and one whose serving counters did not change either keeps its
        ResourceState object; when nothing at all changed the previous state itself is returned.
        """
        previous = self._state
        before = previous.resources if previous is not None else {}
        resources: dict[str, ResourceState] = {}
        same = previous is not None and len(before) == len(self.servers)
        for name in sorted(self.servers):
            server, old, reg = self.servers[name], before.get(name), self.link.state.get(name)
            stats = server.stats
            serving = Serving(str(server.socket_path), self.link.registered(name),
                              reg.registrations if reg else 0, (reg.last_error if reg else "") or stats.last_error,
                              stats.open_streams, stats.allocations, stats.allocate_errors)
            offered = self.snapshot.get(name, ())
            effective = self.effective.get(name, {})
            devices = (old.devices if old is not None and name not in self._changed
                       else offered if effective is self._index.get(name)  # the vendor's records as they are
                       else tuple(effective.values()))
            if old is not None and old.devices is devices and old.offered is offered and old.serving == serving:
                resources[name] = old
            else:
                resources[name] = ResourceState(name, devices, offered, serving)
                same = False
        self._changed.clear()
        now_probes = self.probes.probes.values() if self.probes is not None else ()
        state = PluginState(
            version=previous.version if previous is not None else 1,
            vendor=self.vendor.name,
            vendor_generation=self._vendor_generation,
            pid=os.getpid(),
            started_at=self.started_at,
            kubelet=KubeletState(str(self.link.kubelet_socket), self.link.kubelet_socket.exists(),
                                 self.link.kubelet_restarts),
            resources=previous.resources if same and previous is not None else MappingProxyType(resources),
            probes=tuple(ProbeStatus(p.probe.name, p.process.pid if p.process else None,
                                     bool(p.process and p.process.poll() is None), p.silent, p.beats, p.last_beat,
                                     p.restarts, p.timeout) for p in now_probes),
            reloads=self.reloads,
            health=HealthCounters(self.bus.board.reports_received, self.bus.board.reports_coalesced,
                                  self.health_changes),
            server_failures=MappingProxyType({r: ServerFailure(f["attempts"], f["error"], f["next_try"])
                                              for r, f in sorted(self.server_failures.items())}),
            errors=tuple(self.errors.entries),
        )
        if previous is not None:
            # resources are compared by identity above, so this compares only the small fields
            state = previous if same and state == previous else dataclasses.replace(state, version=previous.version + 1)
        self._state = state
        return state

    def current_state(self, timeout: float = STATE_WAIT) -> PluginState:
        """A state built now, by the loop; from another thread, the last one if the loop does not
        answer within ``timeout`` (or is not running)."""
        if self._loop is None and not self._started.is_set() and threading.current_thread() is not self._starter:
            # start-up is changing what a state is built from (a scrape during start): the last one
            if self._state is None:
                raise DpkitError("the manager has not published a state yet")
            return self._state
        if self._loop is None or threading.current_thread() is self._loop:
            return self._build_state()  # the loop's own, or before start/after it: nothing else changes it
        if not self._ask_loop(timeout) and self._state is None:
            raise DpkitError("the manager has not published a state yet")
        assert self._state is not None
        return self._state

    def _ask_loop(self, timeout: float) -> bool:
        """Have the loop build a fresh state; False when it did not within ``timeout``."""
        if self._loop is None or not self._loop.is_alive() or self._stop.is_set():
            return False
        with self._asks:
            self._asked += 1
            wanted = self._asked
        self.bus.wake()
        with self._asks:
            return self._asks.wait_for(lambda: self._answered >= wanted or self._stop.is_set(), timeout) \
                and self._answered >= wanted

    def _answer_asks(self) -> None:
        with self._asks:
            wanted = self._asked
            self._build_state()
            self._answered = wanted
            self._asks.notify_all()

    def _ping(self) -> str:
        """The liveness check: '' when the loop answers, else why not."""
        return "" if self._ask_loop(STATE_WAIT) else f"the manager loop did not answer within {STATE_WAIT:g} s"

    def status(self) -> dict[str, Any]:
        """What ``dpkit status`` shows: resources, devices, health, registrations, last errors.

        Rendered from one fresh PluginState plus what each observer adds; called from the control
        thread (or any other), never on the loop, since an observer may ask the kubelet.
        """
        state = self.current_state()
        sections: dict[str, object] = {}
        for observer in self.observers:
            try:
                sections.update(observer.status_fields(state))
            except Exception:
                log.exception("observer status failed", extra=kv(observer=type(observer).__name__))
        watched = self._publisher.status() if self._publisher is not None else []
        return status_document(state, sections, observers=watched)

    # -- events that change the state but not the devices -------------------------------------
    def _link_event(self, kind: str, resource: str) -> None:
        """On the link's thread: a registration or a kubelet restart; observers follow."""
        self._observers_dirty = True
        self.bus.wake()

    def _probe_event(self, kind: str, probe: str) -> None:
        """On the loop: a heartbeat or a restart; observers follow."""
        self._observers_dirty = True

    def wait_ready(self, timeout: float) -> bool:
        return self._ready.wait(timeout)


def _freeze_heap() -> None:
    """Move what is alive now (device records, specs, modules) out of the collector's sight.

    They live for the whole run; without this every collection walks them again, which at
    100k devices costs hundreds of milliseconds on the kubelet path.
    """
    gc.collect()
    gc.freeze()
    release_free_memory()
