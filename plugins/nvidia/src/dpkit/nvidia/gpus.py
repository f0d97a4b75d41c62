"""Read every GPU (and its MIG devices, NVLinks and PCIe topology) from NVML into plain values
(:mod:`dpkit.nvidia.nodeinfo`). Runs where NVML may be loaded: the discovery subprocess, the
health probe, and ``dpkit discover`` / ``doctor``; never in the serving process.

Each GPU is read in its own guarded call, so one lost or hung GPU never hides the others: it is
reported from the last good reading with a ``problem`` (and turned Unhealthy downstream). What
NVML returns is checked here before anything else sees it.
"""

from __future__ import annotations

import math
import re
from dataclasses import replace
from typing import Any

import pynvml

from dpkit.core import ValidationError, check_device_id, get_logger, kv
from dpkit.nvidia import hostfiles, nvml
from dpkit.nvidia.guard import Guard, Hung
from dpkit.nvidia.nodeinfo import (
    GpuInfo,
    Issue,
    MigInfo,
    NodeInfo,
    gpu_from_json,
    gpu_to_json,
    pcie_from_json,
    pcie_to_json,
)

__all__ = ["GpuInfo", "Issue", "MigInfo", "NodeInfo", "NodeReader", "mig_profile"]

log = get_logger("nvidia.gpus")
UUID = re.compile(r"^(GPU|MIG)-[0-9a-fA-F-]{8,}$")
MAX_MINOR = 1 << 20
#: GPUs read per node at most. The largest NVIDIA nodes hold 16 GPUs; a count beyond this is a
#: broken NVML answer, and reading it would loop guarded calls for hours. The first MAX_GPUS
#: indices are read and an Issue says why the rest are not.
MAX_GPUS = 64


