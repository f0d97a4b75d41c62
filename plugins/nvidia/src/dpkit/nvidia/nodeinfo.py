"""What NVML told about the node, as plain values that need no driver library.

The serving process imports this module and never ``pynvml``: discovery runs in a short-lived
subprocess (:mod:`dpkit.nvidia.discover_json`) that reads the node and hands these values back
as JSON; health runs in the probe process. Where the library is and why NVML cannot be used live
here too, since ``dpkit discover`` and ``doctor`` explain them without loading it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from dpkit.core import DpkitError

SONAME = "libnvidia-ml.so.1"
# where driver installs put the library, relative to the driver root
LIBRARY_DIRS = ("usr/lib64", "usr/lib/x86_64-linux-gnu", "usr/lib/aarch64-linux-gnu", "lib64",
                "lib/x86_64-linux-gnu", "lib/aarch64-linux-gnu", "usr/lib")


class NvmlUnavailable(DpkitError):
    """NVML cannot be used; ``kind`` is ``library``, ``driver`` or ``init``."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


class NvmlQueryFailed(DpkitError):
    """An NVML call failed for the whole node; ``name`` is NVML's error name (``NVML_ERROR_...``)."""

    def __init__(self, name: str) -> None:
        super().__init__(f"NVML query failed: {name}")
        self.name = name


def library_path(explicit: str, driver_root: str) -> str:
    """The library to open by path, or "" to let the loader search (driver root ``/``)."""
    if explicit:
        return explicit
    if driver_root in ("", "/"):
        return ""
    for directory in LIBRARY_DIRS:
        candidate = Path(driver_root) / directory / SONAME
        if candidate.exists():
            return str(candidate)
    return str(Path(driver_root) / LIBRARY_DIRS[0] / SONAME)  # reported as missing


@dataclass(frozen=True)
class MigInfo:
    """One MIG device: ``index`` is its position under the parent (NVIDIA's ``<gpu>:<index>``)."""

    index: int
    uuid: str
    gi: int
    ci: int
    profile: str
    memory_mb: int


@dataclass(frozen=True)
class GpuInfo:
    index: int
    uuid: str
    name: str
    memory: int  # bytes
    minor: int
    bus_id: str
    numa: int | None
    mig_enabled: bool = False
    mig_pending: bool = False
    mig_capable: bool = False  # NVML answers GetMigMode (GFD's nvidia.com/mig.capable)
    migs: tuple[MigInfo, ...] = ()
    nvlinks: tuple[str, ...] = ()  # remote PCI bus IDs, one per active link
    problem: str = ""  # known GPU that cannot be used now (lost, hung)


@dataclass(frozen=True)
class Issue:
    """Something read that could not be used, for ``dpkit discover``."""

    subject: str
    reason: str
    hint: str = ""


@dataclass(frozen=True)
class NodeInfo:
    driver: str
    cuda: str
    gpus: tuple[GpuInfo, ...]
    issues: tuple[Issue, ...] = ()
    pcie: dict[tuple[str, str], int] = field(default_factory=dict)  # uuid pair -> NVML topology level


# -- JSON between the discovery subprocess and the serving process ---------------------------------
def gpu_to_json(gpu: GpuInfo) -> dict[str, Any]:
    return asdict(gpu)


def gpu_from_json(raw: dict[str, Any]) -> GpuInfo:
    """The inverse of :func:`gpu_to_json`; a missing or unknown key raises TypeError/KeyError."""
    return GpuInfo(**{**raw, "migs": tuple(MigInfo(**m) for m in raw["migs"]), "nvlinks": tuple(raw["nvlinks"])})


def pcie_to_json(pcie: dict[tuple[str, str], int]) -> list[list[Any]]:
    return [[a, b, level] for (a, b), level in pcie.items()]


def pcie_from_json(raw: list[list[Any]]) -> dict[tuple[str, str], int]:
    return {(str(a), str(b)): int(level) for a, b, level in raw}


def node_to_json(node: NodeInfo) -> dict[str, Any]:
    return {"driver": node.driver, "cuda": node.cuda, "gpus": [gpu_to_json(g) for g in node.gpus],
            "issues": [asdict(i) for i in node.issues], "pcie": pcie_to_json(node.pcie)}


def node_from_json(raw: dict[str, Any]) -> NodeInfo:
    return NodeInfo(str(raw["driver"]), str(raw["cuda"]), tuple(gpu_from_json(g) for g in raw["gpus"]),
                    tuple(Issue(**i) for i in raw["issues"]), pcie_from_json(raw["pcie"]))
