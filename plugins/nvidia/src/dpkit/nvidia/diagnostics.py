"""``dpkit doctor nvidia`` checks and the findings that explain why no GPU is advertised."""

from __future__ import annotations

import os
from pathlib import Path

from dpkit.core import Check, Finding
from dpkit.nvidia import hostfiles, nodeinfo
from dpkit.nvidia.config import Settings
from dpkit.nvidia.nodeinfo import GpuInfo

DRIVER_HINT = "load the driver (modprobe nvidia) or start the NVIDIA driver container; check dmesg for NVRM errors"
LIBRARY_HINT = ("install the driver's user-space libraries, or mount the driver root into the pod and set "
                "nvidiaDriverRoot (NVIDIA_DRIVER_ROOT) or vendor.nvml_library")


def unavailable_finding(exc: nodeinfo.NvmlUnavailable) -> Finding:
    """Why NVML cannot be used, worded for an operator."""
    if exc.kind == "library":
        return Finding("NVML library", False, f"missing: {exc}", hint=LIBRARY_HINT)
    if exc.kind == "driver":
        return Finding("NVIDIA driver", False, f"driver not loaded: {exc}", hint=DRIVER_HINT)
    return Finding("NVML", False, str(exc), hint="run nvidia-smi on the node to see the same error")


def no_gpu_finding() -> Finding:
    return Finding("GPUs", False, "no GPU: NVML reports 0 devices",
                   hint="check lspci for NVIDIA devices and that the pod sees them (privileged or device access)")


def driver_loaded(settings: Settings) -> tuple[bool, str]:
    """The kernel module, as procfs shows it (independent of NVML)."""
    version = Path(settings.proc_root) / "driver/nvidia/version"
    module = Path(settings.sysfs_root) / "module/nvidia"
    if version.exists():
        first = version.read_text(errors="replace").splitlines()[:1]
        return True, (first[0].strip()[:120] if first else str(version))
    if module.exists():
        return True, f"{module} present"
    return False, f"neither {version} nor {module} exists"


def checks(settings: Settings, gpus: tuple[GpuInfo, ...], nvml_error: nodeinfo.NvmlUnavailable | None) -> list[Check]:
    """NVML loadable, driver loaded, device nodes present and usable."""
    out = []
    library = nodeinfo.library_path(settings.nvml_library, settings.driver_root) or nodeinfo.SONAME
    if nvml_error is not None and nvml_error.kind == "library":
        out.append(Check("NVML library loadable", False, str(nvml_error), LIBRARY_HINT))
    else:
        out.append(Check("NVML library loadable", True, library))
    loaded, detail = driver_loaded(settings)
    if nvml_error is not None and nvml_error.kind == "driver":
        loaded, detail = False, str(nvml_error)
    out.append(Check("NVIDIA driver loaded", loaded, detail, "" if loaded else DRIVER_HINT))
    if nvml_error is not None and nvml_error.kind == "init":
        out.append(Check("NVML initialises", False, str(nvml_error), "run nvidia-smi on the node"))
    nodes = ["/dev/nvidiactl", *(f"/dev/nvidia{g.minor}" for g in gpus)]
    bad = [p for n in nodes if (p := hostfiles.node_state(settings.dev_root, n))]
    where = settings.dev_root if settings.dev_root != "/" else "/dev"
    if bad:
        out.append(Check("device nodes present and accessible", False, "; ".join(bad),
                         "mount the host's /dev (or the driver root) into the pod and set nvidiaDevRoot; "
                         "run as root or with access to the nodes"))
    else:
        out.append(Check("device nodes present and accessible", True, f"{len(nodes)} node(s) under {where}"))
    if settings.health_state_file:
        directory = Path(settings.health_state_file).parent
        if not directory.exists():
            out.append(Check("health state directory writable", True, f"{directory} will be created by the probe"))
        else:
            writable = directory.is_dir() and os.access(directory, os.W_OK)
            out.append(Check("health state directory writable", writable,
                             f"{directory} {'is writable' if writable else 'is not writable'}",
                             "XID marks survive a probe restart only when this directory is writable"))
    return out
