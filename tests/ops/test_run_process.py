"""`dpkit run` as a real process with every integration on: files, metrics, status, clean stop;
`dpkit kubelet` as a real process driven over its control socket; signals through `./dpkit`."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from child_process import processes_mentioning, read_until
from prometheus_client.parser import text_string_to_metric_families

from dpkit.core.engine.control import query
from dpkit.core.integrations.cdi import spec_file_name

WIDGET = "example.com/widget"


def test_run_with_cdi_metrics_and_pod_view_then_sigterm(kubelet, plugin_dir, short_tmp):
    devices = short_tmp / "devices.yaml"
    devices.write_text(yaml.safe_dump({"resources": {WIDGET: [{"id": "a", "numa": 0}, {"id": "b", "numa": 0}]}}))
    cdi_dir, state = short_tmp / "cdi", short_tmp / "st"
    config = short_tmp / "config.yaml"
    config.write_text(yaml.safe_dump({
        "plugin_dir": str(plugin_dir), "state_dir": str(state), "log_format": "json",
        "pod_resources_socket": str(kubelet.pod_resources_socket), "cdi_dir": str(cdi_dir), "cdi_allocate": True,
        "nfd_features_dir": str(short_tmp / "nfd"),
        "metrics_address": "127.0.0.1:0", "vendor": {"devices_file": str(devices), "script": False},
    }))
    proc = subprocess.Popen([sys.executable, "-m", "dpkit.core.tools.cli", "run", "sim", "-c", str(config)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert kubelet.wait_for(lambda k: k.allocatable(WIDGET) == 2, 20)
        ids, response = kubelet.allocate(WIDGET, 1, pod="web-0", container="app")
        assert [c.name for c in response.cdi_devices] == [f"{WIDGET}={ids[0]}"]
        spec = json.loads((cdi_dir / spec_file_name("sim", WIDGET)).read_text())
        assert {d["name"] for d in spec["devices"]} == {"a", "b"}
        status = query(state)["status"]
        assert status["resources"][0]["holders"] == {ids[0]: "default/web-0/app"}
        port = int(status["metrics"]["address"].rpartition(":")[2])
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
            families = {f.name: f for f in text_string_to_metric_families(reply.read().decode())}
        held = [s.labels for s in families["dpkit_device_allocated"].samples]
        assert held == [{"resource": WIDGET, "device": ids[0], "namespace": "default", "pod": "web-0",
                         "container": "app"}]
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=15)
    assert proc.returncode == 0, err
    assert list(Path(cdi_dir).iterdir()) == [], "CDI specs are removed on shutdown"


ROOT = Path(__file__).resolve().parents[2]
CLI = [sys.executable, "-m", "dpkit.core.tools.cli"]


def kubectl(root: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """`dpkit kubelet --dir ROOT ARGS...` as its own process, as a user types it."""
    result = subprocess.run([*CLI, "kubelet", "--dir", str(root), *args], capture_output=True, text=True, timeout=60)
    if check:
        assert result.returncode == 0, result.stderr
    return result


def devices_until(root: Path, predicate, timeout: float = 20.0) -> dict:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while True:
        reply = json.loads(kubectl(root, "devices", "--json").stdout)
        if predicate(reply) or time.monotonic() > deadline:
            return reply  # type: ignore[no-any-return]
        time.sleep(0.05)


def stop(proc: subprocess.Popen[str], sig: int = signal.SIGTERM) -> tuple[int, str]:
    if proc.poll() is None:
        proc.send_signal(sig)
    try:
        _, err = proc.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate(timeout=10)
        raise
    return proc.returncode, err


@pytest.fixture
def emulator(short_tmp: Path) -> Iterator[tuple[subprocess.Popen[str], Path]]:
    root = short_tmp / "kl"
    proc = subprocess.Popen([*CLI, "kubelet", "--dir", str(root)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        read_until(proc, "SIGTERM or Ctrl-C stops it.")
        yield proc, root
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=10)


def test_kubelet_command_serves_and_is_driven_from_the_shell(emulator, short_tmp):
    kubelet_proc, root = emulator
    devices = short_tmp / "devices.yaml"
    devices.write_text(yaml.safe_dump({"resources": {WIDGET: [{"id": f"w{i}", "numa": i // 2} for i in range(4)]}}))
    assert (root / "dpkit.yaml").exists(), "the emulator writes a config for `dpkit run`"
    plugin = subprocess.Popen([*CLI, "run", "sim", "-c", str(root / "dpkit.yaml"), "--devices", str(devices)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        reply = devices_until(root, lambda r: [x["healthy"] for x in r["resources"]] == [4])
        assert reply["resources"][0]["name"] == WIDGET and reply["resources"][0]["registered"]
        allocated = kubectl(root, "allocate", WIDGET, "2", "--pod", "web")
        assert "allocated w0, w1 to default/web/main" in allocated.stdout  # packed on NUMA node 0
        assert "env    SIM_VISIBLE_DEVICES=w0,w1" in allocated.stdout
        table = kubectl(root, "devices").stdout
        assert f"{WIDGET}: registered, capacity 4, healthy 4, held 2" in table
        assert "held by default/web/main" in table
        too_many = kubectl(root, "allocate", WIDGET, "3", check=False)
        assert too_many.returncode == 2
        assert f"insufficient {WIDGET}: requested 3, available 2" in too_many.stderr
        assert "released default/web" in kubectl(root, "release", "web").stdout
        assert "kubelet restarted" in kubectl(root, "restart").stdout
        again = devices_until(root, lambda r: [x["healthy"] for x in r["resources"]] == [4])
        assert again["resources"][0]["registered"], "the plugin re-registered after the restart"
        assert stop(plugin)[0] == 0
    finally:
        if plugin.poll() is None:
            plugin.kill()
            plugin.communicate(timeout=10)
    assert stop(kubelet_proc)[0] == 0
    assert not (root / "control.sock").exists() and not (root / "device-plugins" / "kubelet.sock").exists()


def test_kubelet_control_socket_bounds_requests_and_answers_errors(emulator):
    _, root = emulator
    for payload, error in ((b"x" * (70 * 1024) + b"\n", "request larger than 65536 bytes"),
                           (b"not json\n", "expected one line of JSON"),
                           (b'{"cmd": "format-disk"}\n', "unknown command 'format-disk'"),
                           (b'{"cmd": "allocate", "resource": "a.com/b", "count": 0}\n', "count of at least 1")):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(10)
            s.connect(str(root / "control.sock"))
            s.sendall(payload)
            reply = json.loads(s.makefile("rb").readline())
        assert reply["ok"] is False and error in reply["error"], reply
    assert oct((root / "control.sock").stat().st_mode & 0o777) == "0o600"
    missing = kubectl(root.parent / "nowhere", "devices", check=False)
    assert missing.returncode == 2 and "start one with `dpkit kubelet --dir" in missing.stderr


@pytest.fixture(scope="module")
def wrapper_env() -> None:
    """On a fresh clone the wrapper's first call creates the hatch env (minutes on a busy 2-core CI
    machine): pay that once, outside the timed part of the tests."""
    subprocess.run([str(ROOT / "dpkit"), "--help"], capture_output=True, timeout=900, check=True)


@pytest.mark.timeout(1000)  # the first call may create the wrapper's environment
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_signals_reach_dpkit_run_through_the_wrapper(sig, wrapper_env, emulator, short_tmp):
    """`./dpkit` execs: SIGHUP reloads, SIGTERM stops `dpkit run` itself, and no process is left."""
    _, root = emulator
    devices = short_tmp / "devices.yaml"
    devices.write_text(yaml.safe_dump({"resources": {WIDGET: [{"id": "a"}]}}))
    proc = subprocess.Popen([str(ROOT / "dpkit"), "run", "sim", "-c", str(root / "dpkit.yaml"),
                             "--devices", str(devices)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert devices_until(root, lambda r: [x["healthy"] for x in r["resources"]] == [1], 60)["resources"]
        assert Path(f"/proc/{proc.pid}/exe").resolve().name.startswith("python"), "no shell or hatch in between"
        if sig == signal.SIGHUP:
            devices.write_text(yaml.safe_dump({"resources": {WIDGET: [{"id": "a"}, {"id": "b"}]}}))
            proc.send_signal(signal.SIGHUP)
            assert devices_until(root, lambda r: [x["healthy"] for x in r["resources"]] == [2])["resources"]
        code, err = stop(proc, signal.SIGTERM)
        left = processes_mentioning(str(devices))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=10)
        for pid in processes_mentioning(str(devices)):  # an orphan of a broken wrapper must not outlive the test
            os.kill(pid, signal.SIGKILL)
    assert code == 0, err
    assert left == [], "a process outlived the SIGTERM"
    assert not list((root / "device-plugins").glob("dpkit-*.sock"))
    assert not (root / "state" / "control.sock").exists()
