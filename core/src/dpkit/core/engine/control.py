"""The read-only control socket behind ``dpkit status``: both ends, the status document and its table.

The manager answers on its own thread (:class:`ControlServer`), so rendering a status (which
asks observers such as the pod view, who may ask the kubelet) never runs on the manager's loop.
The document is rendered from one :class:`~dpkit.core.engine.state.PluginState`.

The transport is a plain unix stream socket: one JSON request, one JSON reply, per connection.
"""

from __future__ import annotations

import json
import os
import selectors
import socket
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from dpkit.core.engine.state import PluginState, ResourceState
from dpkit.core.support.logs import RateLimiter, get_logger, kv
from dpkit.core.vendorapi.errors import DpkitError

log = get_logger("control")

MAX_KEPT_TEXT = 500  # characters of one kept error message or field
MAX_CONTROL_REQUEST = 4096  # bytes; a control request is a few dozen
MAX_CONTROL_REPLY = 1 << 30  # bytes a client takes; a status of 100k devices is about 15 MB
MAX_CLIENTS = 32  # connections served at once; one more drops the oldest
REQUEST_TIMEOUT = 2.0  # seconds a client has to send its request
REPLY_TIMEOUT = 10.0  # seconds a client has to take its reply


def clip(text: str, limit: int = MAX_KEPT_TEXT) -> str:
    return text if len(text) <= limit else text[:limit] + f"... ({len(text) - limit} more characters)"


def status_document(state: PluginState, sections: Mapping[str, object], *,
                    observers: list[dict[str, object]] | None = None) -> dict[str, Any]:
    """What ``dpkit status --json`` shows, from one state plus what the observers add."""
    now, wall = time.monotonic(), time.time()
    pod = sections.get("pod_resources")
    holders = pod.get("holders") if isinstance(pod, Mapping) else None
    return {
        "vendor": state.vendor,
        "pid": state.pid,
        "uptime_s": round(wall - state.started_at, 1),
        "version": state.version,
        "kubelet": {"socket": state.kubelet.socket, "present": state.kubelet.present,
                    "restarts_seen": state.kubelet.restarts_seen},
        "resources": [_resource(r, holders.get(r.name, {}) if isinstance(holders, Mapping) else {})
                      for r in state.resources.values()],
        "probes": [{"name": p.name, "pid": p.pid, "alive": p.alive, "silent": p.silent, "heartbeats": p.heartbeats,
                    "last_heartbeat_age": round(now - p.last_heartbeat, 3) if p.heartbeats else None,
                    "restarts": p.restarts, "timeout": p.timeout} for p in state.probes],
        "reloads": state.reloads,
        "health": {"reports": state.health.reports, "coalesced": state.health.coalesced,
                   "changes_published": state.health.changes_published},
        "server_failures": {r: {"attempts": f.attempts, "error": f.error,
                                "retry_in_s": round(max(0.0, f.next_try - now), 1)}
                            for r, f in sorted(state.server_failures.items())},
        "errors": [dict(e) for e in state.errors],
        "observers": observers or [],
        **sections,
    }


def _resource(resource: ResourceState, holders: object) -> dict[str, Any]:
    serving = resource.serving
    return {
        "name": resource.name,
        "socket": serving.socket,
        "registered": serving.registered,
        "registrations": serving.registrations,
        "last_error": serving.last_error,
        "streams": serving.streams,
        "allocations": serving.allocations,
        "allocate_errors": serving.allocate_errors,
        "capacity": resource.capacity,
        "allocatable": resource.allocatable,
        "devices": [{"id": d.id, "health": str(d.health), "reason": d.reason, "numa": list(d.numa_nodes),
                     "attributes": dict(d.attributes)} for d in resource.devices],
        "holders": holders,
    }


