"""The probe process: ``python -m dpkit.core.engine.probe_child MANAGER_PID ADDRESS NAME TARGET CONFIG_JSON``.

Kept apart from :mod:`dpkit.core.engine.probes` (the supervisor, which the manager imports) so that a
probe process loads only the standard library, zmq and its own target: every probe is a whole
process on every node, and what it imports is resident memory paid per node (issue 13).
Nothing from dpkit is imported here; tests/core/test_probes.py checks the child's modules.
"""

from __future__ import annotations

import ctypes
import importlib
import json
import os
import signal
import sys
from collections.abc import Mapping
from typing import Any

#: the health strings the kubelet understands (:class:`dpkit.core.vendorapi.device.Health` values)
HEALTH_VALUES = ("Healthy", "Unhealthy")


class ChildContext:
    """The :class:`~dpkit.core.vendorapi.vendor.ProbeContext` a probe function receives."""

    def __init__(self, address: str, name: str, config: Mapping[str, Any], manager_pid: int) -> None:
        import zmq

        self._manager_pid = manager_pid
        self.config = config
        self._name = name
        self._context = zmq.Context()
        self._socket = self._context.socket(zmq.PUSH)
        self._socket.setsockopt(zmq.LINGER, 1000)
        self._socket.connect(address)
        self._stop = False
        signal.signal(signal.SIGTERM, self._on_term)

    def _on_term(self, *_: Any) -> None:
        self._stop = True

    def _send(self, message: dict[str, Any]) -> None:
        self._socket.send(json.dumps({"probe": self._name, **message}).encode())

    def heartbeat(self) -> None:
        # The manager is gone (we were re-parented): stop rather than linger. Compared with the
        # manager's own PID, not with 1: in a container the manager itself is PID 1.
        if os.getppid() != self._manager_pid:
            self._stop = True
        self._send({"type": "heartbeat"})

    def health(self, resource: str, device_id: str, health: str, reason: str = "") -> None:
        value = str(health)  # a Health member is a StrEnum: its str() is the value
        if value not in HEALTH_VALUES:
            raise ValueError(f"health must be one of {', '.join(HEALTH_VALUES)}, not {value!r}")
        self._send({"type": "health", "resource": resource, "id": device_id, "health": value, "reason": reason})

    def should_stop(self) -> bool:
        return self._stop

    def close(self) -> None:
        self._socket.close()
        self._context.term()


def _die_with_parent() -> None:
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def main(argv: list[str]) -> int:
    manager_pid, address, name, target, config_json = argv
    # the manager blocks these for its threads, and a child inherits the mask
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM, signal.SIGINT, signal.SIGHUP})
    _die_with_parent()
    module_name, _, func_name = target.partition(":")
    func = getattr(importlib.import_module(module_name), func_name)
    ctx = ChildContext(address, name, json.loads(config_json), int(manager_pid))
    try:
        func(ctx)
    finally:
        ctx.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
