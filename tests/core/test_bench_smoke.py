"""The benchmarks' quick modes run and print their figures (no timing is asserted: that is bench/'s job).

They start real `dpkit run` processes, the floor server and the kubelet emulator, so a change
that breaks a benchmark (an API it drives, the sim devices file, the control socket) shows here
rather than on the day someone measures.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(60)
BENCH = Path(__file__).resolve().parents[2] / "bench"


def run_quick(script: str) -> str:
    proc = subprocess.run([sys.executable, str(BENCH / "run_all.py"), script, "--quick"], capture_output=True,
                          text=True, timeout=50, check=False)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"
    return proc.stdout


def test_floor_quick_prints_every_figure_with_a_ratio() -> None:
    out = run_quick("floor")
    for figure in ("start -> registered", "Allocate p50", "Allocate p99", "ListAndWatch first list",
                   "health change -> ListAndWatch p50", "health change -> ListAndWatch p99", "RSS (MB)",
                   "idle CPU", "`dpkit --help`"):
        rows = [line for line in out.splitlines() if line.startswith(f"| {figure}")]
        assert rows, f"no {figure!r} row in:\n{out}"
        for line in rows:
            cells = [c.strip() for c in line.strip("|").split("|")]
            dpkit, floor = float(cells[2]), float(cells[3])  # both measured, as numbers
            assert dpkit >= 0 and floor >= 0
            assert cells[4] == "-" or float(cells[4]) >= 0  # the dpkit / floor ratio
    assert "| Allocate p50 (ms) | 1,000 |" in out  # both quick sizes ran


def test_burst_quick_reports_catch_up_wrong_devices_and_control_latency() -> None:
    out = run_quick("burst")
    for case in ("all Unhealthy", "then all Healthy", "flapping"):
        lines = [line for line in out.splitlines() if case in line]
        for figure in ("kubelet's view equals", "`status` equals", "devices wrong 1 s after",
                       "control socket `status` answer", "final `dpkit status --json`"):
            if case == "all Unhealthy" and figure.startswith("final"):
                continue  # the final check follows the second burst of that case
            assert any(figure in line for line in lines), f"no {figure!r} for {case!r} in:\n{out}"
    assert "timed out (3 s)" in out
