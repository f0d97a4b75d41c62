"""Out-of-process probes: heartbeats, a hung probe marks devices Unhealthy and is restarted."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
from scripted_vendor import RES, ProbedVendor, ScriptedVendor

from dpkit.core.engine.events import decode_probe_message
from dpkit.core.vendorapi.vendor import Probe

TESTS = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def probe_path(monkeypatch: pytest.MonkeyPatch) -> None:
    # the probe child imports its target by module name, like a vendor package's probe
    monkeypatch.setenv("PYTHONPATH", str(TESTS))


def test_hung_probe_marks_devices_unhealthy_and_is_restarted(kubelet, run_manager, short_tmp):
    flag = short_tmp / "hang"
    probe = Probe("stuck-driver", "scripted_vendor:hanging_probe", {"hang_flag": str(flag)}, heartbeat_timeout=0.6)
    manager = run_manager(ProbedVendor(probe=probe))
    assert kubelet.wait_for(lambda k: k.allocatable(RES) == 4, 10)
    state = manager.probes.probes["stuck-driver"]
    assert kubelet.wait_for(lambda k: state.beats > 0, 15), "probe never sent a heartbeat"
    first_pid = state.process.pid
    flag.touch()  # the probe's next call hangs forever
    assert kubelet.wait_for(lambda k: k.allocatable(RES) == 0, 15)
    reasons = {d["reason"] for d in manager.status()["resources"][0]["devices"]}
    assert reasons == {"health probe stuck-driver stopped responding"}
    flag.unlink()  # the restarted probe will beat again
    assert kubelet.wait_for(lambda k: k.allocatable(RES) == 4, 20)
    assert state.restarts >= 1
    assert state.process is not None and state.process.pid != first_pid
    status = manager.status()["probes"][0]
    assert status["restarts"] >= 1 and status["silent"] is False


def test_a_probe_that_cannot_start_is_retried_and_its_devices_go_unhealthy(kubelet, run_manager, caplog):
    """A config that is not JSON (a vendor bug) or no process left to fork: start-up and the loop go on, status
    answers, and the devices the probe watches are not advertised healthy meanwhile."""
    probe = Probe("broken", "scripted_vendor:reporting_probe", {"path": Path("/x")}, heartbeat_timeout=0.5)
    manager = run_manager(ProbedVendor(probe=probe))  # start() does not raise
    assert kubelet.wait_for(lambda k: len(k.devices(RES)) == 4 and k.allocatable(RES) == 0, 15)
    assert manager.current_state(timeout=5).version >= 1, "the loop answers while the probe cannot start"
    state = manager.probes.probes["broken"]
    assert state.process is None and state.failures >= 1 and state.silent
    assert "could not start: TypeError" in state.history[-1]
    assert any(r.getMessage() == "probe could not start; trying again" for r in caplog.records)


def test_probe_health_reports_reach_the_kubelet(kubelet, run_manager):
    probe = Probe("xid-watch", "scripted_vendor:reporting_probe", heartbeat_timeout=5)
    manager = run_manager(ProbedVendor(probe=probe))
    assert kubelet.wait_for(lambda k: k.devices(RES).get("w1") is not None
                            and k.devices(RES)["w1"].health == "Unhealthy", 15)
    device = next(d for d in manager.status()["resources"][0]["devices"] if d["id"] == "w1")
    assert device["reason"] == "probe saw an XID 79"
    assert kubelet.allocatable(RES) == 3


def test_probe_stops_with_the_manager(run_manager):
    probe = Probe("xid-watch", "scripted_vendor:reporting_probe", heartbeat_timeout=5)
    manager = run_manager(ProbedVendor(probe=probe))
    proc = manager.probes.probes["xid-watch"].process
    assert proc is not None
    manager.stop()
    assert proc.poll() is not None, "probe process outlived its manager"


@pytest.mark.parametrize("raw", [
    b"not json", b"{}", b'{"type": "health", "probe": "p"}', b'{"type": "heartbeat", "probe": "unknown"}',
    b'{"type": "health", "probe": "p", "resource": "r", "id": "../../etc", "health": "Healthy"}',
    b'{"type": "health", "probe": "p", "resource": "r", "id": "a", "health": "Sick"}',
    b'{"type": "launch-missiles", "probe": "p"}',
])
def test_malformed_probe_messages_are_dropped(raw, caplog):
    caplog.set_level("WARNING", logger="dpkit")
    assert decode_probe_message(raw, {"p": object()}) is None
    assert any("malformed probe message" in r.getMessage() for r in caplog.records)


def test_valid_probe_message_decodes():
    event = decode_probe_message(
        b'{"type": "health", "probe": "p", "resource": "r/x", "id": "GPU-1", "health": "Unhealthy",'
        b' "reason": "XID 48"}',
        {"p": object()})
    assert event == ("health", "probe:p", "r/x", "GPU-1", "Unhealthy", "XID 48")


def test_probes_keep_running_when_the_manager_is_pid_1(short_tmp):
    """In a container `dpkit run` is PID 1; a probe must not take that for an orphaned parent."""
    import json
    import shutil
    import subprocess
    import sys

    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("needs root and unshare(1) to run the manager as PID 1 in a PID namespace")
    proc = subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", sys.executable,
                           str(TESTS / "core_pid1_child.py"), str(short_tmp)],
                          capture_output=True, text=True, timeout=60)
    if proc.returncode != 0 and "Operation not permitted" in proc.stderr:
        pytest.skip(f"PID namespaces not permitted here: {proc.stderr.strip()[:200]}")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["pid"] == 1
    assert result["restarts"] == 0 and result["beats"] > 10
    assert result["allocatable"] == 4


def test_reload_during_a_probe_silence_does_not_leave_devices_unhealthy(kubelet, make_config, short_tmp):
    from dpkit.core.engine.manager import Manager

    flag = short_tmp / "hang"
    flag.touch()
    stuck = Probe("driver", "scripted_vendor:hanging_probe", {"hang_flag": str(flag)}, heartbeat_timeout=0.5)
    healthy = Probe("driver", "scripted_vendor:hanging_probe", {"hang_flag": str(short_tmp / "no")},
                    heartbeat_timeout=5)
    manager = Manager(ProbedVendor(probe=stuck), make_config(),
                      vendor_factory=lambda config: ProbedVendor(config, probe=healthy))
    manager.start()
    try:
        assert kubelet.wait_for(lambda k: k.capacity(RES) == 4 and k.allocatable(RES) == 0, 15)
        manager.request_reload()
        assert kubelet.wait_for(lambda k: k.allocatable(RES) == 4, 15), "silence marks outlived their probe"
        assert manager.silenced == {}
    finally:
        manager.stop()


def test_a_probe_that_first_appears_on_reload_opens_the_endpoint_and_is_heard(kubelet, make_config, short_tmp,
                                                                               monkeypatch):
    """The probes' endpoint is bound on the first probe (a probe-less vendor never loads zmq): a
    vendor that gains a probe on SIGHUP gets it then, on the loop's own thread, and the loop,
    which waited on its wake pipe alone, now hears the probe too."""
    from dpkit.core.engine.manager import Manager

    monkeypatch.setenv("PYTHONPATH", str(TESTS))
    config = make_config()
    probe = Probe("xid", "scripted_vendor:reporting_probe", heartbeat_timeout=10)
    manager = Manager(ScriptedVendor(), config, vendor_factory=lambda section: ProbedVendor(section, probe=probe))
    manager.start()
    try:
        assert kubelet.wait_for(lambda k: k.allocatable(RES) == 4, 15)
        assert manager.bus.ipc_address == "" and not (Path(config.state_dir) / "events.sock").exists()
        manager.request_reload()
        assert kubelet.wait_for(lambda k: k.allocatable(RES) == 3, 15), "the new probe's report never arrived"
        assert manager.bus.ipc_path == Path(config.state_dir) / "events.sock" and manager.bus.ipc_path.exists()
        assert kubelet.wait_for(lambda k: manager.probes.probes["xid"].beats > 2, 15)
    finally:
        manager.stop()
    assert not (Path(config.state_dir) / "events.sock").exists(), "its socket goes with the bus"


HEAVY = ("grpc", "google.protobuf", "yaml", "dpkit.core.vendorapi.vendor", "dpkit.core.engine.manager",
         "dpkit.core.vendorapi.device")


def test_probe_process_loads_only_the_runner_zmq_and_its_target(run_manager, short_tmp, monkeypatch):
    """A probe is a process on every node: it must not carry the manager's grpc, protobuf or yaml."""
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(TESTS / "core"), str(TESTS)]))
    out = short_tmp / "modules.json"
    probe = Probe("lean", "lean_probe:record", {"out": str(out)}, heartbeat_timeout=5)
    manager = run_manager(ProbedVendor(probe=probe))
    state = manager.probes.probes["lean"]
    deadline = time.monotonic() + 15
    while not (out.exists() and state.beats > 0) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert out.exists() and state.beats > 0, "the probe never started"
    modules = set(json.loads(out.read_text()))
    assert "zmq" in modules and "lean_probe" in modules
    assert sorted(m for m in modules if m.startswith(HEAVY)) == []
    assert state.process is not None
    status = Path(f"/proc/{state.process.pid}/status").read_text()
    rss_kb = int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS:")))
    print(f"probe child VmRSS {rss_kb} kB")  # the figure docs/performance.md reports (pytest -s)
