"""Finding and starting NVML through the real ``pynvml`` binding.

pynvml opens ``libnvidia-ml.so.1`` by name. When the library lives elsewhere (a driver
container's root, or an explicit ``nvml_library``), it is opened first by full path: the dynamic
loader then hands pynvml that same library, since its soname is ``libnvidia-ml.so.1``.
Failures become :class:`NvmlUnavailable` with a kind ``dpkit discover`` can explain.
"""

from __future__ import annotations

import ctypes
import os
import threading
from typing import Any

import pynvml

from dpkit.core import get_logger, kv
from dpkit.nvidia.nodeinfo import LIBRARY_DIRS, SONAME, NvmlUnavailable, library_path

__all__ = ["LIBRARY_DIRS", "SONAME", "NVMLError", "NvmlUnavailable", "error_name", "init", "is_error",
           "library_path", "preload", "shutdown", "text"]

log = get_logger("nvidia.nvml")

NVMLError = pynvml.NVMLError
_loaded: dict[str, Any] = {}
_load_lock = threading.Lock()


def error_name(exc: BaseException) -> str:
    """``NVML_ERROR_GPU_IS_LOST`` style name for an NVMLError, for logs and reasons."""
    value = getattr(exc, "value", None)
    for name in dir(pynvml):
        if name.startswith("NVML_ERROR_") and getattr(pynvml, name) == value:
            return str(name)
    return type(exc).__name__


def is_error(exc: BaseException, *names: str) -> bool:
    value = getattr(exc, "value", None)
    return isinstance(exc, NVMLError) and any(getattr(pynvml, n, object()) == value for n in names)


def preload(path: str) -> None:
    """Open ``path`` so that pynvml's ``CDLL("libnvidia-ml.so.1")`` resolves to it."""
    if not path:
        return
    with _load_lock:
        if path in _loaded:
            return
        if not os.path.isfile(path):
            raise NvmlUnavailable("library", f"{path} does not exist")
        try:
            _loaded[path] = ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
        except OSError as exc:
            raise NvmlUnavailable("library", f"cannot load {path}: {exc}") from exc
        log.debug("NVML library loaded", extra=kv(path=path))


def init(path: str) -> None:
    """Load (if needed) and initialise NVML; :class:`NvmlUnavailable` says why not."""
    preload(path)
    try:
        pynvml.nvmlInit()
    except NVMLError as exc:
        if is_error(exc, "NVML_ERROR_LIBRARY_NOT_FOUND"):
            raise NvmlUnavailable("library", f"{SONAME} not found by the dynamic loader") from exc
        if is_error(exc, "NVML_ERROR_DRIVER_NOT_LOADED"):
            raise NvmlUnavailable("driver", "the NVIDIA kernel driver is not loaded") from exc
        if is_error(exc, "NVML_ERROR_NO_PERMISSION"):
            raise NvmlUnavailable("init", "no permission to open the NVIDIA device nodes") from exc
        raise NvmlUnavailable("init", f"NVML initialisation failed: {error_name(exc)}") from exc


def shutdown() -> None:
    try:
        pynvml.nvmlShutdown()
    except NVMLError as exc:
        log.debug("nvmlShutdown failed", extra=kv(error=error_name(exc)))


def text(value: Any) -> str:
    """pynvml returns str or bytes depending on the call; always str."""
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)
