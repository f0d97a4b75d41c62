"""Discovery out of process: the serving process asks a short-lived subprocess to read NVML.

The serving process (the one the kubelet talks to) loads no driver library at all: a driver
call that hangs then stalls only the subprocess, which is killed at ``discovery_timeout``; the
caller gets :class:`~dpkit.nvidia.guard.Hung` and keeps its last list. What the reader
remembers between readings (the last good state of each GPU, so a lost GPU is still named; the
PCIe topology cache) lives here and travels with each request.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from typing import Any

from dpkit.core import VendorError, get_logger, kv
from dpkit.nvidia.guard import Hung
from dpkit.nvidia.nodeinfo import NodeInfo, NvmlQueryFailed, NvmlUnavailable, node_from_json

log = get_logger("nvidia.remote")
MODULE = "dpkit.nvidia.discover_json"
REAP_TIMEOUT = 2.0  # seconds to wait for a killed subprocess (one stuck in the kernel may never go)


class RemoteReader:
    """``read()`` like :class:`~dpkit.nvidia.gpus.NodeReader`, done by a subprocess per call."""

    def __init__(self, library: str, sysfs_root: str, nvml_timeout: float, deadline: float) -> None:
        self.library = library
        self.sysfs_root = sysfs_root
        self.nvml_timeout = nvml_timeout
        self.deadline = deadline
        self.memory: dict[str, Any] = {}
        self.last_pid: int | None = None
        self._lock = threading.Lock()  # one discovery at a time; each needs the previous one's memory

    def read(self, topology: bool = True) -> NodeInfo:
        """The whole node; raises NvmlUnavailable, NvmlQueryFailed, Hung (past the deadline) or VendorError."""
        with self._lock:
            request = {"library": self.library, "sysfs_root": self.sysfs_root, "nvml_timeout": self.nvml_timeout,
                       "topology": topology, "memory": self.memory}
            reply = self._run(json.dumps(request))
            error = reply.get("error")
            if error == "unavailable":
                raise NvmlUnavailable(str(reply["kind"]), str(reply["message"]))
            if error == "hung":
                raise Hung(str(reply["key"]), float(reply["seconds"]))
            if error == "nvml":
                raise NvmlQueryFailed(str(reply["name"]))
            if error is not None:
                raise VendorError(f"NVML discovery failed: {reply.get('message', error)}")
            try:
                node = node_from_json(reply["node"])
            except (KeyError, TypeError, ValueError) as exc:
                raise VendorError(f"NVML discovery answered something unreadable: {exc!r}") from exc
            self.memory = reply.get("memory", {})
            return node

    def _run(self, request: str) -> dict[str, Any]:
        proc = subprocess.Popen([sys.executable, "-m", MODULE], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                start_new_session=True)
        self.last_pid = proc.pid
        try:
            out, _ = proc.communicate(request.encode(), timeout=self.deadline)
        except subprocess.TimeoutExpired:
            _kill(proc)
            log.error("NVML discovery did not finish in time; killed it", extra=kv(
                pid=proc.pid, deadline_s=self.deadline))
            raise Hung("discovery", self.deadline) from None
        if proc.returncode != 0 or not out:
            raise VendorError(f"NVML discovery subprocess exited with code {proc.returncode} and no answer")
        try:
            reply = json.loads(out)
        except ValueError as exc:
            raise VendorError(f"NVML discovery answered something unreadable: {exc}") from exc
        if not isinstance(reply, dict):
            raise VendorError("NVML discovery answered something unreadable: not an object")
        return reply

    def close(self) -> None:
        """Nothing is held between readings."""


def _kill(proc: subprocess.Popen[bytes]) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    try:
        proc.communicate(timeout=REAP_TIMEOUT)
    except subprocess.TimeoutExpired:
        log.error("NVML discovery subprocess did not die (stuck in the driver?)", extra=kv(pid=proc.pid))