class ControlServer:
    """Answers ``status`` and ``ping`` on a unix stream socket, on its own thread.

    One request per connection: the client sends one JSON object (at most MAX_CONTROL_REQUEST
    bytes, ended by a newline or by closing its side) and gets one JSON reply, then the connection
    closes. Every connection that sends anything gets exactly one reply, whatever it holds: the
    liveness probe uses this socket. ``ping`` returns an error text when the manager's loop does
    not answer, so a wedged loop still fails the liveness probe.

    Plain sockets, not zmq: a vendor without probes then never loads zmq (about 2 MB of a serving
    process; docs/performance.md). Clients are served side by side, each bounded in time
    (REQUEST_TIMEOUT to send its request, REPLY_TIMEOUT to take the reply) and in number
    (MAX_CLIENTS, the oldest dropped first), so a silent or slow client delays nobody for long.
    """

    def __init__(self, listener: socket.socket, path: Path, status: Callable[[], dict[str, Any]],
                 ping: Callable[[], str]) -> None:
        self._listener = listener
        self.path = path
        self._status = status
        self._ping = ping
        self._stop = threading.Event()
        self._wake_r, self._wake_w = os.pipe()  # stop() writes here: the thread sleeps until a request or this
        self._thread = threading.Thread(target=self._run, name="control", daemon=True)
        self._accept_errors = RateLimiter(burst=3, interval=60.0)

    @classmethod
    def bind(cls, path: Path, status: Callable[[], dict[str, Any]], ping: Callable[[], str]) -> ControlServer:
        """Listen on ``path.name`` in the private state directory of ``path.parent`` (mode 0600)."""
        from dpkit.core.engine.events import bind_private

        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            bound = bind_private(listener.bind, path)
            listener.listen(MAX_CLIENTS)
            listener.setblocking(False)
        except BaseException:
            listener.close()
            raise
        return cls(listener, bound, status, ping)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """End the thread, which closes the socket (it alone may touch it)."""
        self._stop.set()
        os.write(self._wake_w, b"x")
        if self._thread.is_alive():
            self._thread.join(timeout)
        else:
            self._listener.close()
        if not self._thread.is_alive():
            for fd in (self._wake_r, self._wake_w):
                os.close(fd)

    def _run(self) -> None:
        clients: dict[socket.socket, _Client] = {}
        selector = selectors.DefaultSelector()
        selector.register(self._listener, selectors.EVENT_READ)
        selector.register(self._wake_r, selectors.EVENT_READ)
        try:
            while not self._stop.is_set():
                deadline = min((c.deadline for c in clients.values()), default=None)
                timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
                for key, _ in selector.select(timeout):  # no timeout while idle: an idle plugin never wakes here
                    if key.fileobj is self._listener:
                        self._accept(selector, clients)
                    elif key.fileobj in clients:
                        conn = key.fileobj
                        assert isinstance(conn, socket.socket)
                        client = clients[conn]
                        if client.receive(conn):
                            self._finish(selector, clients, conn, client.request)
                now = time.monotonic()
                for conn, client in list(clients.items()):
                    if client.deadline <= now:
                        self._finish(selector, clients, conn, None)
        except Exception:
            if not self._stop.is_set():
                log.exception("control socket failed; `dpkit status` will not answer")
        finally:
            for conn in clients:
                conn.close()
            selector.close()
            self._listener.close()

    def _accept(self, selector: selectors.BaseSelector, clients: dict[socket.socket, _Client]) -> None:
        try:
            conn, _ = self._listener.accept()
        except (BlockingIOError, InterruptedError, ConnectionAbortedError):
            return
        except OSError as exc:  # out of file descriptors, say: keep serving those already connected
            if self._accept_errors.allow():
                log.warning("control socket cannot accept a connection; retrying",
                            extra=kv(error=exc.strerror or str(exc), suppressed=self._accept_errors.suppressed()))
            self._stop.wait(0.1)  # the listener stays readable: do not spin on it
            return
        if len(clients) >= MAX_CLIENTS:  # the oldest, which has had the longest to send its request
            oldest = min(clients, key=lambda c: clients[c].deadline)
            selector.unregister(oldest)
            del clients[oldest]
            oldest.close()
        conn.setblocking(False)
        clients[conn] = _Client(time.monotonic() + REQUEST_TIMEOUT)
        selector.register(conn, selectors.EVENT_READ)

    def _finish(self, selector: selectors.BaseSelector, clients: dict[socket.socket, _Client],
                conn: socket.socket, request: bytes | None) -> None:
        """Reply to one client (``request`` None: it did not finish sending in time) and close."""
        selector.unregister(conn)
        del clients[conn]
        with conn:
            if request is None:
                reply = {"ok": False, "error": f"request not complete within {REQUEST_TIMEOUT:g}s"}
                data = json.dumps(reply).encode()
            else:
                data = self._answer(request)
            try:
                conn.settimeout(REPLY_TIMEOUT)  # for the whole reply (sendall's timeout is its total)
                conn.sendall(data)
            except OSError:  # gone or not reading: its loss alone
                pass

    def _answer(self, raw: bytes) -> bytes:
        reply: dict[str, Any]
        try:
            reply = self.reply(raw)
        except Exception as exc:  # including RecursionError from a hostile document
            reply = {"ok": False, "error": f"bad request: {clip(type(exc).__name__ + ': ' + str(exc), 200)}"}
        try:
            return json.dumps(reply, default=str).encode()
        except Exception as exc:
            return json.dumps({"ok": False, "error": f"cannot encode reply: {clip(str(exc), 200)}"}).encode()

    def reply(self, raw: bytes) -> dict[str, Any]:
        if len(raw) > MAX_CONTROL_REQUEST:
            return {"ok": False, "error": f"request of over {MAX_CONTROL_REQUEST} bytes; the limit is "
                                          f"{MAX_CONTROL_REQUEST}"}
        request = json.loads(raw)
        command = request.get("cmd") if isinstance(request, dict) else None
        if command == "status":
            return {"ok": True, "status": self._status()}
        if command == "ping":
            problem = self._ping()
            return {"ok": False, "error": problem} if problem else {"ok": True}
        return {"ok": False, "error": "read-only control socket: commands are 'status' and 'ping'"}


