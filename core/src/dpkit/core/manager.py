"""The manager: runs every resource of one vendor in one process and owns their lifecycle.

Data flow: vendor discovery / watch thread / probe processes -> event bus -> this manager's loop
-> effective device lists (vendor health overlaid with health events) -> each resource's
server -> ListAndWatch streams -> kubelet. Resources appear and disappear with the vendor's
snapshots. Library code never exits the process: failures are logged, kept in ``errors`` for
``dpkit status``, and retried.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import zmq

from dpkit.core.config import Config
from dpkit.core.device import Device, Health, Snapshot
from dpkit.core.errors import ConfigError, DpkitError
from dpkit.core.events import EventBus, bind_private, connect_error, validate_snapshot
from dpkit.core.logs import get_logger, kv
from dpkit.core.probes import ProbeSupervisor
from dpkit.core.registration import KubeletLink
from dpkit.core.server import ResourceServer
from dpkit.core.validation import check_resource_name
from dpkit.core.vendor import Vendor

log = get_logger("manager")

Override = tuple[Health, str]
ALL = "*"


class _ErrorKeeper(logging.Handler):
    """Keeps the last warnings and errors for ``dpkit status``."""

    def __init__(self, size: int = 30) -> None:
        super().__init__(logging.WARNING)
        self.entries: collections.deque[dict[str, Any]] = collections.deque(maxlen=size)

    def emit(self, record: logging.LogRecord) -> None:
        fields = getattr(record, "fields", {}) or {}
        self.entries.append({"ts": round(record.created, 3), "level": record.levelname.lower(),
                             "msg": record.getMessage(), **{k: str(v) for k, v in fields.items()}})


class Manager:
    """Lifecycle owner for one vendor: discovery, servers, registration, probes, control socket."""

    def __init__(
        self, vendor: Vendor, config: Config, *, vendor_factory: Callable[[Mapping[str, Any]], Vendor] | None = None
    ) -> None:
        self.vendor = vendor
        self.config = config
        self.vendor_factory = vendor_factory
        self.state_dir = Path(config.state_dir)
        self.bus = EventBus(self.state_dir)
        self.link = KubeletLink(config.plugin_dir, config.kubelet_socket,
                                backoff_max=config.register_backoff_max, on_event=self._link_event)
        self.servers: dict[str, ResourceServer] = {}
        self.snapshot: dict[str, tuple[Device, ...]] = {}
        self.overrides: dict[tuple[str, str], dict[str, Override]] = {}
        self.silenced: dict[str, tuple[str, ...]] = {}  # probe -> resources it covers (ALL = every one)
        self.effective: dict[str, dict[str, Device]] = {}
        self.probes: ProbeSupervisor | None = None
        self.errors = _ErrorKeeper()
        self.started_at = time.time()
        self.observers: list[Any] = []  # metrics, CDI writer, labels: get on_devices(manager) calls
        self._stop = threading.Event()
        self._loop: threading.Thread | None = None
        self._watch_thread: threading.Thread | None = None
        self._watch_stop = threading.Event()
        self._sinks: list[Any] = []
        self._control: zmq.Socket[Any] | None = None
        self._reload_requested = threading.Event()
        self._ready = threading.Event()
        self.reloads = 0

    # -- lifecycle -----------------------------------------------------------------------
    def start(self) -> None:
        """Bring everything up; returns once the first snapshot is served (registration continues)."""
        logging.getLogger("dpkit").addHandler(self.errors)
        self.bus.start()
        self._control = self.bus.context.socket(zmq.REP)
        self._control.setsockopt(zmq.LINGER, 0)
        bind_private(self._control, self.state_dir / "control.sock")
        self.bus.poller.register(self._control, zmq.POLLIN)
        self.probes = ProbeSupervisor(self.bus.ipc_address, self.config.probe_heartbeat_timeout,
                                      on_event=self._probe_event)
        self._remove_stale_sockets()
        self.link.start()
        self._apply_snapshot("discover", self._discover())
        self._start_vendor_threads()
        self._loop = threading.Thread(target=self._run, name="manager-loop", daemon=True)
        self._loop.start()
        self._ready.set()

    def stop(self) -> None:
        """Stop cleanly: probes ended, servers stopped, our sockets removed. Idempotent."""
        if self._stop.is_set():
            return
        self._stop.set()
        if self._loop is not None:  # the loop first, or it would restart the probes we stop
            self.bus.wake()
            self._loop.join(5)
        self._stop_vendor_threads()
        self.link.stop()
        for resource in list(self.servers):
            self._remove_resource(resource)
        for observer in self.observers:
            _call(observer, "close")
        if self._control is not None:
            self._control.close(0)
            try:
                (self.state_dir / "control.sock").unlink()
            except FileNotFoundError:
                pass
        self.bus.close()
        try:
            self.vendor.close()
        except Exception:
            log.exception("vendor close failed")
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
            probes = list(self.vendor.probes())
        except Exception as exc:
            log.error("vendor probes() failed; running without probes", extra=kv(error=str(exc)))
            probes = []
        self.silenced = {}
        self.probes.set_probes(probes)

    def _stop_vendor_threads(self) -> None:
        self._watch_stop.set()
        if self._watch_thread is not None:
            self._watch_thread.join(5)
            if self._watch_thread.is_alive():
                log.warning("vendor watch thread did not stop within 5 s")
            self._watch_thread = None
        if self.probes is not None:
            self.probes.stop_all()
        for sink in self._sinks:
            sink.close()
        self._sinks.clear()

    def _watch(self, sink: Any, stop: threading.Event) -> None:
        backoff = 1.0
        while not stop.is_set():
            try:
                self.vendor.watch(sink, stop)
                return
            except Exception as exc:
                log.error("vendor watch failed; restarting it", extra=kv(error=str(exc), retry_in=backoff))
                if stop.wait(backoff):
                    return
                backoff = min(backoff * 2, 30.0)
                try:
                    sink.snapshot(self.vendor.discover())
                except Exception as exc2:
                    log.error("vendor discovery failed", extra=kv(error=str(exc2)))

    def _discover(self) -> Snapshot:
        try:
            return self.vendor.discover()
        except Exception as exc:
            log.error("vendor discovery failed; keeping the last device list", extra=kv(error=str(exc)))
            return self.snapshot

    def _remove_stale_sockets(self) -> None:
        """A previous run killed with SIGKILL leaves sockets and bind dirs behind."""
        plugin_dir = Path(self.config.plugin_dir)
        if not plugin_dir.is_dir():
            return
        for path in plugin_dir.glob(".dpkit-bind-*"):
            for child in path.iterdir():
                child.unlink(missing_ok=True)
            path.rmdir()
        for path in plugin_dir.glob("dpkit-*.sock"):
            if connect_error(path, timeout=0.2):  # nobody listening: a killed run's leftover
                log.info("removing stale plugin socket", extra=kv(socket=str(path)))
                path.unlink(missing_ok=True)

    # -- the loop ------------------------------------------------------------------------
    def _run(self) -> None:
        known: Mapping[str, Any] = {}
        while not self._stop.is_set():
            assert self.probes is not None
            known = self.probes.probes
            timeout = 30.0  # every event wakes the poll; the timeout only serves probe deadlines
            deadline = self.probes.next_deadline()
            if deadline is not None:
                timeout = max(0.0, min(timeout, deadline - time.monotonic()))
            try:
                ready = dict(self.bus.poller.poll(int(timeout * 1000) + 1))
            except zmq.ZMQError:
                if self._stop.is_set():
                    return
                raise
            try:
                if self._control is not None and self._control in ready:
                    self._answer_control()
                for event in self.bus.drain(ready, known):
                    self._handle(event)
                for state in self.probes.check():
                    covered = state.probe.resources or (ALL,)
                    self.silenced[state.probe.name] = covered
                    self._publish(f"probe {state.probe.name} silent")
                if self._reload_requested.is_set():
                    self._reload_requested.clear()
                    self._reload()
            except Exception:
                log.exception("manager loop step failed; continuing")

    def _handle(self, event: tuple[Any, ...]) -> None:
        kind = event[0]
        if kind == "snapshot":
            self._apply_snapshot(event[1], event[2])
        elif kind == "health":
            _, source, resource, device_id, health, reason = event
            key = (resource, device_id)
            if health is Health.HEALTHY:
                self.overrides.get(key, {}).pop(source, None)
            else:
                self.overrides.setdefault(key, {})[source] = (health, reason)
            self._publish(source, only=resource)
        elif kind == "heartbeat":
            assert self.probes is not None
            if self.probes.heartbeat(event[1]):
                self.silenced.pop(event[1], None)
                self._publish(f"probe {event[1]} beating again")

    # -- state -----------------------------------------------------------------------------
    def _apply_snapshot(self, source: str, snapshot: Snapshot) -> None:
        clean, problems = validate_snapshot(snapshot, check_resource_name)
        for problem in problems:
            log.error("invalid vendor data ignored", extra=kv(problem=problem, source=source))
        for resource in [r for r in self.servers if r not in clean]:
            log.info("resource no longer offered by the vendor; stopping it", extra=kv(resource=resource))
            self._remove_resource(resource)
        self.snapshot = clean
        for resource in clean:
            if resource not in self.servers:
                self._add_resource(resource)
        live = {(r, d.id) for r, devs in clean.items() for d in devs}
        self.overrides = {k: v for k, v in self.overrides.items() if k in live and v}
        self._publish(source)

    def _add_resource(self, resource: str) -> None:
        cdi = next((o for o in self.observers if hasattr(o, "cdi_spec")), None)
        server = ResourceServer(
            resource, self.vendor, self.config.plugin_dir,
            observer=next((o for o in self.observers if hasattr(o, "rpc")), None),
            cdi_spec=cdi.cdi_spec if cdi is not None and self.config.cdi_allocate else None,
            cdi_allocate=bool(self.config.cdi_allocate and cdi is not None),
            vendor_timeout=self.config.vendor_call_timeout,
        )
        try:
            server.start()
        except Exception as exc:
            log.error("cannot start resource server", extra=kv(resource=resource, error=str(exc)))
            return
        self.servers[resource] = server
        self.link.add(server)

    def _remove_resource(self, resource: str) -> None:
        self.link.remove(resource)
        server = self.servers.pop(resource, None)
        if server is not None:
            server.stop()
        self.effective.pop(resource, None)

    def effective_devices(self, resource: str) -> tuple[Device, ...]:
        """Vendor devices with health events and probe silences laid over them."""
        out = []
        silent = [p for p, covered in self.silenced.items() if ALL in covered or resource in covered]
        for device in self.snapshot.get(resource, ()):
            reasons = [] if device.healthy else [device.reason or "reported unhealthy by the vendor"]
            for source, (health, reason) in self.overrides.get((resource, device.id), {}).items():
                if health is Health.UNHEALTHY:
                    reasons.append(reason or f"unhealthy per {source}")
            reasons += [f"health probe {p} stopped responding" for p in silent]
            out.append(device.with_health(Health.UNHEALTHY, "; ".join(reasons)) if reasons else
                       (device if device.healthy else device.with_health(Health.HEALTHY)))
        return tuple(out)

    def _publish(self, source: str, only: str | None = None) -> None:
        """Recompute effective lists (of resource ``only``, when one event touches one) and serve them."""
        for resource, server in list(self.servers.items()):
            if only is not None and resource != only:
                continue
            devices = self.effective_devices(resource)
            before = self.effective.get(resource, {})
            for device in devices:
                old = before.get(device.id)
                if old is None:
                    if not device.healthy:  # including at start: the reason must reach the log once
                        log.warning("device unhealthy", extra=kv(resource=resource, device=device.id,
                                                                  reason=device.reason, source=source))
                    elif before or source != "discover":
                        log.info("device added", extra=kv(resource=resource, device=device.id, health=device.health))
                elif old.health != device.health:
                    if device.healthy:
                        log.info("device healthy again", extra=kv(resource=resource, device=device.id, source=source))
                    else:
                        log.warning("device unhealthy", extra=kv(resource=resource, device=device.id,
                                                                  reason=device.reason, source=source))
            for gone in set(before) - {d.id for d in devices}:
                log.info("device removed", extra=kv(resource=resource, device=gone))
            self.effective[resource] = {d.id: d for d in devices}
            server.update(devices)
        for observer in self.observers:
            _call(observer, "on_devices", self)

    def _reload(self) -> None:
        from dpkit.core.config import load_config

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
        old = self.vendor
        self.vendor, self.config = vendor, config
        for server in self.servers.values():
            server.vendor = vendor
        if old is not vendor:
            try:
                old.close()
            except Exception:
                log.exception("vendor close failed")
        # The old probes are gone: their silences and health reports go with them (the new
        # probes report afresh), or a mark nobody can clear would keep devices Unhealthy.
        self.silenced = {}
        self.overrides = {key: {src: v for src, v in marks.items() if not src.startswith("probe:")}
                          for key, marks in self.overrides.items()}
        self._apply_snapshot("reload", self._discover())
        self._start_vendor_threads()

    # -- status ----------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        """What ``dpkit status`` shows: resources, devices, health, registrations, last errors."""
        now = time.monotonic()
        resources = []
        for resource, server in sorted(self.servers.items()):
            reg = self.link.state.get(resource)
            devices = list(self.effective.get(resource, {}).values())
            resources.append({
                "name": resource,
                "socket": str(server.socket_path),
                "registered": self.link.registered(resource),
                "registrations": reg.registrations if reg else 0,
                "last_error": (reg.last_error if reg else "") or server.stats.last_error,
                "streams": server.stats.open_streams,
                "allocations": server.stats.allocations,
                "allocate_errors": server.stats.allocate_errors,
                "capacity": len(devices),
                "allocatable": sum(1 for d in devices if d.healthy),
                "devices": [
                    {"id": d.id, "health": str(d.health), "reason": d.reason, "numa": list(d.numa_nodes),
                     "attributes": dict(d.attributes)}
                    for d in devices
                ],
            })
        extra = {k: v for o in self.observers for k, v in (_call(o, "status_fields", self) or {}).items()}
        holders = extra.get("pod_resources", {}).get("holders", {})  # which pod holds which device
        for entry in resources:
            entry["holders"] = holders.get(entry["name"], {})
        return {
            "vendor": self.vendor.name,
            "pid": os.getpid(),
            "uptime_s": round(time.time() - self.started_at, 1),
            "kubelet": {
                "socket": str(self.link.kubelet_socket),
                "present": self.link.kubelet_socket.exists(),
                "restarts_seen": self.link.kubelet_restarts,
            },
            "resources": resources,
            "probes": [p.as_status(now) for p in (self.probes.probes.values() if self.probes else [])],
            "reloads": self.reloads,
            "errors": list(self.errors.entries),
            **extra,
        }

    def _answer_control(self) -> None:
        import json

        assert self._control is not None
        try:
            request = json.loads(self._control.recv(zmq.NOBLOCK))
            command = request.get("cmd") if isinstance(request, dict) else None
        except zmq.Again:
            return
        except ValueError:
            command = None
        if command == "status":
            reply: dict[str, Any] = {"ok": True, "status": self.status()}
        elif command == "ping":
            reply = {"ok": True}
        else:
            reply = {"ok": False, "error": "read-only control socket: commands are 'status' and 'ping'"}
        self._control.send(json.dumps(reply, default=str).encode())

    # -- events for observers ----------------------------------------------------------------
    def _link_event(self, kind: str, resource: str) -> None:
        for observer in self.observers:
            _call(observer, "on_link_event", kind, resource)

    def _probe_event(self, kind: str, probe: str) -> None:
        for observer in self.observers:
            _call(observer, "on_probe_event", kind, probe)

    def wait_ready(self, timeout: float) -> bool:
        return self._ready.wait(timeout)


def _call(observer: Any, method: str, *args: Any) -> Any:
    func = getattr(observer, method, None)
    if func is None:
        return None
    try:
        return func(*args)
    except Exception:
        log.exception("observer failed", extra=kv(observer=type(observer).__name__, method=method))
        return None
