"""The one guarded path from the core into vendor code.

Every core caller asks :class:`VendorCalls` instead of the :class:`~dpkit.core.vendorapi.vendor.Vendor`: a hook
the vendor overrides runs on a small shared pool of daemon threads under ``timeout``, so a hung
driver call costs its caller one deadline, never start-up, the manager loop, a scrape or shutdown.
A hook the vendor leaves to the base class is core code and runs right here (no thread hop).
A timeout becomes :class:`VendorTimeout`; any other exception is re-raised as the vendor raised it,
so callers keep their handling. Both are counted per hook for ``dpkit_vendor_call_errors_total``.
A call still running past its deadline holds its thread until the vendor returns, so while one call
of a hook (for one resource and, for Allocate's hooks, one device set) is stuck, the same call fails
at once instead of taking another thread, and at most ``MAX_STUCK`` calls of a hook per resource may
be stuck at all: a hook that always hangs costs a few threads, never the pool that every other hook
and resource shares, while a hang on one device's spec still lets the resource's other devices in.
``watch`` runs on the caller's thread (it is a long-running thread body of its own); it is counted too.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any, TypeVar

from dpkit.core.support.logs import get_logger, kv
from dpkit.core.vendorapi.device import ContainerSpec, Device, Snapshot
from dpkit.core.vendorapi.vendor import INLINE_HOOKS, Check, EventSink, Finding, MetricSample, Probe, Vendor

log = get_logger("vendor")

POOL_SIZE = 32  # worker threads shared by every VendorCalls; a hung hook holds one until it returns
MAX_STUCK = 4  # calls of one hook for one resource that may be past their deadline at once

_T = TypeVar("_T")


class VendorTimeout(Exception):
    """A vendor hook did not answer within the deadline."""


class _Interrupted(Exception):
    """The wait for a vendor call was cut short by a stop."""


class _DaemonPool:
    """A growing pool of daemon threads.

    ``concurrent.futures.ThreadPoolExecutor`` joins its workers at interpreter exit, so one hung
    vendor call would keep a stopped plugin from exiting; these threads are simply abandoned.
    """

    def __init__(self, size: int) -> None:
        self._size = size
        self._stuck = 0  # workers held by calls past their deadline: the pool grows by as many
        self._jobs: queue.SimpleQueue[tuple[Future[Any], Callable[..., Any], tuple[Any, ...]]] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._threads = 0
        self._idle = 0  # workers waiting for a job
        self._queued = 0  # jobs no worker has taken yet

    def submit(self, func: Callable[..., _T], *args: Any) -> Future[_T]:
        future: Future[_T] = Future()
        with self._lock:
            self._queued += 1
            self._jobs.put((future, func, args))
            # counted, not a semaphore: a permit left by a finished job must not stand in for a worker
            if self._queued > self._idle and self._threads < self._size + self._stuck:
                self._threads += 1
                threading.Thread(target=self._work, name=f"vendor-call-{self._threads}", daemon=True).start()
        return future

    def abandon(self, future: Future[Any]) -> None:
        """``future``'s call ran past its deadline: its worker no longer counts against the size."""
        with self._lock:
            self._stuck += 1
        future.add_done_callback(self._returned)

    def _returned(self, _: Future[Any]) -> None:
        with self._lock:
            self._stuck -= 1

    def _work(self) -> None:
        while True:
            with self._lock:
                self._idle += 1
            future, func, args = self._jobs.get()
            with self._lock:
                self._idle -= 1
                self._queued -= 1
            if future.set_running_or_notify_cancel():
                try:
                    result = func(*args)
                except BaseException as exc:
                    future.set_exception(exc)
                else:
                    future.set_result(result)
            del future, func, args


_pool: _DaemonPool | None = None
_pool_lock = threading.Lock()


def _shared_pool() -> _DaemonPool:
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = _DaemonPool(POOL_SIZE)
        return _pool


def _forget_pool_in_child() -> None:
    """A forked child has none of the pool's threads (and maybe a lock a parent thread held):
    it starts a pool of its own on first use, or its first vendor call would wait forever."""
    global _pool, _pool_lock
    _pool = None
    _pool_lock = threading.Lock()


os.register_at_fork(after_in_child=_forget_pool_in_child)


_SPEC_PLANS: dict[type[Vendor], str] = {}


def _spec_plan(kind: type[Vendor]) -> str:
    """How ``container_spec`` of a vendor class runs: "here" (the base class's merge), "inline"
    (the vendor's promise that it answers from memory) or "guarded" (on the pool, under the deadline)."""
    plan = _SPEC_PLANS.get(kind)
    if plan is None:
        if not kind.overrides("container_spec"):
            plan = "here"
        elif "container_spec" in kind.inline_hooks and "container_spec" in INLINE_HOOKS:
            plan = "inline"
        else:
            plan = "guarded"
        _SPEC_PLANS[kind] = plan
    return plan


