"""Run driver calls that may never return, with a deadline.

On a broken GPU an NVML call can block forever. Each guarded call runs in its own daemon thread;
past its deadline the caller gets :class:`Hung` and moves on. A key (a GPU, "events", "init")
whose call is still stuck is refused at once instead of stacking another thread on it, so a
wedged GPU costs one thread, not one per poll.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


class Hung(Exception):
    """A guarded call did not return in time (or an earlier call on the same key is still stuck)."""

    def __init__(self, key: str, seconds: float) -> None:
        super().__init__(f"NVML call for {key} did not return within {seconds:.1f}s")
        self.key = key
        self.seconds = seconds


class Guard:
    """Deadlines for calls; ``tick`` (e.g. a probe heartbeat) runs about once a second while waiting."""

    def __init__(self, timeout: float, tick: Callable[[], None] | None = None) -> None:
        self.timeout = timeout
        self.tick = tick
        self._stuck: dict[str, float] = {}  # key -> monotonic start of the call still running
        self._lock = threading.Lock()

    def stuck(self) -> dict[str, float]:
        """Keys whose call is still running past its deadline, with how long they have run."""
        now = time.monotonic()
        with self._lock:
            return {k: now - started for k, started in self._stuck.items()}

    def call(self, key: str, fn: Callable[..., T], *args: Any, timeout: float | None = None) -> T:
        """``fn(*args)`` or :class:`Hung`; exceptions from ``fn`` propagate unchanged."""
        limit = self.timeout if timeout is None else timeout
        with self._lock:
            if key in self._stuck:
                raise Hung(key, time.monotonic() - self._stuck[key])
        done = threading.Event()
        box: dict[str, Any] = {}
        started = time.monotonic()

        def run() -> None:
            try:
                box["value"] = fn(*args)
            except BaseException as exc:  # handed to the caller below
                box["error"] = exc
            finally:
                with self._lock:  # atomic with the caller's deadline check below
                    self._stuck.pop(key, None)
                    done.set()

        threading.Thread(target=run, name=f"nvml-{key}", daemon=True).start()
        deadline = started + limit
        while not done.wait(min(1.0, max(0.0, deadline - time.monotonic()))):
            if time.monotonic() >= deadline:
                with self._lock:
                    if not done.is_set():
                        self._stuck[key] = started
                        raise Hung(key, limit)
                break
            if self.tick is not None:
                self.tick()
        if "error" in box:
            raise box["error"]
        return box["value"]  # type: ignore[no-any-return]
