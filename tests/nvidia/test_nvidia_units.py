"""Small parts on their own: host files with bad data, the call guard, MIG names, the probe's state file."""

from __future__ import annotations

import threading
import time

import pytest

from dpkit.nvidia import hostfiles
from dpkit.nvidia.config import load_settings
from dpkit.nvidia.gpus import mig_profile
from dpkit.nvidia.guard import Guard, Hung
from dpkit.nvidia.health import Marks, Monitor


def test_bus_ids_are_checked_before_they_become_paths(tmp_path):
    assert hostfiles.sysfs_bus_id("00000000:3B:00.0") == "0000:3b:00.0"
    assert hostfiles.sysfs_bus_id("0001:af:1f.7") == "0001:af:1f.7"
    for bad in ("../../etc", "0000:3b:00", "zzzz:00:00.0", "0000:3b:00.9"):
        assert hostfiles.sysfs_bus_id(bad) is None
    node, problem = hostfiles.numa_node(str(tmp_path), "../../etc/passwd")
    assert node is None and "malformed" in problem


@pytest.mark.parametrize(("content", "node", "problem"), [
    ("1\n", 1, ""), ("-1\n", None, ""), ("banana", None, "not a NUMA node number"),
    ("99999", None, "not a plausible NUMA node"), ("", None, "not a NUMA node number"),
])
def test_numa_node_values(tmp_path, content, node, problem):
    path = tmp_path / "bus/pci/devices/0000:18:00.0"
    path.mkdir(parents=True)
    (path / "numa_node").write_text(content)
    got, why = hostfiles.numa_node(str(tmp_path), "00000000:18:00.0")
    assert got == node and problem in why and (why == "") == (problem == "")


def test_missing_numa_file_means_no_numa_without_complaint(tmp_path):
    assert hostfiles.numa_node(str(tmp_path), "00000000:18:00.0") == (None, "")


def test_mig_minors_skip_malformed_lines(tmp_path):
    caps = tmp_path / "driver/nvidia-caps"
    caps.mkdir(parents=True)
    (caps / "mig-minors").write_text("config 1\ngpu0/gi1/access 12\ngarbage here too\ngpu0/gi1/ci0/access x\n")
    minors, problem = hostfiles.mig_minors(str(tmp_path))
    assert minors == {"config": 1, "gpu0/gi1/access": 12}
    assert "2 malformed line(s) ignored" in problem
    missing = hostfiles.mig_minors(str(tmp_path / "none"))
    assert missing[0] == {} and missing[1].endswith("does not exist (no MIG support in the loaded driver?)")


# total memory as NVML reports it: H100 80GB 81559 MiB, A100 40GB 40536 MiB, H200 143771 MiB
@pytest.mark.parametrize(("gi", "ci", "mb", "total_mib", "name"), [
    (1, 1, 9856, 81559, "1g.10gb"), (3, 3, 40192, 81559, "3g.40gb"), (7, 7, 80896, 81559, "7g.80gb"),
    (1, 1, 4864, 40536, "1g.5gb"), (2, 1, 19968, 81559, "1c.2g.20gb"), (1, 1, 16384, 143771, "1g.18gb"),
])
def test_mig_profile_names_match_nvidias(gi, ci, mb, total_mib, name):
    assert mig_profile(gi, ci, mb, total_mib << 20) == name


def test_guard_times_out_refuses_to_stack_and_passes_errors_through():
    release = threading.Event()
    guard = Guard(0.2)
    with pytest.raises(Hung):
        guard.call("gpu0", release.wait, 30)
    ran = threading.Event()
    with pytest.raises(Hung, match="gpu0"):
        guard.call("gpu0", ran.set)  # refused at once: gpu0's call is still stuck
    assert not ran.is_set(), "a second call for a stuck name must not be started"
    assert guard.call("gpu1", lambda: 7) == 7
    with pytest.raises(ZeroDivisionError):
        guard.call("gpu1", lambda: 1 / 0)
    release.set()
    deadline = time.monotonic() + 5
    while guard.stuck() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert guard.stuck() == {}
    assert guard.call("gpu0", lambda: "back") == "back"


def test_guard_ticks_while_waiting():
    ticks = []
    guard = Guard(5.0, tick=lambda: ticks.append(1))
    assert guard.call("slow", time.sleep, 1.3) is None
    assert ticks, "the heartbeat callback did not run during a 1.3 s call"


def test_probe_state_file_round_trips_and_survives_garbage(tmp_path):
    state = tmp_path / "state.json"
    settings = load_settings({"health_state_file": str(state)}, environ={})
    first = Monitor(settings, lambda *a: None, Guard(1.0))
    first.marks["GPU-1"] = Marks({"xid": "XID 79"}, went_away=False)
    first._save()
    assert Monitor(settings, lambda *a: None, Guard(1.0)).marks == {"GPU-1": Marks({"xid": "XID 79"}, False)}
    state.write_text("{not json")
    assert Monitor(settings, lambda *a: None, Guard(1.0)).marks == {}