class VendorCalls:
    """One vendor's hooks, each under ``timeout`` seconds when the vendor implements it.

    ``vendor`` may be replaced (a reload builds a new one); ``errors`` maps (hook, kind) to a
    count, kind being ``timeout`` or ``error``.
    """

    def __init__(self, vendor: Vendor, timeout: float, scan_timeout: float = 60.0) -> None:
        self.vendor = vendor
        self.timeout = timeout
        self._scan_timeout = scan_timeout
        self.errors: dict[tuple[str, str], int] = {}
        self._logged: set[tuple[str, str]] = set()  # (hook, kind) whose failure was logged already
        # (vendor, hook, resource) -> a call past its deadline; a reload's new vendor starts afresh
        self._stuck: dict[tuple[int, str, str, tuple[str, ...]], Future[Any]] = {}
        self._lock = threading.Lock()
        self._interrupted = threading.Event()

    @property
    def name(self) -> str:
        return self.vendor.name

    def overrides(self, hook: str) -> bool:
        return self.vendor.overrides(hook)

    # -- the hooks -------------------------------------------------------------------------------
    def discover(self) -> Snapshot:
        vendor = self.vendor
        return self._hook("discover", lambda: vendor.discover(), self.scan_timeout)

    def probes(self) -> list[Probe]:
        vendor = self.vendor
        return self._hook("probes", lambda: list(vendor.probes()), self.scan_timeout)

    def container_spec(self, resource: str, devices: Sequence[Device]) -> ContainerSpec:
        # Allocate's path, so the plan is read once per vendor class: the default merge and an
        # inline hook run right here (no closure, no thread hop); any other hook under its deadline
        vendor = self.vendor
        plan = _spec_plan(type(vendor))
        if plan == "here":
            return vendor.container_spec(resource, devices)
        if plan == "inline":
            try:
                return vendor.container_spec(resource, devices)
            except Exception:
                self._count("container_spec", "error")
                raise
        return self._run("container_spec", vendor.container_spec, resource, devices, resource=resource,
                         call=tuple(d.id for d in devices))

    def preferred_allocation(self, resource: str, available: Sequence[Device], must_include: Sequence[Device],
                             size: int) -> Sequence[str] | None:
        vendor = self.vendor
        return self._hook("preferred_allocation",
                          lambda: vendor.preferred_allocation(resource, available, must_include, size),
                          resource=resource)

    def pre_start(self, resource: str, devices: Sequence[Device]) -> None:
        vendor = self.vendor
        self._hook("pre_start", lambda: vendor.pre_start(resource, devices), resource=resource,
                   call=tuple(d.id for d in devices))

    def node_labels(self, snapshot: Snapshot) -> Mapping[str, str]:
        vendor = self.vendor
        return self._hook("node_labels", lambda: vendor.node_labels(snapshot))

    def metric_samples(self) -> list[MetricSample]:
        vendor = self.vendor  # a generator runs here, in the pool, under the deadline too
        return self._hook("metric_samples", lambda: list(vendor.metric_samples()))

    def cdi_kind(self, resource: str) -> str:
        vendor = self.vendor
        return self._hook("cdi_kind", lambda: vendor.cdi_kind(resource), resource=resource)

    def explain(self) -> list[Finding]:
        vendor = self.vendor
        return self._hook("explain", lambda: list(vendor.explain()), self.scan_timeout)

    def doctor(self) -> list[Check]:
        vendor = self.vendor
        return self._hook("doctor", lambda: list(vendor.doctor()), self.scan_timeout)

    def watch(self, sink: EventSink, stop: threading.Event) -> None:
        """The vendor's watch, right here on the caller's own thread (it blocks until ``stop``, by
        design, so no deadline applies); a raise is counted like any hook's and re-raised."""
        try:
            self.vendor.watch(sink, stop)
        except Exception:
            self._count("watch", "error")
            raise

    def close(self, vendor: Vendor | None = None) -> None:
        """Close ``vendor`` (default: the current one; a reload closes the one it replaced)."""
        closing = vendor if vendor is not None else self.vendor
        if closing.overrides("close"):
            self._run("close", lambda: closing.close(), interruptible=False, owner=closing)

    def interrupt(self) -> None:
        """Stopping: every call waiting on the vendor gives up now (``VendorTimeout``), and so does
        every later one but ``close``, so a stop never waits out a scan deadline behind a hung hook."""
        self._interrupted.set()

    # -- the guard --------------------------------------------------------------------------------
    def guarded(self, hook: str, func: Callable[..., _T], *args: Any, resource: str = "") -> _T:
        """Run core code that calls into vendor code or files (a CDI rewrite) under the deadline."""
        return self._run(hook, func, *args, resource=resource)

    def report(self, hook: str, error: BaseException, message: str = "vendor call failed", *,
               traceback: bool = False, **fields: Any) -> None:
        """Log a hook's raised error, once per hook: a hook that always fails must not flood the log
        (``dpkit_vendor_call_errors_total`` counts every one). The caller words the line and adds
        context; the vendor, the hook and the error are named here."""
        if self._first("error", hook):
            log.error(message, exc_info=error if traceback else None,
                      extra=kv(vendor=self.vendor.name, call=hook, kind="error",
                               error=f"{type(error).__name__}: {error}", **fields))

    @property
    def scan_timeout(self) -> float:
        """Deadline of the hooks that scan the hardware (discover, probes, explain, doctor).

        A node with many devices or a slow bus may take seconds to scan, and nothing on the
        kubelet's path waits for it, so it gets ``scan_timeout`` (config ``vendor_scan_timeout``)
        rather than the deadline meant for Allocate.
        """
        return max(self.timeout, self._scan_timeout)

    def _hook(self, hook: str, func: Callable[[], _T], timeout: float | None = None, resource: str = "",
              call: tuple[str, ...] = ()) -> _T:
        if not self.vendor.overrides(hook):
            return func()  # the base class's own code: no thread hop
        if hook in self.vendor.inline_hooks and hook in INLINE_HOOKS:  # the vendor's promise: memory only
            try:
                return func()
            except Exception:
                self._count(hook, "error")
                raise
        return self._run(hook, func, timeout=timeout, resource=resource, call=call)

    def _run(self, hook: str, func: Callable[..., _T], *args: Any, timeout: float | None = None,
             resource: str = "", call: tuple[str, ...] = (), interruptible: bool = True,
             owner: Vendor | None = None) -> _T:
        # A nested call (a CDI rewrite asking the vendor) hops again rather than running inline:
        # its own deadline then bounds how long the outer call holds any lock it took.
        deadline = self.timeout if timeout is None else timeout
        # keyed by the vendor called (a reload closes the old one while the new one is current); the stuck
        # call keeps its vendor alive, so ids stay unique
        place = (id(owner if owner is not None else self.vendor), hook, resource)
        key = (*place, call)
        with self._lock:
            stuck = key in self._stuck or sum(k[:3] == place for k in self._stuck) >= MAX_STUCK
        if stuck:  # still hung: fail now rather than strand one more thread behind it
            self._timed_out(hook, deadline)
            raise VendorTimeout(f"vendor {self.vendor.name} {hook}{' for ' + resource if resource else ''} "
                                f"did not answer within {deadline:g}s: an earlier call has not returned yet")
        stopping = f"vendor {self.vendor.name} {hook} abandoned: dpkit is stopping"
        if interruptible and self._interrupted.is_set():
            raise VendorTimeout(stopping)
        future = _shared_pool().submit(func, *args)
        try:
            return self._wait(future, deadline, interruptible)
        except (FutureTimeout, _Interrupted) as exc:
            if isinstance(exc, FutureTimeout) and future.done():  # the vendor's own TimeoutError
                self._count(hook, "error")
                raise
            if not future.cancel():  # running: it holds its worker until the vendor returns
                with self._lock:
                    self._stuck[key] = future
                future.add_done_callback(lambda done: self._unstick(key, done))
                _shared_pool().abandon(future)
            if isinstance(exc, _Interrupted):
                raise VendorTimeout(stopping) from None
            self._timed_out(hook, deadline)
            raise VendorTimeout(f"vendor {self.vendor.name} {hook} did not answer within {deadline:g}s") from None
        except Exception:
            self._count(hook, "error")
            raise

    def _wait(self, future: Future[_T], deadline: float, interruptible: bool) -> _T:
        """``future``'s result within ``deadline``; a stop interrupts the wait (checked every 0.1 s
        once the call has taken that long: a call that answers at once pays nothing for it)."""
        if not interruptible:
            return future.result(timeout=deadline)
        end = time.monotonic() + deadline
        while True:
            if self._interrupted.is_set():
                raise _Interrupted
            left = end - time.monotonic()
            try:
                return future.result(timeout=max(0.0, min(left, 0.1)))
            except FutureTimeout:
                if future.done() or left <= 0.1:
                    raise

    def _unstick(self, key: tuple[int, str, str, tuple[str, ...]], done: Future[Any]) -> None:
        with self._lock:
            if self._stuck.get(key) is done:
                del self._stuck[key]

    def _timed_out(self, hook: str, deadline: float) -> None:
        self._count(hook, "timeout")
        if self._first("timeout", hook):  # once per hook: a hook that always hangs must not flood the log
            log.error("vendor call did not answer in time", extra=kv(vendor=self.vendor.name, call=hook,
                                                                      kind="timeout", timeout=deadline))

    def _first(self, kind: str, hook: str) -> bool:
        with self._lock:
            first = (hook, kind) not in self._logged
            self._logged.add((hook, kind))
        return first

    def _count(self, hook: str, kind: str) -> None:
        with self._lock:
            self.errors[(hook, kind)] = self.errors.get((hook, kind), 0) + 1

