"""The event bus: device changes travel from watchers and probes to the manager over pyzmq.

Two PULL endpoints feed one consumer:

* ``inproc``: in-process vendor watchers push Python objects (trusted, same process);
* ``ipc``: out-of-process probes push small JSON messages, validated field by field, through a
  socket of mode 0600 in a 0700 state directory.

Messages are tuples once decoded: ``("snapshot", source, Snapshot)``, ``("health", source,
resource, device_id, Health, reason)`` and ``("heartbeat", probe_name)``.
"""

from __future__ import annotations

import itertools
import json
import os
import socket
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import zmq

from dpkit.core.device import Device, Health, Snapshot
from dpkit.core.errors import ValidationError
from dpkit.core.logs import get_logger, kv
from dpkit.core.validation import check_device_id

log = get_logger("events")
_ids = itertools.count()

Event = tuple[Any, ...]


def private_dir(path: str | Path) -> Path:
    """Create (or tighten) a directory only root can enter: sockets inside it are not reachable by others."""
    directory = Path(path)
    directory.mkdir(parents=True, exist_ok=True)
    os.chmod(directory, 0o700)
    return directory


def connect_error(path: str | Path, timeout: float) -> str:
    """Why a unix stream socket does not accept a connection ("" when it does)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(str(path))
    except OSError as exc:
        return str(exc.strerror or exc)
    finally:
        sock.close()
    return ""


def bind_private(socket: zmq.Socket[Any], path: Path) -> str:
    """Bind an ipc socket at ``path`` and make it mode 0600."""
    try:
        path.unlink()
    except FileNotFoundError:
        pass
    address = f"ipc://{path}"
    socket.bind(address)
    os.chmod(path, 0o600)
    return address


class BusSink:
    """The :class:`~dpkit.core.vendor.EventSink` given to an in-process watcher thread.

    zmq sockets are not thread-safe, so each thread that publishes gets its own PUSH socket.
    """

    def __init__(self, context: zmq.Context[Any], address: str, source: str) -> None:
        self._context = context
        self._address = address
        self._source = source
        self._local = threading.local()
        self._sockets: list[zmq.Socket[Any]] = []
        self._lock = threading.Lock()

    def _socket(self) -> zmq.Socket[Any]:
        sock: zmq.Socket[Any] | None = getattr(self._local, "socket", None)
        if sock is None:
            sock = self._context.socket(zmq.PUSH)
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(self._address)
            self._local.socket = sock
            with self._lock:
                self._sockets.append(sock)
        return sock

    def snapshot(self, snapshot: Snapshot) -> None:
        self._send(("snapshot", self._source, dict(snapshot)))

    def health(self, resource: str, device_id: str, health: Health, reason: str = "") -> None:
        self._send(("health", self._source, resource, device_id, Health(health), reason))

    def _send(self, event: Event) -> None:
        # Never block a vendor's watch thread: a full queue means the manager is stopping or stuck.
        try:
            self._socket().send_pyobj(event, zmq.NOBLOCK)
        except zmq.Again:
            log.warning("event bus full; event dropped", extra=kv(kind=event[0], source=self._source))

    def close(self) -> None:
        with self._lock:
            for sock in self._sockets:
                sock.close(0)
            self._sockets.clear()


def decode_probe_message(raw: bytes, known_probes: Mapping[str, Any]) -> Event | None:
    """Validate one JSON message from a probe process; None (and a log line) when malformed."""
    try:
        message = json.loads(raw)
        kind = message["type"]
        probe = message["probe"]
        if probe not in known_probes:
            raise ValidationError(f"unknown probe {probe!r}")
        if kind == "heartbeat":
            return ("heartbeat", probe)
        if kind == "health":
            resource = str(message["resource"])
            device_id = check_device_id(str(message["id"]))
            health = Health(message["health"])
            reason = str(message.get("reason", ""))[:500]
            return ("health", f"probe:{probe}", resource, device_id, health, reason)
        raise ValidationError(f"unknown message type {kind!r}")
    except (ValueError, KeyError, TypeError) as exc:
        log.warning("dropping malformed probe message", extra=kv(error=str(exc), raw=raw[:200]))
        return None


class EventBus:
    """Owns the zmq context and the two PULL endpoints; the manager's loop polls it."""

    def __init__(self, state_dir: str | Path) -> None:
        self.state_dir = Path(state_dir)
        self.context: zmq.Context[Any] = zmq.Context()
        self.inproc_address = f"inproc://dpkit-events-{os.getpid()}-{next(_ids)}"
        self.ipc_path = self.state_dir / "events.sock"
        self.ipc_address = ""
        self._inproc = self.context.socket(zmq.PULL)
        self._ipc = self.context.socket(zmq.PULL)
        self.poller = zmq.Poller()

    def start(self) -> None:
        private_dir(self.state_dir)
        self._inproc.bind(self.inproc_address)
        self.ipc_address = bind_private(self._ipc, self.ipc_path)
        self.poller.register(self._inproc, zmq.POLLIN)
        self.poller.register(self._ipc, zmq.POLLIN)

    def wake(self) -> None:
        """Wake the consumer's poll at once (used on stop); safe from any thread."""
        sock = self.context.socket(zmq.PUSH)
        sock.setsockopt(zmq.LINGER, 100)
        sock.connect(self.inproc_address)
        sock.send_pyobj(("wake",))
        sock.close()

    def sink(self, source: str) -> BusSink:
        return BusSink(self.context, self.inproc_address, source)

    def drain(self, ready: Mapping[Any, int], known_probes: Mapping[str, Any]) -> list[Event]:
        """Read every message waiting on the sockets ``poller.poll`` reported ready."""
        events: list[Event] = []
        if self._inproc in ready:
            while True:
                try:
                    events.append(self._inproc.recv_pyobj(zmq.NOBLOCK))
                except zmq.Again:
                    break
        if self._ipc in ready:
            while True:
                try:
                    raw = self._ipc.recv(zmq.NOBLOCK)
                except zmq.Again:
                    break
                event = decode_probe_message(raw, known_probes)
                if event is not None:
                    events.append(event)
        return events

    def close(self) -> None:
        self._inproc.close(0)
        self._ipc.close(0)
        self.context.term()
        try:
            self.ipc_path.unlink()
        except FileNotFoundError:
            pass


def validate_snapshot(snapshot: Any, check_resource: Any) -> tuple[dict[str, tuple[Device, ...]], list[str]]:
    """Keep what is valid in a vendor snapshot; return it and the problems found."""
    problems: list[str] = []
    clean: dict[str, tuple[Device, ...]] = {}
    if not isinstance(snapshot, Mapping):
        return clean, [f"vendor returned {type(snapshot).__name__}, not a mapping of resource -> devices"]
    for resource, devices in snapshot.items():
        try:
            check_resource(resource)
        except (ValidationError, TypeError) as exc:
            problems.append(str(exc))
            continue
        if not isinstance(devices, (list, tuple)):
            problems.append(f"{resource}: vendor returned {type(devices).__name__}, not a list of devices")
            continue
        seen: dict[str, Device] = {}
        for device in devices:
            if not isinstance(device, Device):
                problems.append(f"{resource}: vendor returned {type(device).__name__}, not a Device")
                continue
            if device.id in seen:
                problems.append(f"{resource}: duplicate device ID {device.id!r}; keeping the first")
                continue
            seen[device.id] = device
        clean[resource] = tuple(seen.values())
    return clean, problems
