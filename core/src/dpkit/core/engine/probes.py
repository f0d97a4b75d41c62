"""Out-of-process health probes: the supervisor in the manager, and the runner in the child.

A probe runs in its own process because some driver calls (NVML on a broken GPU) can hang
forever. It proves it is alive with heartbeats over the event bus; when it falls silent for its
timeout, its devices are marked Unhealthy and the process is killed and started again. The
first heartbeat after a restart clears that mark.

The child side is ``python -m dpkit.core.engine.probe_child MANAGER_PID ADDRESS NAME TARGET CONFIG_JSON``
(:mod:`dpkit.core.engine.probe_child`, a module that imports no more than a probe needs).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from dpkit.core.engine import probe_child
from dpkit.core.support.logs import get_logger, kv
from dpkit.core.vendorapi.vendor import Probe

log = get_logger("probes")
HEALTHY_RESET = 60.0  # seconds a restarted probe must run well before its backoff starts over


def backoff(failures: int) -> float:
    """Seconds before restarting a probe after its ``failures``-th consecutive failure (1 s .. 30 s)."""
    return min(30.0, 0.5 * 2.0 ** min(failures, 6))


@dataclass
class ProbeState:
    probe: Probe
    timeout: float
    process: subprocess.Popen[bytes] | None = None
    started: float = 0.0
    last_beat: float = 0.0
    beats: int = 0
    restarts: int = 0
    failures: int = 0  # consecutive failures: sets the restart backoff; reset after a healthy period
    silent: bool = False
    next_start: float = 0.0
    history: list[str] = field(default_factory=list)

    def as_status(self, now: float) -> dict[str, Any]:
        return {
            "name": self.probe.name,
            "pid": self.process.pid if self.process else None,
            "alive": bool(self.process and self.process.poll() is None),
            "silent": self.silent,
            "heartbeats": self.beats,
            "last_heartbeat_age": round(now - self.last_beat, 3) if self.beats else None,
            "restarts": self.restarts,
            "timeout": self.timeout,
        }


class ProbeSupervisor:
    """Starts probes, watches their heartbeats and restarts silent or dead ones."""

    def __init__(self, address: str | Callable[[], str], default_timeout: float, on_event: Any = None,
                 healthy_reset: float = HEALTHY_RESET) -> None:
        # where probes push: the bus binds it on the first probe's start (a callable), so a vendor
        # without probes never opens it
        self.address = address
        self.default_timeout = default_timeout
        self.healthy_reset = healthy_reset
        self.on_event = on_event  # (kind, probe_name) for metrics: "heartbeat", "restart"
        self.probes: dict[str, ProbeState] = {}

    def set_probes(self, probes: list[Probe]) -> None:
        self.stop_all()
        self.probes = {p.name: ProbeState(p, p.heartbeat_timeout or self.default_timeout) for p in probes}
        for state in self.probes.values():
            self._spawn(state)

    def _spawn(self, state: ProbeState) -> None:
        """Start the probe; one that cannot start (no process left to fork, a config that is not JSON)
        is tried again with the restart backoff, and its devices go Unhealthy after one timeout."""
        probe = state.probe
        now = time.monotonic()
        try:
            address = self.address() if callable(self.address) else self.address
            args = [sys.executable, "-m", "dpkit.core.engine.probe_child", str(os.getpid()), address,
                    probe.name, probe.target, json.dumps(dict(probe.config))]
            state.process = subprocess.Popen(args, stdin=subprocess.DEVNULL, start_new_session=True)
        except (OSError, TypeError, ValueError) as exc:
            state.failures += 1
            state.next_start = now + backoff(state.failures)
            state.last_beat = state.last_beat or now
            why = f"could not start: {type(exc).__name__}: {exc}"
            state.history = ([*state.history, why])[-5:]
            log.error("probe could not start; trying again", extra=kv(probe=probe.name, error=why,
                                                                      retry_in=round(state.next_start - now, 1)))
            return
        state.started = time.monotonic()
        state.last_beat = state.started  # the first heartbeat is due within one timeout
        log.info("probe started", extra=kv(probe=probe.name, pid=state.process.pid))

    def heartbeat(self, name: str) -> bool:
        """Record a heartbeat; True when it ends a silence (the caller clears the Unhealthy mark)."""
        state = self.probes.get(name)
        if state is None:
            return False
        state.last_beat = time.monotonic()
        state.beats += 1
        if state.failures and state.last_beat - state.started >= self.healthy_reset:
            # a probe that has run well this long starts again from the shortest backoff
            log.info("probe healthy again; restart backoff reset", extra=kv(probe=name, failures=state.failures))
            state.failures = 0
        if self.on_event:
            self.on_event("heartbeat", name)
        if state.silent:
            state.silent = False
            log.info("probe heartbeats resumed", extra=kv(probe=name))
            return True
        return False

    def check(self) -> list[ProbeState]:
        """Probes that just fell silent or died; they are killed and restarted (with backoff)."""
        now = time.monotonic()
        newly_silent: list[ProbeState] = []
        for state in self.probes.values():
            proc = state.process
            dead = proc is not None and proc.poll() is not None
            late = now - state.last_beat > state.timeout
            if proc is None:
                if now >= state.next_start:
                    self._spawn(state)
                if state.process is None and not state.silent and now - state.last_beat > state.timeout:
                    state.silent = True  # never started: its devices must not look healthy
                    newly_silent.append(state)
                    log.error("probe silent; marking its devices Unhealthy", extra=kv(
                        probe=state.probe.name, why=state.history[-1] if state.history else "not started"))
                continue
            if not (dead or late):
                continue
            why = f"exited with code {proc.returncode}" if dead else f"no heartbeat for {now - state.last_beat:.1f}s"
            if not state.silent:
                state.silent = True
                newly_silent.append(state)
                log.error("probe silent; marking its devices Unhealthy and restarting it",
                          extra=kv(probe=state.probe.name, why=why))
            self._kill(state)
            state.restarts += 1
            state.failures += 1
            state.next_start = now + backoff(state.failures)
            state.history = ([*state.history, why])[-5:]
            if self.on_event:
                self.on_event("restart", state.probe.name)
        return newly_silent

    def next_deadline(self) -> float | None:
        deadlines = []
        for state in self.probes.values():
            if state.process is not None:
                deadlines.append(state.last_beat + state.timeout)
            else:  # waiting to (re)start; one that never started is also due to be marked silent
                deadlines.append(state.next_start)
                if not state.silent and state.last_beat:
                    deadlines.append(state.last_beat + state.timeout)
        return min(deadlines) if deadlines else None

    @staticmethod
    def _kill(state: ProbeState) -> None:
        proc = state.process
        state.process = None
        if proc is None:
            return
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            proc.wait(2)
        except subprocess.TimeoutExpired:
            log.error("probe process did not die", extra=kv(pid=proc.pid))

    def stop_all(self) -> None:
        for state in self.probes.values():
            proc = state.process
            if proc is not None and proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                    proc.wait(1)
                except (ProcessLookupError, subprocess.TimeoutExpired):
                    pass
            self._kill(state)


# -- child side: dpkit.core.engine.probe_child (imported by name here for older callers) ---------------
_ChildContext = probe_child.ChildContext
main = probe_child.main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
