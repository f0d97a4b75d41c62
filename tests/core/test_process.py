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

from dpkit.core.engine.control import query
from dpkit.core.tools import cli
from dpkit.core.tools.demo import run_demo
from dpkit.core.vendorapi.errors import DpkitError

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
    proc = subprocess.Popen([sys.executable, "-m", "dpkit.core.tools.cli", "run", "sim", "-c", str(config)],
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
    proc = subprocess.run([sys.executable, "-m", "dpkit.core.tools.cli", "run", "sim", "-c", str(config)],
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
    assert vendors["sim"] == "dpkit.core.tools.sim:SimulatedVendor", "the built-in vendor is listed too"
    assert all(":" in target for target in vendors.values())
    assert cli.main(["vendors"]) == 0
    assert "sim\tdpkit.core.tools.sim:SimulatedVendor  (built in" in capsys.readouterr().out


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


# -- the first hour: help, extra commands, sim without the demo's script, nothing to register ----
def test_help_explains_the_vendor_argument_and_lists_vendors(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    top = capsys.readouterr().out
    assert "vendors: sim, " in top and "kubelet" in top and "new-vendor" in top
    with pytest.raises(SystemExit):
        cli.main(["run", "--help"])
    run_help = capsys.readouterr().out
    assert "vendor to use: sim (built in" in run_help and "--devices FILE" in run_help
    with pytest.raises(SystemExit):
        cli.main(["discover", "--help"])
    assert "print the report as JSON" in capsys.readouterr().out


def test_builtin_commands_do_not_scan_entry_points(monkeypatch, capsys):
    def scan() -> dict[str, object]:
        raise AssertionError("entry points scanned for a built-in command")

    monkeypatch.setattr(cli, "_command_entry_points", scan)
    assert cli.main(["vendors"]) == 0


def _fake_command_package(site: Path, body: str) -> dict[str, str]:
    """A real installed distribution (dist-info with entry_points.txt) registering `dpkit hello`."""
    info = site / "dpkit_hello-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: dpkit-hello\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[dpkit.commands]\nhello = dpkit_hello_cmd:main\n"
                                           "run = dpkit_hello_cmd:main\n")
    (site / "dpkit_hello_cmd.py").write_text(body)
    return {**os.environ, "PYTHONPATH": str(site)}


def test_dpkit_commands_entry_points_dispatch_and_show_in_help(tmp_path):
    env = _fake_command_package(tmp_path / "site", "import sys\ndef main(argv):\n"
                                "    print('hello ' + ' '.join(argv))\n    return 3\n")
    cmd = [sys.executable, "-m", "dpkit.core.tools.cli"]
    hello = subprocess.run([*cmd, "hello", "a", "--b"], capture_output=True, text=True, env=env, timeout=30)
    assert (hello.returncode, hello.stdout) == (3, "hello a --b\n"), hello.stderr
    helped = subprocess.run([*cmd, "--help"], capture_output=True, text=True, env=env, timeout=30)
    assert "hello" in helped.stdout and "from dpkit-hello" in helped.stdout
    # a package cannot take over a built-in command
    run = subprocess.run([*cmd, "run", "no-such-vendor"], capture_output=True, text=True, env=env, timeout=30)
    assert run.returncode == 2 and "unknown vendor" in run.stderr


def test_a_command_that_fails_to_import_is_an_error_not_a_traceback(tmp_path):
    env = _fake_command_package(tmp_path / "site", "raise ImportError('libfoo missing')\n")
    result = subprocess.run([sys.executable, "-m", "dpkit.core.tools.cli", "hello"], capture_output=True, text=True,
                            env=env, timeout=30)
    assert result.returncode == 2
    assert "command 'hello' failed to load from dpkit_hello_cmd:main: libfoo missing" in result.stderr
    assert "Traceback" not in result.stderr


def test_run_sim_plays_no_script_unless_asked(short_tmp):
    from dpkit.core.support.config import Config

    devices = short_tmp / "d.yaml"
    _devices(devices, ["x"])
    plain = cli.vendor_factory("sim", Config())({})
    assert plain.play_script is False, "the scripted failures are the demo's, not `dpkit run sim`'s"
    assert cli.vendor_factory("sim", Config())({"script": True}).play_script is True
    chosen = cli.vendor_factory("sim", Config(), devices)({})
    assert [d.id for d in chosen.discover()[WIDGET]] == ["x"]
    with pytest.raises(DpkitError, match="--devices is an option of the sim vendor only"):
        cli.vendor_factory("nvidia", Config(), devices)


def test_vendor_section_errors_name_the_file_and_key(short_tmp, capsys):
    config = short_tmp / "c.yaml"
    config.write_text(yaml.safe_dump({"vendor": {"device_nodes": "/dev/x"}}))
    assert cli.main(["discover", "sim", "-c", str(config)]) == 2
    assert (f"dpkit: error: {config}: vendor: device_nodes: unknown key (did you mean 'device_node'?)"
            in capsys.readouterr().err)
    assert cli.vendor_error(str(config), "vendor.script: expected true or false") == \
        f"{config}: vendor: script: expected true or false"
    assert cli.vendor_error(str(config), "environment DPKIT_X: bad") == "environment DPKIT_X: bad"
    assert cli.vendor_error("<defaults>", "vendor.x: bad") == "vendor: x: bad"


def test_discover_separates_advertised_from_notes(capsys):
    assert cli.main(["discover", "sim"]) == 0
    out = capsys.readouterr().out
    assert "\nadvertised:\n  + <embedded demo.yaml>: simulated devices" in out
    assert "not advertised / notes:" not in out, "nothing is missing from the sim vendor"


def test_run_exits_1_when_nothing_can_be_registered(short_tmp, plugin_dir, kubelet, capsys):
    devices = short_tmp / "bad.yaml"
    devices.write_text(yaml.safe_dump({"resources": {"Not A Resource": [{"id": "a"}]}}))
    config = short_tmp / "c.yaml"
    config.write_text(yaml.safe_dump({"plugin_dir": str(plugin_dir), "state_dir": str(short_tmp / "st"),
                                      "log_format": "json", "cdi_dir": "", "nfd_features_dir": "",
                                      "pod_resources_socket": ""}))
    proc = subprocess.Popen([sys.executable, "-m", "dpkit.core.tools.cli", "run", "sim", "-c", str(config),
                             "--devices", str(devices), "--empty-grace", "4"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 15
        while not (short_tmp / "st" / "control.sock").exists():
            assert proc.poll() is None and time.monotonic() < deadline, "the plugin never came up"
            time.sleep(0.02)
        assert cli.main(["status", "--state-dir", str(short_tmp / "st")]) == 1
        assert "NOTHING TO REGISTER" in capsys.readouterr().out
        _, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=10)
    assert proc.returncode == 1, err
    logged = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    assert any(e["level"] == "error" and e["msg"].startswith("nothing to register") for e in logged)
    assert any(e["msg"] == "nothing registered; exiting with code 1" for e in logged)
    assert not list(plugin_dir.glob("dpkit-*.sock")) and not (short_tmp / "st" / "control.sock").exists()


def test_empty_grace_must_be_seconds(capsys):
    with pytest.raises(SystemExit):
        cli.main(["run", "sim", "--empty-grace", "-1"])
    assert "expected seconds >= 0" in capsys.readouterr().err
