"""bench_footprint.py's quick mode runs every vendor as a real `dpkit run` and reports what issue 13 asks.

No figure is asserted against a target (that is bench/'s job on a quiet machine): only that every
vendor was measured and the facts the table states hold: a probe-less vendor's serving process
maps no zmq, the nvidia serving process maps no NVML while its probe process does.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.timeout(150)
BENCH = Path(__file__).resolve().parents[2] / "bench"
VENDORS = ("sim", "nvidia", "sfc", "kvm_vfio", "cex")


def test_footprint_quick_measures_every_vendor_and_states_the_facts(tmp_path: Path) -> None:
    figures = tmp_path / "footprint.json"
    proc = subprocess.run([sys.executable, str(BENCH / "run_all.py"), "footprint", "--quick", "--json",
                           str(figures)], capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.strip().strip("|").split("|")]
            for line in proc.stdout.splitlines() if line.startswith("| ")}
    results: dict[str, dict[str, Any]] = {r["vendor"]: r for r in json.loads(figures.read_text())}
    for vendor in VENDORS:
        assert vendor in rows, f"no {vendor} row in:\n{proc.stdout}"
        assert float(rows[vendor][2]) > 0, rows[vendor]  # serving RSS (MB), a number
        result = results[vendor]
        assert result["serving"]["rss_mb"] > 0 and result["whole_rss_mb"] >= result["serving"]["rss_mb"]
        assert sum(result["devices"].values()) > 0
    for vendor in ("sim", "sfc", "kvm_vfio", "cex"):
        assert not results[vendor]["serving"]["maps_zmq"], f"{vendor}'s serving process maps zmq"
        assert results[vendor]["probes"] == []
        assert rows[vendor][6] == "no"  # the table's "serving maps zmq"
    nvidia = results["nvidia"]
    assert [p["name"].split(" ... ")[-1] for p in nvidia["probes"]] == ["nvml-health (dpkit.nvidia.health:run)"]
    assert nvidia["probes"][0]["rss_mb"] > 0 and nvidia["probes"][0]["maps_nvml"], "the probe holds NVML"
    assert not nvidia["serving"]["maps_nvml"], "the nvidia serving process maps the driver library"
    assert rows["nvidia"][5] == "no"  # the table's "serving maps NVML"
    assert "nvidia target (issue 13, on a real GPU node)" in rows