def mig_profile(gi_slices: int, ci_slices: int, memory_mb: int, total_memory: int) -> str:
    """NVIDIA's profile name, e.g. ``1g.10gb`` or ``1c.2g.20gb``.

    Memory is rounded the way NVIDIA's go-nvlib does: the MIG device's share of the GPU, rounded
    up to eighths, times the GPU's memory in GB.
    """
    fraction = memory_mb * 1024 * 1024 / total_memory if total_memory else 0.0
    fraction = math.ceil(fraction * 8) / 8
    gb = round(fraction * ((total_memory + (1 << 30) - 1) // (1 << 30)))
    if ci_slices == gi_slices:
        return f"{gi_slices}g.{gb}gb"
    return f"{ci_slices}c.{gi_slices}g.{gb}gb"


def _uuid(value: Any, what: str) -> str:
    uuid = nvml.text(value)
    if not UUID.match(uuid):
        raise ValidationError(f"{what} UUID {uuid[:80]!r} from NVML is malformed")
    return check_device_id(uuid)


class NodeReader:
    """Reads the node through NVML; keeps the last good reading of each GPU for lost/hung ones."""

    def __init__(self, library: str, sysfs_root: str, guard: Guard) -> None:
        self.library = library
        self.sysfs_root = sysfs_root
        self.guard = guard
        self.initialized = False
        self.known: dict[int, GpuInfo] = {}
        self._pcie_for: tuple[str, ...] = ()
        self._pcie: dict[tuple[str, str], int] = {}
        self._warned_count = -1

    def memory(self) -> dict[str, Any]:
        """What this reader keeps between readings (last good GPUs, the PCIe cache), as JSON."""
        return {"known": {str(k): gpu_to_json(g) for k, g in self.known.items()},
                "pcie_for": list(self._pcie_for), "pcie": pcie_to_json(self._pcie)}

    def restore(self, memory: dict[str, Any]) -> None:
        """Take over what :meth:`memory` returned (from another process)."""
        self.known = {int(k): gpu_from_json(v) for k, v in memory.get("known", {}).items()}
        self._pcie_for = tuple(str(u) for u in memory.get("pcie_for", ()))
        self._pcie = pcie_from_json(memory.get("pcie", []))

    def ensure_init(self) -> None:
        if not self.initialized:
            self.guard.call("init", nvml.init, self.library)
            self.initialized = True

    def close(self) -> None:
        if self.initialized and not self.guard.stuck():
            nvml.shutdown()
        self.initialized = False

    def read(self, topology: bool = True) -> NodeInfo:
        """The whole node; raises NvmlUnavailable, Hung or NVMLError only when nothing can be read."""
        self.ensure_init()
        driver, cuda, count = self.guard.call("system", _read_system)
        gpus: list[GpuInfo] = []
        issues: list[Issue] = []
        if count > MAX_GPUS:
            issues.append(Issue("nvmlDeviceGetCount", f"NVML reports {count} GPUs, more than dpkit reads "
                                f"({MAX_GPUS}); only GPUs 0-{MAX_GPUS - 1} are read",
                                "a count this large is usually a broken driver or NVML; check nvidia-smi"))
            if count != self._warned_count:
                log.warning("implausible GPU count from NVML; reading only the first GPUs",
                            extra=kv(count=count, limit=MAX_GPUS))
                self._warned_count = count
            count = MAX_GPUS
        for index in range(count):
            gpu = self._read_one(index, issues)
            if gpu is not None:
                gpus.append(gpu)
        pcie = self._topology(gpus, issues) if topology else {}
        return NodeInfo(driver, cuda, tuple(gpus), tuple(issues), pcie)

    def _read_one(self, index: int, issues: list[Issue]) -> GpuInfo | None:
        subject = f"GPU {index}"
        try:
            gpu = self.guard.call(f"gpu{index}", _read_gpu, index)
        except Hung as exc:
            problem = f"NVML calls for this GPU hang ({exc})"
        except nvml.NVMLError as exc:
            if nvml.is_error(exc, "NVML_ERROR_GPU_IS_LOST"):
                problem = "GPU is lost (NVML_ERROR_GPU_IS_LOST): it fell off the bus or stopped answering"
            elif nvml.is_error(exc, "NVML_ERROR_RESET_REQUIRED"):
                problem = "GPU needs a reset (NVML_ERROR_RESET_REQUIRED)"
            else:
                problem = f"NVML cannot read this GPU: {nvml.error_name(exc)}"
        except ValidationError as exc:
            issues.append(Issue(subject, f"not advertised: {exc}", "check the driver and GPU with nvidia-smi"))
            return None
        except Exception as exc:  # an odd answer from the binding must not hide the other GPUs
            log.exception("reading a GPU failed", extra=kv(index=index))
            problem = f"reading this GPU failed: {type(exc).__name__}: {exc}"
        else:
            numa, numa_problem = hostfiles.numa_node(self.sysfs_root, gpu.bus_id)
            if numa_problem:
                issues.append(Issue(f"{subject} ({gpu.uuid})", f"advertised without a NUMA node: {numa_problem}"))
                log.warning("NUMA node unknown", extra=kv(gpu=gpu.uuid, problem=numa_problem))
            gpu = replace(gpu, numa=numa)
            self.known[index] = gpu
            return gpu
        last = self.known.get(index)
        if last is None:
            issues.append(Issue(subject, f"not advertised: {problem}; its UUID was never read",
                                "run nvidia-smi; a GPU that is lost needs a reset or a reboot"))
            return None
        return replace(last, problem=problem)

    def _topology(self, gpus: list[GpuInfo], issues: list[Issue]) -> dict[tuple[str, str], int]:
        usable = tuple(g.uuid for g in gpus if not g.problem)
        if usable == self._pcie_for:
            return self._pcie
        try:
            self._pcie = self.guard.call("topology", _read_pcie, usable)
            self._pcie_for = usable
        except (Hung, nvml.NVMLError) as exc:
            issues.append(Issue("topology", f"PCIe topology unavailable ({exc}); allocation falls back to NUMA"))
            self._pcie = {}
        return self._pcie


def _read_system() -> tuple[str, str, int]:
    driver = nvml.text(pynvml.nvmlSystemGetDriverVersion())
    try:
        raw = int(pynvml.nvmlSystemGetCudaDriverVersion())
        cuda = f"{raw // 1000}.{raw % 1000 // 10}"
    except nvml.NVMLError:
        cuda = ""
    return driver, cuda, int(pynvml.nvmlDeviceGetCount())


def _read_gpu(index: int) -> GpuInfo:
    handle = pynvml.nvmlDeviceGetHandleByIndex(index)
    uuid = _uuid(pynvml.nvmlDeviceGetUUID(handle), f"GPU {index}")
    minor = int(pynvml.nvmlDeviceGetMinorNumber(handle))
    if not 0 <= minor < MAX_MINOR:
        raise ValidationError(f"GPU {index} minor number {minor} from NVML is implausible")
    memory = int(pynvml.nvmlDeviceGetMemoryInfo(handle).total)
    bus_id = nvml.text(pynvml.nvmlDeviceGetPciInfo(handle).busId)
    capable = True
    try:
        current, pending = pynvml.nvmlDeviceGetMigMode(handle)
    except nvml.NVMLError:  # GPUs without MIG support answer NOT_SUPPORTED
        current = pending = 0
        capable = False
    migs = _read_migs(handle, memory) if current else ()
    return GpuInfo(
        index=index, uuid=uuid, name=nvml.text(pynvml.nvmlDeviceGetName(handle))[:96], memory=memory,
        minor=minor, bus_id=bus_id, numa=None, mig_enabled=bool(current), mig_pending=bool(pending),
        mig_capable=capable,
        migs=migs, nvlinks=_read_nvlinks(handle),
    )


def _read_migs(handle: Any, total_memory: int) -> tuple[MigInfo, ...]:
    migs = []
    for j in range(int(pynvml.nvmlDeviceGetMaxMigDeviceCount(handle))):
        try:
            mig = pynvml.nvmlDeviceGetMigDeviceHandleByIndex(handle, j)
        except nvml.NVMLError as exc:
            if nvml.is_error(exc, "NVML_ERROR_NOT_FOUND", "NVML_ERROR_INVALID_ARGUMENT"):
                continue
            raise
        attrs = pynvml.nvmlDeviceGetAttributes(mig)
        migs.append(MigInfo(
            index=j,
            uuid=_uuid(pynvml.nvmlDeviceGetUUID(mig), "MIG device"),
            gi=int(pynvml.nvmlDeviceGetGpuInstanceId(mig)),
            ci=int(pynvml.nvmlDeviceGetComputeInstanceId(mig)),
            profile=mig_profile(attrs.gpuInstanceSliceCount, attrs.computeInstanceSliceCount,
                                attrs.memorySizeMB, total_memory),
            memory_mb=int(attrs.memorySizeMB),
        ))
    return tuple(migs)


def _read_nvlinks(handle: Any) -> tuple[str, ...]:
    remotes = []
    for link in range(pynvml.NVML_NVLINK_MAX_LINKS):
        try:
            if not pynvml.nvmlDeviceGetNvLinkState(handle, link):
                continue
            remote = nvml.text(pynvml.nvmlDeviceGetNvLinkRemotePciInfo(handle, link).busId)
        except nvml.NVMLError:
            break  # no (more) links on this GPU
        if hostfiles.sysfs_bus_id(remote) is not None:
            remotes.append(remote)
    return tuple(remotes)


def _read_pcie(uuids: tuple[str, ...]) -> dict[tuple[str, str], int]:
    handles = [pynvml.nvmlDeviceGetHandleByUUID(u) for u in uuids]
    levels: dict[tuple[str, str], int] = {}
    for a in range(len(uuids)):
        for b in range(a + 1, len(uuids)):
            level = int(pynvml.nvmlDeviceGetTopologyCommonAncestor(handles[a], handles[b]))
            levels[(uuids[a], uuids[b])] = levels[(uuids[b], uuids[a])] = level
    return levels