class _Client:
    """One connection's request as it arrives."""

    __slots__ = ("buffer", "deadline")

    def __init__(self, deadline: float) -> None:
        self.buffer = bytearray()
        self.deadline = deadline

    def receive(self, conn: socket.socket) -> bool:
        """Read what is there; True once the request is complete (a newline, the peer's end of
        sending, or more than the limit, which is answered without reading the rest)."""
        try:
            chunk = conn.recv(MAX_CONTROL_REQUEST + 1 - len(self.buffer))
        except (BlockingIOError, InterruptedError):
            return False
        except OSError:
            return True  # reset: the reply goes nowhere, but the connection is done
        self.buffer += chunk
        return not chunk or b"\n" in self.buffer or len(self.buffer) > MAX_CONTROL_REQUEST

    @property
    def request(self) -> bytes:
        return bytes(self.buffer.partition(b"\n")[0]) if len(self.buffer) <= MAX_CONTROL_REQUEST else bytes(self.buffer)


def query(state_dir: str | Path, command: str = "status", timeout: float = 3.0) -> dict[str, Any]:
    """Ask a running manager; raises DpkitError when nothing answers in ``timeout`` seconds."""
    from dpkit.core.support.files import private_state_dir

    path = private_state_dir(state_dir, create=False) / "control.sock"  # where the manager bound it
    if not path.exists():
        raise DpkitError(f"no control socket at {path}: is `dpkit run` running with this state_dir?")
    deadline = time.monotonic() + timeout
    chunks: list[bytes] = []
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        try:
            sock.settimeout(timeout)
            sock.connect(str(path))
            sock.sendall(json.dumps({"cmd": command}).encode() + b"\n")
            sock.shutdown(socket.SHUT_WR)
            received = 0
            while True:
                try:
                    chunk = sock.recv(1 << 16)
                except ConnectionResetError:  # the server closed with our request partly unread
                    if not chunks:
                        raise
                    break
                if not chunk:
                    break
                received += len(chunk)
                if received > MAX_CONTROL_REPLY:
                    raise DpkitError(f"the manager at {path} sent a reply of over {MAX_CONTROL_REPLY} bytes")
                chunks.append(chunk)
                sock.settimeout(max(0.001, deadline - time.monotonic()))
        except TimeoutError:
            raise DpkitError(f"the manager at {path} did not answer within {timeout:g}s") from None
        except (ConnectionRefusedError, FileNotFoundError):
            raise DpkitError(f"nothing listens on the control socket {path}: `dpkit run` is not running "
                             "(a killed run leaves its socket behind)") from None
        except OSError as exc:
            raise DpkitError(f"control socket {path}: {exc.strerror or exc}") from None
    try:
        reply: dict[str, Any] = json.loads(b"".join(chunks))
    except ValueError:
        raise DpkitError(f"the manager at {path} closed the connection without a complete answer") from None
    if not isinstance(reply, dict) or not reply.get("ok"):
        raise DpkitError(str(reply.get("error", "control request failed") if isinstance(reply, dict)
                             else "control request failed"))
    return reply


