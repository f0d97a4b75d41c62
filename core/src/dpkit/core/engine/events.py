"""The event bus: device changes travel from watchers and probes to the manager.

* In-process vendor watchers (trusted, same process) write to the
  :class:`~dpkit.core.engine.health.HealthBoard`: the latest report per device and source wins.
* Out-of-process probes push small JSON messages over a pyzmq ``ipc`` PULL socket of mode 0600
  in a 0700 state directory; each message is size-capped and validated field by field. The socket,
  and zmq, exist only once the vendor has a probe.

Probe messages are tuples once decoded: ``("health", source, resource, device_id, Health,
reason)`` and ``("heartbeat", probe_name)``.
"""

from __future__ import annotations

import json
import os
import select
import socket
from collections.abc import Callable, Collection, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dpkit.core.engine.health import HealthBoard
from dpkit.core.support import files
from dpkit.core.support.logs import RateLimiter, get_logger, kv
from dpkit.core.vendorapi.device import Device, Health, Snapshot
from dpkit.core.vendorapi.errors import ValidationError
from dpkit.core.vendorapi.validation import check_device_id

log = get_logger("events")
MAX_REASON = 500  # characters of a health reason kept (it travels to logs and status)
MAX_PROBE_MESSAGES_PER_PASS = 10_000
MAX_PROBE_MESSAGE = 64 * 1024  # bytes; a health message is about 200

Event = tuple[Any, ...]

if TYPE_CHECKING:
    import zmq


def private_dir(path: str | Path) -> Path:
    """The directory dpkit's sockets for state_dir ``path`` live in (see :func:`files.private_state_dir`).

    A missing one is created 0700; an existing one is never re-permissioned: if others can
    write it (a shared tmpfs), dpkit uses its own private subdirectory instead.
    """
    return files.private_state_dir(path)


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


def bind_private(bind: Callable[[str], object], path: Path) -> Path:
    """Bind a unix socket named ``path.name`` in :func:`private_dir` of ``path.parent``; its path.

    ``bind`` binds the caller's socket (a plain one or zmq's) to the path it is given. That path
    is in a fresh 0700 staging directory; the socket is made 0600 there and renamed into place,
    so it is never reachable with looser permissions whatever the umask and the directory's mode.
    """
    target = private_dir(path.parent) / path.name
    with files.staging_dir(target.parent) as staging:
        staged = staging / "s.sock"
        bind(str(staged))
        os.chmod(staged, 0o600)
        os.replace(staged, target)  # over a killed run's socket, if any
    return target


class BusSink:
    """The :class:`~dpkit.core.vendorapi.vendor.EventSink` given to an in-process watcher thread.

    Reports go to the :class:`~dpkit.core.engine.health.HealthBoard`, where the latest report per
    device and source replaces the one before: a watcher is never blocked and nothing it says
    last is ever dropped, however fast it reports.
    """

    def __init__(self, board: HealthBoard, source: str) -> None:
        self._board = board
        self._source = source
        self._closed = False

    def snapshot(self, snapshot: Snapshot) -> None:
        if not self._closed:
            self._board.offer_snapshot(self._source, dict(snapshot))

    def health(self, resource: str, device_id: str, health: Health, reason: str = "") -> None:
        if not self._closed:
            self._board.report(self._source, resource, device_id, Health(health), str(reason)[:MAX_REASON])

    def close(self) -> None:
        """A stopped watcher's late reports are ignored (its replacement reports afresh)."""
        self._closed = True


def decode_probe_message(raw: bytes, known_probes: Mapping[str, Any], limiter: RateLimiter | None = None
                         ) -> Event | None:
    """Validate one JSON message from a probe process; None (and a log line, as ``limiter`` allows)
    when malformed."""
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
            reason = str(message.get("reason", ""))[:MAX_REASON]
            return ("health", f"probe:{probe}", resource, device_id, health, reason)
        raise ValidationError(f"unknown message type {kind!r}")
    except (ValueError, KeyError, TypeError, RecursionError) as exc:
        # A peer decides how often this happens: the log shows the problem, not the peer's rate.
        if limiter is None or limiter.allow():
            suppressed = limiter.suppressed() if limiter is not None else 0
            log.warning("dropping malformed probe message",
                        extra=kv(error=str(exc)[:200], raw=raw[:200], suppressed=suppressed))
        return None


