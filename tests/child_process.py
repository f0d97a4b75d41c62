"""Helpers for tests that run dpkit as real processes: read a child's stdout up to a marker, find leftovers."""

from __future__ import annotations

import os
import selectors
import subprocess
import time
from pathlib import Path


def read_until(proc: subprocess.Popen[str], marker: str, timeout: float = 30.0) -> str:
    """stdout of ``proc`` up to ``marker`` (read from the pipe's fd: no buffer hides data from select)."""
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    seen = b""
    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as sel:
        sel.register(fd, selectors.EVENT_READ)
        while marker.encode() not in seen:
            left = deadline - time.monotonic()
            assert left > 0 and sel.select(left), f"no {marker!r} within {timeout}s; got: {seen!r}"
            chunk = os.read(fd, 65536)
            assert chunk, f"process ended before {marker!r}; got: {seen!r}"
            seen += chunk
    return seen.decode()


def processes_mentioning(text: str) -> list[int]:
    """PIDs whose command line contains ``text``: what a stop must not leave behind."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if text in (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def loaded_after(code: str, modules: tuple[str, ...]) -> list[str]:
    """Which of ``modules`` (or their submodules) a fresh interpreter holds once it has run ``code``."""
    import json
    import sys

    report = (f"\nimport json as _j, sys as _s\nprint(_j.dumps(sorted(m for m in _s.modules "
              f"if any(m == x or m.startswith(x + '.') for x in {modules!r}))))")
    result = subprocess.run([sys.executable, "-c", code + report], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    found: list[str] = json.loads(result.stdout.strip().splitlines()[-1])
    return found