def collapse(
    devices: list[dict[str, Any]], holders: dict[str, str] | None = None, min_run: int = 4
) -> list[tuple[str, str, int, dict[str, Any]]]:
    """Fold runs of devices that look alike (shared slots such as 1000 kvm slots) into one row.

    Returns (first id, last id, count, representative) per row; runs shorter than ``min_run``
    stay one row per device.
    """
    holders = holders or {}

    def look(dev: dict[str, Any]) -> tuple[Any, ...]:
        return (dev["health"], tuple(dev["numa"]) if isinstance(dev["numa"], list) else dev["numa"],
                dev["reason"], tuple(sorted(dev.get("attributes", {}).items())), holders.get(dev["id"]))

    rows: list[tuple[str, str, int, dict[str, Any]]] = []
    run: list[dict[str, Any]] = []
    for dev in [*devices, None]:
        if dev is not None and run and look(dev) == look(run[0]):
            run.append(dev)
            continue
        if len(run) >= min_run:
            rows.append((run[0]["id"], run[-1]["id"], len(run), run[0]))
        else:
            rows.extend((d["id"], d["id"], 1, d) for d in run)
        run = [dev] if dev is not None else []
    return rows


def format_status(status: dict[str, Any]) -> str:
    """A table for people; ``--json`` gives the same data to machines."""
    lines = [
        f"vendor {status['vendor']}  pid {status['pid']}  up {status['uptime_s']}s  "
        f"kubelet {'present' if status['kubelet']['present'] else 'ABSENT'} "
        f"(restarts seen: {status['kubelet']['restarts_seen']})",
    ]
    if not status["resources"]:
        lines.append("")
        lines.append("NOTHING TO REGISTER: the vendor reports no resources, or only invalid resource names "
                     "(`dpkit discover` says why); `dpkit run` exits 1 after its grace period")
    for res in status["resources"]:
        reg = "registered" if res["registered"] else "NOT registered"
        holders = res.get("holders", {})
        # "healthy", not "allocatable": a healthy device a pod holds is not free
        held = f", {sum(1 for d in res['devices'] if d['id'] in holders)} held" if holders else ""
        lines.append("")
        lines.append(f"{res['name']}: {res['allocatable']}/{res['capacity']} healthy{held}, {reg} "
                     f"({res['registrations']}x), streams {res['streams']}, allocations {res['allocations']}")
        if res["last_error"]:
            lines.append(f"  last error: {res['last_error']}")
        rows = [(first if count == 1 else f"{first}..{last} ({count})", dev)
                for first, last, count, dev in collapse(res["devices"], holders)]
        width = max([len(name) for name, _ in rows] + [6])
        lines.append(f"  {'DEVICE':<{width}}  {'HEALTH':<9}  {'NUMA':<5}  {'HELD BY':<24}  REASON")
        for name, dev in rows:
            numa = ",".join(str(n) for n in dev["numa"]) or "-"
            lines.append(f"  {name:<{width}}  {dev['health']:<9}  {numa:<5}  "
                         f"{holders.get(dev['id'], '-'):<24}  {dev['reason']}".rstrip())
    if status.get("probes"):
        lines.append("")
        for probe in status["probes"]:
            state = "SILENT" if probe["silent"] else ("alive" if probe["alive"] else "starting")
            lines.append(f"probe {probe['name']}: {state}, pid {probe['pid']}, heartbeats {probe['heartbeats']}, "
                         f"restarts {probe['restarts']}")
    if status.get("errors"):
        lines.append("")
        lines.append("recent warnings and errors:")
        for err in status["errors"][-10:]:
            lines.append(f"  [{err['level']}] {err['msg']}" + "".join(
                f" {k}={v}" for k, v in err.items() if k not in ("ts", "level", "msg")))
    return "\n".join(lines)
