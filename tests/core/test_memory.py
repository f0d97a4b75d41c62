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


def _run(script: str, mode: str, **env: str) -> dict[str, object]:
    """``script`` in a fresh interpreter whose environment has only ``env``'s malloc settings."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "DPKIT_MALLOC", "GLIBC_TUNABLES"))}
    out = subprocess.run([sys.executable, "-c", script, mode], env={**clean, **env}, capture_output=True, text=True,
                         timeout=60, check=True)
    result: dict[str, object] = json.loads(out.stdout)
    return result


def _probe(mode: str, **env: str) -> dict[str, object]:
    return _run(PROBE, mode, **env)


def test_without_the_setting_glibc_moves_large_blocks_into_the_heap() -> None:
    assert _probe("plain") == {"applied": {}, "in_heap": True}


def test_the_fixed_threshold_keeps_large_blocks_out_of_the_heap() -> None:
    assert _probe("tune") == {"applied": {"MALLOC_MMAP_THRESHOLD": MMAP_THRESHOLD, "MALLOC_ARENA_MAX": 1},
                              "in_heap": False}


@pytest.mark.parametrize("env", [{"MALLOC_MMAP_THRESHOLD_": str(16 << 20)},
                                 {"GLIBC_TUNABLES": f"glibc.malloc.mmap_threshold={16 << 20}"},
                                 {"DPKIT_MALLOC_TUNING": "0"}])
def test_the_environment_overrides_the_default(env: dict[str, str]) -> None:
    # a threshold of 16 MiB set by the operator (or no tuning at all) puts the 512 KiB block in the heap
    result = _probe("tune", **env)
    assert result["in_heap"] is True and "MALLOC_MMAP_THRESHOLD" not in result["applied"]  # type: ignore[operator]


def test_tune_reads_the_mapping_it_is_given() -> None:
    assert tune_malloc({"DPKIT_MALLOC_TUNING": "off"}) == {}
    assert tune_malloc({"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_ARENA_MAX": "4"}) == {}
    assert tune_malloc({"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=131072:glibc.malloc.arena_max=4"}) == {}


def test_release_free_memory_runs() -> None:
    assert release_free_memory() in (True, False)


ARENAS = r"""
import ctypes, json, sys, threading
from dpkit.core.support.memory import tune_malloc
applied = tune_malloc() if sys.argv[1] == "tune" else {}
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
blocks, started, done = [], threading.Barrier(4), threading.Event()
def work():
    started.wait(10)  # all four at once, so each would get an arena of its own
    blocks.append(libc.malloc(4096))
    done.wait(10)
threads = [threading.Thread(target=work) for _ in range(4)]
for t in threads: t.start()
while len(blocks) < 4: pass
# a thread's arena is a heap glibc reserves 64 MiB for, aligned: its used part, then the rest
# reserved (---p) up to the 64 MiB end; count those
anon = {}
for line in open("/proc/self/maps"):
    fields = line.split()
    if len(fields) == 5:
        lo, hi = (int(x, 16) for x in fields[0].split("-"))
        anon[lo] = (hi, fields[1])
size = 64 << 20
heaps = [lo for lo, (hi, perms) in anon.items()
         if lo % size == 0 and perms.startswith("rw") and (hi - lo == size or anon.get(hi) == (lo + size, "---p"))]
done.set()
for t in threads: t.join(10)
print(json.dumps({"applied": applied, "thread_heaps": len(heaps)}))
"""


def _arenas(mode: str, **env: str) -> dict[str, object]:
    return _run(ARENAS, mode, **env)


def test_threads_share_one_arena() -> None:
    """Each thread's own arena kept what gRPC's and the streams' large messages left (0.6 MB at 1k devices
    after the benchmark's health flips): one arena for all (docs/performance.md)."""
    plain = _arenas("plain")
    assert plain["thread_heaps"] >= 2  # glibc's default: threads that allocate at once get arenas of their own
    tuned = _arenas("tune")
    assert tuned["thread_heaps"] == 0 and tuned["applied"] == {"MALLOC_MMAP_THRESHOLD": MMAP_THRESHOLD,
                                                               "MALLOC_ARENA_MAX": 1}
    assert _arenas("tune", MALLOC_ARENA_MAX="8")["thread_heaps"] >= 2  # the operator's setting wins
