"""glibc malloc settings for the long-running ``dpkit run`` process (issue 13: its RSS).

glibc raises its mmap threshold to the size of the largest block freed (up to 32 MiB), so after
start-up has built and dropped a few large buffers (a 100k-device CDI document, the first device
list) every later large block comes from the heap, where freed memory stays in the process.
Fixing the threshold at glibc's own default keeps large blocks in their own mappings, handed back
to the kernel when freed: measured 265 -> 231 MB at 100k devices, no change at 1k.

glibc also gives each thread that allocates its own arena, up to eight per core. gRPC's threads
and the streams' large messages then leave free memory in each: one arena for all (M_ARENA_MAX 1)
kept 0.6 MB less at 1k devices after the benchmark's health flips, with no change to Allocate's
latency against the floor (docs/performance.md). Python objects are unaffected: they come from
Python's own allocator, under the GIL.

A standard glibc variable (``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_ARENA_MAX``, or the
``GLIBC_TUNABLES`` names) already set in the environment wins: glibc applied it at start and it
is left alone. ``DPKIT_MALLOC_TUNING=0`` turns every setting here off. On a C library without
``mallopt`` (musl) nothing happens.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Mapping

M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8
MMAP_THRESHOLD = 128 * 1024  # glibc's initial value, now kept: blocks this large get their own mapping
ARENA_MAX = 1  # one malloc arena for every thread

# mallopt parameter -> (value, the glibc variable and tunable that override it)
_SETTINGS: dict[int, tuple[int, str, str]] = {
    M_MMAP_THRESHOLD: (MMAP_THRESHOLD, "MALLOC_MMAP_THRESHOLD_", "glibc.malloc.mmap_threshold"),
    M_ARENA_MAX: (ARENA_MAX, "MALLOC_ARENA_MAX", "glibc.malloc.arena_max"),
}


def _libc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL(None)
        libc.mallopt  # noqa: B018 - only whether the C library has it
        libc.malloc_trim  # noqa: B018
    except (OSError, AttributeError):
        return None
    return libc


def tune_malloc(env: Mapping[str, str] | None = None) -> dict[str, int]:
    """Apply the settings above, before any thread starts; returns what was set (name -> value)."""
    env = os.environ if env is None else env
    if env.get("DPKIT_MALLOC_TUNING", "1").strip().lower() in ("0", "off", "false", "no"):
        return {}
    libc = _libc()
    if libc is None:
        return {}
    applied: dict[str, int] = {}
    tunables = env.get("GLIBC_TUNABLES", "")
    for param, (value, variable, tunable) in _SETTINGS.items():
        if variable in env or tunable in tunables:
            continue
        if libc.mallopt(ctypes.c_int(param), ctypes.c_int(value)) == 1:
            applied[variable.rstrip("_")] = value
    return applied


def release_free_memory() -> bool:
    """Hand the heap's free pages back to the kernel (``malloc_trim``); True if any were."""
    libc = _libc()
    return bool(libc is not None and libc.malloc_trim(ctypes.c_size_t(0)))
