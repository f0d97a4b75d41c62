"""Hands each published PluginState to the observers, each on its own thread.

The manager's loop only drops the newest state into every observer's slot and returns: an
observer that is slow (a hung vendor hook, a full disk) or raises never delays the kubelet
path, nor the other observers. A slow observer sees only the newest state when it is done,
never a queue of old ones. Failures are logged (rate-limited) and counted per observer.
"""

from __future__ import annotations

import threading
import time

from dpkit.core.engine.state import Observer, PluginState
from dpkit.core.support.logs import RateLimiter, get_logger, kv

log = get_logger("observers")


class ObserverThread:
    """One observer's thread and its one-state slot."""

    def __init__(self, observer: Observer) -> None:
        self.observer = observer
        self.name = type(observer).__name__
        self.failures = 0
        self.seen_version = 0  # the last version publish() returned from
        self._slot: PluginState | None = None
        self._busy = False
        self._closed = False
        self._cond = threading.Condition()
        self._log = RateLimiter(burst=5, interval=60.0)
        self._thread = threading.Thread(target=self._run, name=f"observer-{self.name}", daemon=True)
        self._thread.start()

    def offer(self, state: PluginState) -> None:
        """Replace whatever the observer has not taken yet; never blocks on the observer."""
        with self._cond:
            self._slot = state
            self._cond.notify()

    def wait_idle(self, deadline: float) -> bool:
        """Wait until the observer has taken and handled every state offered, or ``deadline`` passes."""
        with self._cond:
            return self._cond.wait_for(lambda: self._slot is None and not self._busy,
                                       max(0.0, deadline - time.monotonic()))

    def stop(self, timeout: float) -> bool:
        """End the thread after the publish in progress; False when that publish outlasts ``timeout``."""
        with self._cond:
            self._closed = True
            self._slot = None
            self._cond.notify()
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._slot is not None or self._closed)
                if self._closed:
                    return
                state, self._slot, self._busy = self._slot, None, True
            assert state is not None
            try:
                self.observer.publish(state)
            except Exception:
                self.failures += 1
                if self._log.allow():
                    log.exception("observer failed; the others and the kubelet are not affected",
                                  extra=kv(observer=self.name, version=state.version, failures=self.failures,
                                           suppressed=self._log.suppressed()))
            finally:
                with self._cond:
                    self._busy = False
                    self.seen_version = state.version
                    self._cond.notify_all()


class Publisher:
    """The observer threads of one manager."""

    def __init__(self, observers: list[Observer]) -> None:
        self.threads = [ObserverThread(o) for o in observers]

    def offer(self, state: PluginState) -> None:
        for thread in self.threads:
            thread.offer(state)

    def wait_idle(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        return all([t.wait_idle(deadline) for t in self.threads])

    def status(self) -> list[dict[str, object]]:
        return [{"name": t.name, "seen_version": t.seen_version, "failures": t.failures} for t in self.threads]

    def close(self, timeout: float = 5.0) -> None:
        """Stop every thread, then close every observer (a hung one too: its files must go)."""
        deadline = time.monotonic() + timeout
        for thread in self.threads:
            if not thread.stop(max(0.0, deadline - time.monotonic())):
                log.warning("observer still busy at shutdown; closing it anyway", extra=kv(observer=thread.name))
        for thread in self.threads:
            try:
                thread.observer.close()
            except Exception:
                log.exception("observer close failed", extra=kv(observer=thread.name))
