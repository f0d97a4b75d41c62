"""`dpkit run` as a real process: signals, reload, the control socket, and the other commands."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from dpkit.core import cli
from dpkit.core.control import query
from dpkit.core.demo import run_demo
from dpkit.core.errors import DpkitError

WIDGET = "example.com/widget"


def _devices(path: Path, ids: list[str]) -> None:
    path.write_text(yaml.safe_dump({"resources": {WIDGET: [{"id": i, "numa": 0} for i in ids]}}))


@pytest.fixture
def plugin_process(short_tmp, plugin_dir, kubelet):  # type: ignore[no-untyped-def]
    devices = short_tmp / "devices.yaml"
    _devices(devices, ["a", "b"])
    config = short_tmp / "config.yaml"
    config.write_text(yaml.safe_dump({
        "plugin_dir": str(plugin_dir), "state_dir": str(short_tmp / "st"), "log_format": "json",
        "cdi_dir": str(short_tmp / "cdi"), "nfd_features_dir": str(short_tmp / "nfd"),
        "vendor": {"devices_file": str(devices), "script": False},
    }))
    proc = subprocess.Popen([sys.executable, "-m", "dpkit.core.cli", "run", "sim", "-c", str(config)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        yield proc, config, devices
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=10)


def test_sigterm_stops_cleanly_and_removes_sockets(plugin_process, kubelet, plugin_dir, short_tmp):
    proc, _, _ = plugin_process
    assert kubelet.wait_for(lambda k: k.allocatable(WIDGET) == 2, 20)
    assert (plugin_dir / "dpkit-example.com_widget.sock").exists()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=15)
    assert proc.returncode == 0, err
    assert not list(plugin_dir.glob("dpkit-*.sock"))
    assert not (short_tmp / "st" / "control.sock").exists()
    lines = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    assert any(entry["msg"] == "registered with the kubelet" and entry["resource"] == WIDGET for entry in lines)
    assert any(entry["msg"] == "stopped" for entry in lines)


def test_sighup_reloads_config_and_bad_reload_keeps_running(plugin_process, kubelet, short_tmp):
    proc, config, devices = plugin_process
    assert kubelet.wait_for(lambda k: k.allocatable(WIDGET) == 2, 20)
    _devices(devices, ["a", "b", "c"])
    proc.send_signal(signal.SIGHUP)
    assert kubelet.wait_for(lambda k: k.allocatable(WIDGET) == 3, 20)
    config.write_text("plugin_dir: [unclosed")
    proc.send_signal(signal.SIGHUP)
    status = _status_until(short_tmp / "st", lambda s: s["reloads"] >= 2)
    assert status["reloads"] == 2
    assert any("reload rejected" in e["msg"] for e in status["errors"])
    assert proc.poll() is None and kubelet.allocatable(WIDGET) == 3


def _status_until(state_dir: Path, predicate, timeout: float = 10.0) -> dict:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while True:
        status = query(state_dir)["status"]
        if predicate(status) or time.monotonic() > deadline:
            return status
        time.sleep(0.02)


def test_status_command_table_and_json(plugin_process, kubelet, short_tmp, capsys):
    assert kubelet.wait_for(lambda k: k.allocatable(WIDGET) == 2, 20)
    # the kubelet streams during Register; the plugin records success when the call returns
    assert _status_until(short_tmp / "st", lambda s: s["resources"][0]["registered"])["resources"][0]["registered"]
    assert cli.main(["status", "--state-dir", str(short_tmp / "st"), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    res = data["resources"][0]
    assert res["name"] == WIDGET and res["registered"] and res["allocatable"] == 2
    assert {d["id"] for d in res["devices"]} == {"a", "b"}
    assert data["kubelet"]["present"] is True
    assert cli.main(["status", "--state-dir", str(short_tmp / "st")]) == 0
    table = capsys.readouterr().out
    assert "example.com/widget: 2/2 healthy, registered" in table
    assert "HEALTH" in table


def test_control_socket_is_read_only(plugin_process, kubelet, short_tmp):
    assert kubelet.wait_for(lambda k: k.allocatable(WIDGET) == 2, 20)
    with pytest.raises(DpkitError, match="read-only control socket"):
        query(short_tmp / "st", command="stop")


def test_status_without_a_running_plugin_explains(short_tmp, capsys):
    assert cli.main(["status", "--state-dir", str(short_tmp / "nothing")]) == 2
    assert "no control socket" in capsys.readouterr().err


def test_run_with_bad_config_exits_with_a_clear_error(short_tmp):
    config = short_tmp / "c.yaml"
    config.write_text("plugin_dir: 3\n")
    proc = subprocess.run([sys.executable, "-m", "dpkit.core.cli", "run", "sim", "-c", str(config)],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2
    assert f"{config}: key 'plugin_dir': expected a string" in proc.stderr


def test_run_unknown_vendor(capsys):
    assert cli.main(["run", "no-such-vendor"]) == 2
    assert "unknown vendor 'no-such-vendor'" in capsys.readouterr().err


def test_discover_sim_lists_devices_and_findings(capsys):
    assert cli.main(["discover", "sim"]) == 0
    out = capsys.readouterr().out
    assert "example.com/widget: 4/4 healthy" in out and "widget-3" in out
    assert cli.main(["discover", "sim", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["vendor"] == "sim" and report["errors"] == []


def test_vendors_lists_sim_and_the_entry_points(capsys):
    assert cli.main(["vendors", "--json"]) == 0
    vendors = json.loads(capsys.readouterr().out)
    assert vendors["sim"] == "dpkit.core.sim:SimulatedVendor", "the built-in vendor is listed too"
    assert all(":" in target for target in vendors.values())
    assert cli.main(["vendors"]) == 0
    assert "sim\tdpkit.core.sim:SimulatedVendor  (built in" in capsys.readouterr().out


def test_demo_runs_the_whole_story():
    out = io.StringIO()
    assert run_demo(out=out) == 0
    text = out.getvalue()
    assert "widget-1: Healthy -> Unhealthy" in text
    assert "+widget-4" in text and "-gadget-0" in text
    assert "allocated widget-" in text and "SIM_VISIBLE_DEVICES=" in text
    assert "re-registered in" in text
    assert "widget-0  Healthy    0      default/demo-pod/app" in text, "status shows which pod holds a device"
    assert "sockets left behind: none" in text


def test_doctor_fails_without_kubelet(short_tmp, capsys, monkeypatch):
    monkeypatch.setenv("DPKIT_PLUGIN_DIR", str(short_tmp / "nothing"))
    assert cli.main(["doctor", "sim"]) == 1
    out = capsys.readouterr().out
    assert "[FAIL] kubelet socket reachable" in out and "fix:" in out
    assert "[ok  ] vendor sim loads" in out
    assert os.environ["DPKIT_PLUGIN_DIR"].endswith("nothing")
