"""MPS sharing, the parts the plugin and the control daemon (:mod:`dpkit.nvidia.mps_daemon`) share.

Layout of an MPS root, as NVIDIA's plugin lays it out (host: ``flags.mpsRoot``, e.g.
``/run/nvidia/mps``; inside the dpkit containers and the workload containers: ``/mps``)::

    <root>/<resource>/pipe      the control daemon's pipe directory (CUDA_MPS_PIPE_DIRECTORY)
    <root>/<resource>/log       its log directory (CUDA_MPS_LOG_DIRECTORY), for the daemon only
    <root>/<resource>/.ready    written once the daemon is started and its limits are set
    <root>/<resource>/health.json  dpkit's addition: the daemon's last health check, read by the plugin
    <root>/shm                  shared memory, mounted at /dev/shm in workload containers

One control daemon serves one resource (every GPU shared through it). Each replica gets
``100 / replicas`` percent of a GPU's threads and ``memory / replicas`` of its memory.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from dpkit.core import Device, Health
from dpkit.nvidia.config import MPS_CONTAINER_ROOT, Settings

PIPE = "pipe"
LOG = "log"
READY = ".ready"
HEALTH = "health.json"
SHM = "shm"
CONTAINER_SHM = "/dev/shm"
#: the plugin treats a daemon whose last health check is older than this as gone (it checks every 5 s)
STALE_AFTER = 60.0


def resource_dir(root: str, resource: str) -> Path:
    return Path(root) / resource


def container_pipe_dir(resource: str) -> str:
    """Where a workload container finds the pipe directory (and what CUDA_MPS_PIPE_DIRECTORY says)."""
    return os.path.join(MPS_CONTAINER_ROOT, resource, PIPE)


def daemon_env(root: str, resource: str) -> dict[str, str]:
    """The variables the control daemon and its clients need."""
    base = resource_dir(root, resource)
    return {"CUDA_MPS_PIPE_DIRECTORY": str(base / PIPE), "CUDA_MPS_LOG_DIRECTORY": str(base / LOG)}


@dataclass(frozen=True)
class GpuShare:
    """One GPU shared through a daemon: its index (as MPS numbers devices), memory and replicas."""

    index: str
    uuid: str
    memory_mib: int
    replicas: int


def shares(devices: Sequence[Device]) -> list[GpuShare]:
    """The GPUs behind a resource's replica devices, each once."""
    seen: dict[str, GpuShare] = {}
    for d in devices:
        a = d.attributes
        if "replicas" not in a or a.get("uuid", "") in seen:
            continue
        seen[a["uuid"]] = GpuShare(a["index"], a["uuid"], int(a["memory_mib"]), int(a["replicas"]))
    return list(seen.values())


def pinned_memory_limits(gpus: Sequence[GpuShare]) -> dict[str, str]:
    """``set_default_device_pinned_mem_limit`` values: the GPU's memory split evenly over its replicas."""
    return {g.index: f"{g.memory_mib // g.replicas}M" for g in gpus if g.memory_mib > 0}


def active_thread_percentage(gpus: Sequence[GpuShare]) -> str:
    """``set_default_active_thread_percentage``: one replica's share of the threads ("" with no GPU)."""
    if not gpus:
        return ""
    return str(100 // max(g.replicas for g in gpus))


def write_health(root: str, resource: str, healthy: bool, reason: str = "") -> None:
    """The daemon's report, replaced atomically so the plugin never reads half a file."""
    path = resource_dir(root, resource) / HEALTH
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"healthy": healthy, "reason": reason, "checked": time.time()}))
    os.replace(tmp, path)


def daemon_problem(root: str, resource: str, now: float | None = None) -> str:
    """Why the daemon of ``resource`` cannot serve clients now ("" when it can)."""
    base = resource_dir(root, resource)
    try:
        report = json.loads((base / HEALTH).read_text())
        healthy, reason, checked = bool(report["healthy"]), str(report["reason"]), float(report["checked"])
    except FileNotFoundError:
        healthy, reason, checked = True, "", -1.0
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"MPS control daemon for {resource}: unreadable {base / HEALTH}: {exc}"
    if not healthy:
        return f"MPS control daemon for {resource} unhealthy: {reason[:300]}"
    if not (base / READY).exists():
        return (f"MPS control daemon for {resource} is not ready ({base / READY} absent; is the "
                "mps-control-daemon container running?)")
    if checked < 0:
        return f"MPS control daemon for {resource} has not reported its health yet"
    age = (time.time() if now is None else now) - checked
    if age > STALE_AFTER:
        return f"MPS control daemon for {resource} silent for {age:.0f} s (last health check too old)"
    return ""


def apply_daemon_health(settings: Settings, snapshot: Mapping[str, tuple[Device, ...]]
                        ) -> dict[str, tuple[Device, ...]]:
    """Replica devices of an MPS resource are Unhealthy while its daemon cannot serve them."""
    out = dict(snapshot)
    if not settings.mps:
        return out
    for resource, devices in snapshot.items():
        if not any("replicas" in d.attributes for d in devices):
            continue
        problem = daemon_problem(settings.mps_container_root, resource)
        if problem:
            out[resource] = tuple(_unhealthy(d, problem) if "replicas" in d.attributes else d for d in devices)
    return out


def _unhealthy(device: Device, problem: str) -> Device:
    return device.with_health(Health.UNHEALTHY, "; ".join(r for r in (device.reason, problem) if r))
