"""Keeping resources registered with the kubelet, across kubelet absences and restarts.

The kubelet announces itself by (re)creating ``kubelet.sock`` in the plugin directory; a kubelet
restart also wipes the directory, deleting our sockets. An inotify watch on the directory turns
both into an immediate reconcile, so no busy polling is needed: each reconcile restarts any
server whose socket vanished and registers every resource not registered with the current
kubelet socket. While the kubelet is absent, retries back off up to ``backoff_max`` seconds.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import grpc

from dpkit.core.api.v1beta1 import api_pb2, api_pb2_grpc
from dpkit.core.engine.server import ResourceServer
from dpkit.core.support import dirwatch
from dpkit.core.support.dirwatch import DirWatch
from dpkit.core.support.logs import get_logger, kv

log = get_logger("registration")

VERSION = "v1beta1"
_WATCH = (
    dirwatch.CREATE
    | dirwatch.DELETE
    | dirwatch.MOVED_TO
    | dirwatch.MOVED_FROM
    | dirwatch.DELETE_SELF
    | dirwatch.MOVE_SELF
    | dirwatch.ATTRIB
)
_GONE = dirwatch.DELETE_SELF | dirwatch.MOVE_SELF | dirwatch.IGNORED  # the watch no longer sees the directory
SAFETY_INTERVAL = 5.0  # a cheap reconcile even without events, in case inotify is not delivered


def register(kubelet_socket: Path, server: ResourceServer, timeout: float = 5.0) -> None:
    """One Register call; raises grpc.RpcError or OSError on failure."""
    if not kubelet_socket.exists():
        raise FileNotFoundError(f"kubelet socket {kubelet_socket} does not exist")
    with grpc.insecure_channel(f"unix://{kubelet_socket}") as channel:
        stub = api_pb2_grpc.RegistrationStub(channel)
        stub.Register(
            api_pb2.RegisterRequest(
                version=VERSION,
                endpoint=server.socket_path.name,
                resource_name=server.resource,
                options=server.options,
            ),
            timeout=timeout,
        )


def _socket_identity(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_ino, st.st_ctime_ns)


@dataclass
class RegistrationState:
    registered_with: tuple[int, int] | None = None  # identity of kubelet.sock we registered with
    registrations: int = 0
    last_error: str = ""
    last_registered: float = 0.0


class KubeletLink:
    """Owns the registration of a set of resource servers with one kubelet plugin directory.

    The manager edits a *desired* set (:meth:`add`, :meth:`remove`); the watch thread reconciles
    the kubelet towards it. Membership, per-resource state and the resource in flight live under
    one lock, and a pass re-reads the desired set before each step it takes on a resource, so a
    pass that started before a removal (or a replacement) never acts on the old member again.
    """

    def __init__(
        self,
        plugin_dir: str | Path,
        kubelet_socket: str | Path,
        *,
        backoff_max: float = 5.0,
        on_event: Callable[[str, str], None] | None = None,
    ) -> None:
        self.plugin_dir = Path(plugin_dir)
        self.kubelet_socket = self.plugin_dir / kubelet_socket
        self.backoff_max = backoff_max
        self.on_event = on_event  # (kind, resource) for metrics: "registered", "kubelet_restart", ...
        self.state: dict[str, RegistrationState] = {}  # written under the lock only
        self.kubelet_restarts = 0
        self._desired: dict[str, ResourceServer] = {}
        self._version = 0  # bumped by every add and remove
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)  # notified when the resource in flight is done
        self._busy: str | None = None  # the resource whose restart or registration is in flight
        self._stopping = False
        self._pass = threading.Lock()  # one reconcile pass at a time
        self._stop = threading.Event()
        self._kick_r, self._kick_w = os.pipe()
        os.set_blocking(self._kick_w, False)  # a full pipe already means "reconcile": never block a kick
        self._thread: threading.Thread | None = None
        self._backoff = 0.1
        self._next_retry: float | None = None
        self._last_kubelet: tuple[int, int] | None = None

    # -- membership ----------------------------------------------------------------------
    @property
    def servers(self) -> dict[str, ResourceServer]:
        """A copy of the desired set: resource -> server."""
        with self._lock:
            return dict(self._desired)

    @property
    def version(self) -> int:
        """The desired set's version; every add and remove bumps it."""
        with self._lock:
            return self._version

    def add(self, server: ResourceServer) -> None:
        """Register ``server`` (and keep it registered). A new server for a resource starts unregistered.

        Replacing a resource's server waits, like :meth:`remove`, for work in flight on the old one.
        """
        with self._changed:
            if self._desired.get(server.resource) is not server:
                self._settle(server.resource)
                self.state[server.resource] = RegistrationState()
            self._desired[server.resource] = server
            self._version += 1
        self.kick()

    def remove(self, resource: str) -> ResourceServer | None:
        """Stop registering ``resource`` and stop its server; returns that server, stopped.

        Waits for a restart or registration of ``resource`` already in flight to finish or give up
        (each is bounded: Register has a 5 s deadline), so when this returns the link will never
        touch the server again and its socket is gone. The kubelet sees the plugin's stream end.
        """
        with self._changed:
            server = self._desired.pop(resource, None)
            self.state.pop(resource, None)
            self._version += 1
            self._settle(resource)
        if server is not None:
            server.stop()
        return server

    def _settle(self, resource: str) -> None:
        """Under the lock: wait until no pass is working on ``resource`` (never on the link's own thread)."""
        if self._busy == resource and threading.current_thread() is not self._thread:
            self._removal_waits(resource)
            self._changed.wait_for(lambda: self._busy != resource)

    def _removal_waits(self, resource: str) -> None:
        """Called under the lock just before a membership change waits for ``resource``'s work in flight.

        Does nothing; tests override it to see the wait begin. It must neither block nor take the lock.
        """

    def kick(self) -> None:
        """Ask the watch thread to reconcile now."""
        with self._lock:
            if self._stopping:  # the pipe may be closed, and its descriptor number reused
                return
            try:
                os.write(self._kick_w, b"x")
            except OSError:
                pass

    # -- thread --------------------------------------------------------------------------
    def start(self) -> None:
        self.plugin_dir.mkdir(parents=True, exist_ok=True)
        self._last_kubelet = _socket_identity(self.kubelet_socket)
        self._thread = threading.Thread(target=self._run, name="kubelet-link", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the watch thread; the pass in progress registers nothing more. Idempotent."""
        with self._lock:
            if self._stopping:
                return
            self._stopping = True
            self._stop.set()
            try:
                os.write(self._kick_w, b"x")
            except OSError:
                pass
        if self._thread is not None:
            self._thread.join(10)  # a Register in flight has a 5 s deadline
            if self._thread.is_alive():  # it still selects on the pipe: leave it open
                log.warning("kubelet link thread did not stop in time")
                return
        for fd in (self._kick_r, self._kick_w):
            try:
                os.close(fd)
            except OSError:
                pass

    def _watch(self, inotify: DirWatch) -> int | None:
        try:
            self.plugin_dir.mkdir(parents=True, exist_ok=True)
            return inotify.add_watch(self.plugin_dir, _WATCH)
        except OSError as exc:
            log.warning("cannot watch plugin directory", extra=kv(dir=str(self.plugin_dir), error=str(exc)))
            return None

    def _run(self) -> None:
        import select

        with DirWatch() as inotify:
            wd = self._watch(inotify)
            while not self._stop.is_set():
                try:
                    self.reconcile()
                except Exception:  # never let the watch thread die
                    log.exception("reconcile failed")
                timeout = SAFETY_INTERVAL
                if self._next_retry is not None:
                    timeout = max(0.0, min(timeout, self._next_retry - time.monotonic()))
                readable, _, _ = select.select([inotify.fileno(), self._kick_r], [], [], timeout)
                if self._kick_r in readable:
                    os.read(self._kick_r, 4096)
                if inotify.fileno() in readable:
                    if any(mask & _GONE for mask in inotify.read()):
                        log.warning("plugin directory removed; recreating it and watching again")
                        wd = None
                if wd is None:
                    wd = self._watch(inotify)

    # -- the reconcile step --------------------------------------------------------------
    def reconcile(self) -> None:
        """Restart servers whose socket vanished; register everything not registered with this kubelet."""
        with self._pass:
            kubelet = _socket_identity(self.kubelet_socket)
            if kubelet is not None and self._last_kubelet is not None and kubelet != self._last_kubelet:
                self.kubelet_restarts += 1
                log.info("kubelet restart detected (kubelet.sock recreated); re-registering")
                if self.on_event:
                    self.on_event("kubelet_restart", "")
            if kubelet is not None:
                self._last_kubelet = kubelet
            with self._lock:
                version = self._version
                members = list(self._desired.items())
            failed = False
            for resource, server in members:
                with self._lock:
                    if not self._wanted(resource, server):
                        continue
                    self._busy = resource
                try:
                    failed = not self._reconcile_one(resource, server, kubelet) or failed
                finally:
                    with self._changed:
                        self._busy = None
                        self._changed.notify_all()
            with self._lock:
                if self._version != version and not self._stopping:
                    failed = False
                    self._next_retry = time.monotonic()  # the set changed during the pass: go again now
                    return
            if failed:
                self._next_retry = time.monotonic() + self._backoff
                self._backoff = min(self._backoff * 2, self.backoff_max)
            else:
                self._next_retry = None
                self._backoff = 0.1

    def _wanted(self, resource: str, server: ResourceServer) -> bool:
        """Under the lock: is ``server`` still the desired member for ``resource``, and are we running?"""
        return not self._stopping and self._desired.get(resource) is server

    def _reconcile_one(self, resource: str, server: ResourceServer, kubelet: tuple[int, int] | None) -> bool:
        """Bring one member up and registered; False when it needs a retry. Runs with it marked in flight."""
        if not server.socket_present():
            with self._lock:
                if not self._wanted(resource, server):
                    return True
            log.info("plugin socket missing; restarting server", extra=kv(resource=resource))
            try:
                server.restart()
            except Exception as exc:
                with self._lock:
                    if resource in self.state and self._wanted(resource, server):
                        self.state[resource].last_error = f"restart failed: {exc}"
                log.error("server restart failed", extra=kv(resource=resource, error=str(exc)))
                return False
            with self._lock:
                if self._wanted(resource, server):
                    self.state[resource].registered_with = None
        with self._lock:
            if not self._wanted(resource, server):
                return True
            state = self.state[resource]
            if kubelet is None:
                state.registered_with = None
                missing = f"kubelet socket {self.kubelet_socket} not present; waiting for the kubelet"
                if state.last_error != missing:  # log once per absence, not once per retry
                    log.warning(missing, extra=kv(resource=resource))
                state.last_error = missing
                return False
            if state.registered_with == kubelet:
                return True
        try:
            register(self.kubelet_socket, server)
        except (grpc.RpcError, OSError) as exc:
            detail = exc.details() if isinstance(exc, grpc.RpcError) else str(exc)
            with self._lock:
                if self._wanted(resource, server):
                    self.state[resource].last_error = f"kubelet registration failed: {detail}"
            log.warning(
                "registration failed; will retry",
                extra=kv(resource=resource, error=detail, retry_in=round(self._backoff, 2)),
            )
            return False
        with self._lock:
            if not self._wanted(resource, server):  # removed or stopped meanwhile: whoever did it stops the server
                # The kubelet did accept it: say so, so the log shows the registration its removal ends.
                log.info("registered with the kubelet", extra=kv(resource=resource, endpoint=server.socket_path.name,
                                                                 superseded=True))
                return True
            state = self.state[resource]
            state.registered_with = kubelet
            state.registrations += 1
            state.last_error = ""
            state.last_registered = time.time()
        log.info("registered with the kubelet", extra=kv(resource=resource, endpoint=server.socket_path.name))
        if self.on_event:
            self.on_event("registered", resource)
        return True

    def registered(self, resource: str) -> bool:
        with self._lock:
            state = self.state.get(resource)
            return bool(state and state.registered_with is not None)