class EventBus:
    """The probes' PULL endpoint and the health board; the manager's loop waits on it.

    In-process watchers write to :attr:`board`; the board and :meth:`wake` make the manager's
    wait return through a self-pipe, which is safe from any thread and from a signal handler.
    The probes' endpoint (and zmq with it) exists only once a probe needs it
    (:meth:`probe_endpoint`): a vendor without probes never loads zmq (about 2 MB resident).
    """

    def __init__(self, state_dir: str | Path) -> None:
        self.state_dir = Path(state_dir)
        self.ipc_path = self.state_dir / "events.sock"
        self.ipc_address = ""
        self._zmq: _ProbeEndpoint | None = None
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.board = HealthBoard(self.wake)
        self._garbage_log = RateLimiter(burst=10, interval=60.0)  # a peer decides how often it happens
        self._poll = select.poll()
        self._poll.register(self._wake_r, select.POLLIN)

    def start(self) -> None:
        private_dir(self.state_dir)

    def probe_endpoint(self) -> str:
        """The address probes push to, bound on first use; raises OSError when it cannot be.

        Called by the thread that also waits on the bus (start-up before the loop runs, then the
        loop), so the wait never races the endpoint's creation.
        """
        if self._zmq is None:
            self._zmq = _ProbeEndpoint(self.ipc_path, self._wake_r)
            self.ipc_path = self._zmq.path  # in private_dir(state_dir)
            self.ipc_address = f"ipc://{self.ipc_path}"
        return self.ipc_address

    def wait(self, timeout: float) -> set[object]:
        """Sleep until something arrived or ``timeout`` seconds passed; what is ready (for :meth:`drain`)."""
        ms = int(timeout * 1000) + 1
        if self._zmq is not None:
            return self._zmq.poll(ms)
        return {fd for fd, _ in self._poll.poll(ms)}

    def wake(self) -> None:
        """Make the consumer's poll return at once; safe from any thread."""
        try:
            os.write(self._wake_w, b"w")
        except BlockingIOError:  # the pipe is full: a wake-up is already pending
            pass
        except OSError:  # closed: the bus is stopping
            pass

    def sink(self, source: str) -> BusSink:
        return BusSink(self.board, source)

    def drain(self, ready: Collection[object], known_probes: Mapping[str, Any],
              limit: int = MAX_PROBE_MESSAGES_PER_PASS) -> list[Event]:
        """Read the probes' messages waiting (at most ``limit``, so one flooding probe cannot
        starve the control socket; the rest wait for the next pass) and clear the wake pipe."""
        if self._wake_r in ready:
            try:
                while os.read(self._wake_r, 4096):
                    pass
            except BlockingIOError:
                pass
        events: list[Event] = []
        if self._zmq is not None and self._zmq.socket in ready:
            for raw in self._zmq.receive(limit):
                event = decode_probe_message(raw, known_probes, self._garbage_log)
                if event is not None:
                    events.append(event)
        return events

    def close(self) -> None:
        if self._zmq is not None:
            self._zmq.close()
        for fd in (self._wake_r, self._wake_w):
            try:
                os.close(fd)
            except OSError:
                pass
        if self.ipc_address:
            files.remove_own_socket(self.ipc_path)  # never a file someone else put at that name


class _ProbeEndpoint:
    """The zmq side of the bus: a PULL socket in the private state directory, and a poller over it
    and the wake pipe."""

    def __init__(self, path: Path, wake_fd: int) -> None:
        import zmq

        self._zmq = zmq
        self.context: zmq.Context[Any] = zmq.Context()
        self.socket: zmq.Socket[Any] = self.context.socket(zmq.PULL)
        self.socket.setsockopt(zmq.MAXMSGSIZE, MAX_PROBE_MESSAGE)  # a larger message drops its sender
        try:
            self.path = bind_private(lambda staged: self.socket.bind(f"ipc://{staged}"), path)
        except zmq.ZMQError as exc:
            self.close()
            raise OSError(exc.errno, f"cannot bind the probes' endpoint: {exc}") from exc
        self.poller = zmq.Poller()
        self.poller.register(self.socket, zmq.POLLIN)
        self.poller.register(wake_fd, zmq.POLLIN)

    def poll(self, ms: int) -> set[object]:
        try:
            return set(dict(self.poller.poll(ms)))
        except self._zmq.ZMQError as exc:  # the context ended under a stopping loop
            raise OSError(exc.errno, str(exc)) from exc

    def receive(self, limit: int) -> list[bytes]:
        messages: list[bytes] = []
        for _ in range(limit):
            try:
                messages.append(self.socket.recv(self._zmq.NOBLOCK))
            except self._zmq.Again:
                break
        return messages

    def close(self) -> None:
        self.socket.close(0)
        self.context.term()


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
        # every device valid and unique: keep the vendor's own tuple (100k entries less at 100k devices)
        clean[resource] = devices if isinstance(devices, tuple) and len(seen) == len(devices) else tuple(seen.values())
    return clean, problems
