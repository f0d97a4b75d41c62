"""dpkit run's malloc settings (support/memory.py): a fixed mmap threshold unless the environment
says otherwise. Checked in fresh interpreters, where glibc's real behaviour shows: after a large
block has been freed, a smaller large block lands in the heap (glibc's dynamic threshold) or in
a mapping of its own (the fixed one), read from /proc/self/maps."""

from __future__ import annotations

import ctypes
import json
import os
import subprocess
import sys

import pytest

from dpkit.core.support.memory import MMAP_THRESHOLD, release_free_memory, tune_malloc

pytestmark = pytest.mark.skipif(not hasattr(ctypes.CDLL(None), "mallopt"), reason="needs glibc's mallopt")

PROBE = r"""
import ctypes, json, os, sys
from dpkit.core.support.memory import tune_malloc
applied = tune_malloc() if sys.argv[1] == "tune" else {}
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
libc.free(libc.malloc(8 << 20))  # a large block freed: glibc's dynamic threshold rises to 8 MiB
block = libc.malloc(512 << 10)  # then one of 512 KiB
heap = [tuple(int(x, 16) for x in line.split()[0].split("-"))
        for line in open("/proc/self/maps") if line.rstrip().endswith("[heap]")]
print(json.dumps({"applied": applied, "in_heap": any(lo <= block < hi for lo, hi in heap)}))
"""


def _probe(mode: str, **env: str) -> dict[str, object]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "DPKIT_MALLOC", "GLIBC_TUNABLES"))}
    out = subprocess.run([sys.executable, "-c", PROBE, mode], env={**clean, **env}, capture_output=True, text=True,
                         timeout=60, check=True)
    result: dict[str, object] = json.loads(out.stdout)
    return result


def test_without_the_setting_glibc_moves_large_blocks_into_the_heap() -> None:
    assert _probe("plain") == {"applied": {}, "in_heap": True}


def test_the_fixed_threshold_keeps_large_blocks_out_of_the_heap() -> None:
    assert _probe("tune") == {"applied": {"MALLOC_MMAP_THRESHOLD": MMAP_THRESHOLD}, "in_heap": False}


@pytest.mark.parametrize("env", [{"MALLOC_MMAP_THRESHOLD_": str(16 << 20)},
                                 {"GLIBC_TUNABLES": f"glibc.malloc.mmap_threshold={16 << 20}"},
                                 {"DPKIT_MALLOC_TUNING": "0"}])
def test_the_environment_overrides_the_default(env: dict[str, str]) -> None:
    # a threshold of 16 MiB set by the operator (or no tuning at all) puts the 512 KiB block in the heap
    assert _probe("tune", **env) == {"applied": {}, "in_heap": True}


def test_tune_reads_the_mapping_it_is_given() -> None:
    assert tune_malloc({"DPKIT_MALLOC_TUNING": "off"}) == {}
    assert tune_malloc({"MALLOC_MMAP_THRESHOLD_": "131072"}) == {}


def test_release_free_memory_runs() -> None:
    assert release_free_memory() in (True, False)
