"""Health is level-triggered: after any burst the kubelet, status and metrics hold every device's
last report; hostile peers on the event and control sockets get an error, never the socket."""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from pathlib import Path

import pytest
from scripted_vendor import RES, ProbedVendor, ScriptedVendor, widget

from dpkit.core.engine.control import query
from dpkit.core.engine.health import HealthBoard
from dpkit.core.engine.manager import Manager
from dpkit.core.engine.probes import ProbeSupervisor, backoff
from dpkit.core.support.config import Config
from dpkit.core.support.logs import RateLimiter
from dpkit.core.vendorapi.device import Health
from dpkit.core.vendorapi.vendor import Probe

TESTS = Path(__file__).resolve().parent.parent


def _vendor(count: int) -> ScriptedVendor:
    return ScriptedVendor(snapshot={RES: tuple(widget(i, i % 2) for i in range(count))})


@pytest.fixture
def serve_widgets(kubelet, run_manager, make_config):  # type: ignore[no-untyped-def]
    """``serve_widgets(count)``: that many widgets served (no CDI, no NFD file), all Allocatable at the kubelet."""

    def serve(count: int) -> tuple[ScriptedVendor, Config, Manager]:
        vendor = _vendor(count)
        config = make_config(cdi_dir="", nfd_features_dir="")
        manager = run_manager(vendor, config)
        assert kubelet.wait_for(lambda k: k.allocatable(RES) == count, 30)
        return vendor, config, manager

    return serve


def _kubelet_health(kubelet) -> dict[str, str]:  # type: ignore[no-untyped-def]
    return {d: s.health for d, s in kubelet.devices(RES).items()}


def _status_health(state_dir: str) -> dict[str, str]:
    status = query(state_dir, timeout=10)["status"]
    return {d["id"]: d["health"] for d in status["resources"][0]["devices"]}


def test_board_keeps_the_latest_report_per_device_and_wakes_once() -> None:
    wakes: list[int] = []
    board = HealthBoard(lambda: wakes.append(1))
    for i in range(100_000):
        board.report("watch", RES, f"w{i % 10}", Health.UNHEALTHY if i % 2 else Health.HEALTHY, str(i))
    pending = board.take()
    assert len(pending.reports) == 10  # bounded by devices, not by reports
    assert pending.reports[(RES, "w9", "watch")] == (Health.UNHEALTHY, "99999")
    assert pending.reports[(RES, "w0", "watch")] == (Health.HEALTHY, "99990")
    assert wakes == [1]
    board.report("watch", RES, "w0", Health.HEALTHY, "")
    assert wakes == [1, 1]  # the first write after a take wakes the manager again


def test_all_unhealthy_then_all_healthy_burst_leaves_no_device_behind(kubelet, serve_widgets):
    """5k devices all Unhealthy then all Healthy: today's queue dropped ~3k of the recoveries."""
    count = 5000
    vendor, config, manager = serve_widgets(count)
    for i in range(count):
        vendor.set_health(f"w{i}", Health.UNHEALTHY, "burst")
    assert kubelet.wait_for(lambda k: k.allocatable(RES) == 0, 30)
    for i in range(count):
        vendor.set_health(f"w{i}", Health.HEALTHY)
    assert kubelet.wait_for(lambda k: k.allocatable(RES) == count, 30), f"{count - kubelet.allocatable(RES)} stuck"
    assert set(_status_health(config.state_dir).values()) == {"Healthy"}
    assert all(d.healthy for d in manager.servers[RES].devices)


def test_flapping_burst_ends_in_every_devices_last_report(kubelet, serve_widgets):
    """1k devices flapping 20 times each, from two threads, then a last word per device."""
    count = 1000
    vendor, config, manager = serve_widgets(count)
    final = {f"w{i}": ("Unhealthy" if i % 3 == 0 else "Healthy") for i in range(count)}
    sink = vendor.sink
    assert sink is not None

    answered = threading.Event()  # the burst lasts until the control socket has answered during it
    deadline = time.monotonic() + 30

    def flap(devices: range) -> None:
        r = 0
        while r < 20 or (not answered.is_set() and time.monotonic() < deadline):
            for i in devices:
                sink.health(RES, f"w{i}", Health.UNHEALTHY if (r + i) % 2 else Health.HEALTHY, f"round {r}")
            r += 1
        for i in devices:
            sink.health(RES, f"w{i}", Health(final[f"w{i}"]), "final")

    threads = [threading.Thread(target=flap, args=(range(k, count, 2),)) for k in (0, 1)]
    answers = []
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):  # the control socket answers during the burst
        answers.append(query(config.state_dir, "ping", timeout=5)["ok"])
        if len(answers) >= 3:
            answered.set()
    for t in threads:
        t.join(30)
    assert answers and all(answers)
    assert kubelet.wait_for(lambda k: _kubelet_health(k) == final, 30)
    assert _status_health(config.state_dir) == final
    reasons = {d.id: d.reason for d in manager.servers[RES].devices if not d.healthy}
    assert set(reasons.values()) == {"final"}
    assert manager.status()["health"]["reports"] >= 21 * count


def test_probe_burst_over_the_event_socket_ends_in_the_last_report(kubelet, run_manager, make_config, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", str(TESTS))
    count = 1000
    probe = Probe("flapper", "burst_probes:flapping_probe", {"count": count, "rounds": 10}, heartbeat_timeout=20)
    vendor = ProbedVendor(probe=probe)
    vendor.current = {RES: tuple(widget(i) for i in range(count))}
    config = make_config(cdi_dir="", nfd_features_dir="")
    run_manager(vendor, config)
    final = {f"w{i}": ("Unhealthy" if i % 3 == 0 else "Healthy") for i in range(count)}
    assert kubelet.wait_for(lambda k: _kubelet_health(k) == final, 60)
    assert _status_health(config.state_dir) == final


def test_metrics_follow_a_burst(kubelet, run_manager, make_config):
    from dpkit.core.integrations.observers import attach_observers

    count = 2000
    vendor = _vendor(count)
    config = make_config(cdi_dir="", nfd_features_dir="", metrics_address="127.0.0.1:0")
    manager = Manager(vendor, config)
    attach_observers(manager)
    manager.start()
    try:
        assert kubelet.wait_for(lambda k: k.allocatable(RES) == count, 30)
        for r in range(5):
            for i in range(count):
                vendor.set_health(f"w{i}", Health.UNHEALTHY if (r + i) % 2 else Health.HEALTHY)
        unhealthy = sum(1 for i in range(count) if (4 + i) % 2)
        assert kubelet.wait_for(lambda k: k.allocatable(RES) == count - unhealthy, 30)
        metrics = next(o for o in manager.observers if type(o).__name__ == "Metrics")
        assert kubelet.wait_for(lambda k: metrics.status_fields(manager.current_state()) is not None
                                and _healthy_gauge(metrics) == count - unhealthy, 10)
    finally:
        manager.stop()


def _healthy_gauge(metrics) -> float:  # type: ignore[no-untyped-def]
    from prometheus_client import generate_latest

    for line in generate_latest(metrics.registry).decode().splitlines():
        if line.startswith("dpkit_devices{") and 'health="Healthy"' in line:
            return float(line.rsplit(" ", 1)[1])
    return -1.0


def test_garbage_on_the_event_socket_is_rate_limited_and_changes_nothing_else(
        kubelet, run_manager, make_config, monkeypatch, caplog):
    monkeypatch.setenv("PYTHONPATH", str(TESTS))
    probe = Probe("garbage", "burst_probes:garbage_probe", {"count": 2000}, heartbeat_timeout=20)
    config = make_config(cdi_dir="", nfd_features_dir="")
    caplog.set_level(logging.WARNING, logger="dpkit")
    run_manager(ProbedVendor(probe=probe), config)
    assert kubelet.wait_for(lambda k: k.devices(RES).get("w1") is not None
                            and k.devices(RES)["w1"].health == "Unhealthy", 30)
    dropped = [r for r in caplog.records if r.getMessage() == "dropping malformed probe message"]
    assert 1 <= len(dropped) <= 10, f"{len(dropped)} log lines for 2000 bad messages"
    assert query(config.state_dir, "ping")["ok"]


def test_rate_limiter_counts_what_it_drops() -> None:
    now = [0.0]
    limiter = RateLimiter(burst=3, interval=10.0, clock=lambda: now[0])
    assert [limiter.allow() for _ in range(5)] == [True, True, True, False, False]
    assert limiter.suppressed() == 2 and limiter.suppressed() == 0
    now[0] = 10.0
    assert limiter.allow()


def _read_reply(sock: socket.socket) -> bytes:
    """Everything the server sent; a reset after the reply (our request left partly unread) ends it."""
    chunks = []
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


@pytest.mark.parametrize("payload", [
    b"[" * 200_000,                      # RecursionError in json.loads
    b'{"cmd": ' * 5000 + b'"status"' + b"}" * 5000,
    b"\xff\xfe garbage",
    b'{"cmd": "status", "pad": "' + b"x" * 8000 + b'"}',  # over the request size limit
    b"[]",
])
def test_control_socket_answers_hostile_requests_and_keeps_serving(run_manager, make_config, payload):
    config = make_config(cdi_dir="", nfd_features_dir="")
    run_manager(ScriptedVendor(), config)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(str(Path(config.state_dir) / "control.sock"))
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        reply = json.loads(_read_reply(sock))
    assert reply["ok"] is False and len(json.dumps(reply)) < 1000
    for _ in range(3):  # and the liveness probe still gets its answer
        assert query(config.state_dir, "status")["status"]["resources"][0]["capacity"] == 4


def test_silent_and_crowding_control_clients_delay_nobody(run_manager, make_config):
    """Clients that connect and send nothing, more of them than are served at once: a status query
    is still answered at once, and a silent client gets its error when its time is up."""
    from dpkit.core.engine import control

    config = make_config(cdi_dir="", nfd_features_dir="")
    run_manager(ScriptedVendor(), config)
    path = str(Path(config.state_dir) / "control.sock")
    silent = []
    try:
        for _ in range(control.MAX_CLIENTS + 8):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(10)
            sock.connect(path)
            silent.append(sock)
        started = time.monotonic()
        assert query(config.state_dir, "status", timeout=5)["status"]["resources"][0]["capacity"] == 4
        assert time.monotonic() - started < control.REQUEST_TIMEOUT, "not queued behind the silent ones"
        reply = json.loads(_read_reply(silent[-1]))  # the newest silent one is still served
        assert reply == {"ok": False, "error": f"request not complete within {control.REQUEST_TIMEOUT:g}s"}
        assert _read_reply(silent[0]) == b"", "the oldest was dropped to make room"
    finally:
        for sock in silent:
            sock.close()
    assert query(config.state_dir, "ping")["ok"] is True


def test_query_explains_a_socket_nobody_listens_on(short_tmp):
    """A killed run leaves its control socket: the client says so instead of waiting out its timeout."""
    from dpkit.core.vendorapi.errors import DpkitError

    state = short_tmp / "dead"
    state.mkdir(mode=0o700)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.bind(str(state / "control.sock"))  # bound, never listening: what a killed run leaves
    started = time.monotonic()
    with pytest.raises(DpkitError, match="nothing listens on the control socket"):
        query(state, "ping", timeout=5)
    assert time.monotonic() - started < 1


def test_a_resource_server_that_cannot_start_is_retried(kubelet, run_manager, make_config, plugin_dir):
    """A directory squatting on the socket name fails the bind; once it is gone, the server starts."""
    from dpkit.core.vendorapi.validation import socket_name_for

    plugin_dir.mkdir(parents=True, exist_ok=True)
    squatter = plugin_dir / socket_name_for(RES)
    squatter.mkdir()
    (squatter / "keep").write_text("not ours")
    config = make_config(cdi_dir="", nfd_features_dir="")
    manager = run_manager(ScriptedVendor(), config)
    status = query(config.state_dir)["status"]
    assert status["server_failures"][RES]["attempts"] >= 1
    assert not kubelet.registered(RES)
    (squatter / "keep").unlink()
    squatter.rmdir()
    assert kubelet.wait_for(lambda k: k.allocatable(RES) == 4, 15)
    assert RES not in query(config.state_dir)["status"]["server_failures"]
    assert RES in manager.servers


def test_probe_backoff_starts_over_after_a_healthy_period(monkeypatch) -> None:
    monkeypatch.setenv("PYTHONPATH", str(TESTS))
    supervisor = ProbeSupervisor("ipc:///nonexistent", 5.0, healthy_reset=0.2)
    probe = Probe("p", "scripted_vendor:reporting_probe")
    from dpkit.core.engine.probes import ProbeState

    state = ProbeState(probe, 5.0)
    supervisor.probes = {"p": state}
    state.failures = 6  # six crashes in a row: the next restart would wait 30 s
    state.started = time.monotonic() - 0.5  # and it has now run well for longer than healthy_reset
    supervisor.heartbeat("p")
    assert state.failures == 0
    assert backoff(state.failures + 1) == 1.0 and backoff(7) == 30.0


class LateWatcher(ScriptedVendor):
    """A watcher whose last act, as it is stopped for a reload, reports the old configuration."""

    def watch(self, sink, stop):  # type: ignore[no-untyped-def]
        self.sink = sink
        self.sink_ready.set()
        stop.wait()
        sink.snapshot({RES: (widget(0),)})


def test_a_stopping_watchers_last_snapshot_does_not_undo_a_reload(kubelet, run_manager, make_config):
    vendor = LateWatcher()
    manager = run_manager(vendor, make_config(cdi_dir="", nfd_features_dir=""))
    assert kubelet.wait_for(lambda k: k.capacity(RES) == 4, 10)
    first_sink = vendor.sink
    manager.request_reload()
    assert kubelet.wait_for(lambda k: manager.reloads == 1 and vendor.sink is not first_sink, 10)
    vendor.set_health("w1", Health.UNHEALTHY, "after the reload")  # through the new watcher
    assert kubelet.wait_for(lambda k: k.devices(RES).get("w1") is not None
                            and k.devices(RES)["w1"].health == "Unhealthy", 10), kubelet.devices(RES)
    assert kubelet.capacity(RES) == 4, "the old watcher's stale one-device snapshot replaced the reload's"


EMFILE_CHILD = r"""
import json, logging, os, sys, threading
from pathlib import Path
from dpkit.core.engine.control import ControlServer
refused, died = threading.Event(), threading.Event()
class Seen(logging.Handler):
    def emit(self, record):
        text = record.getMessage()
        if "cannot accept a connection" in text:
            refused.set()
        if "control socket failed" in text:
            died.set()
logging.getLogger("dpkit").addHandler(Seen())
path = Path(sys.argv[1])
server = ControlServer.bind(path, lambda: {"ok": True}, lambda: "")
server.start()
fillers = []
try:
    while True:
        fillers.append(os.open("/dev/null", os.O_RDONLY))  # every descriptor taken: accept() gets EMFILE
except OSError:
    pass
print("full", flush=True)
sys.stdin.readline()  # the test has connected
print("refused" if refused.wait(10) else "never refused", flush=True)
for fd in fillers:
    os.close(fd)  # the descriptors come back
sys.stdin.readline()
server.stop()
print("died" if died.is_set() else "served on", flush=True)
"""


def test_control_socket_survives_running_out_of_file_descriptors(short_tmp):
    """accept() failing with EMFILE is logged and retried, not the end of the control thread (whose
    death would fail every liveness probe from then on)."""
    import subprocess
    import sys

    state = short_tmp / "emfile"
    state.mkdir(mode=0o700)
    child = subprocess.Popen([sys.executable, "-c", EMFILE_CHILD, str(state / "control.sock")],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "full"
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as early:
            early.settimeout(10)
            early.connect(str(state / "control.sock"))  # queued in the backlog: accept() cannot take it yet
            early.sendall(b'{"cmd": "ping"}\n')
            child.stdin.write("connected\n")
            child.stdin.flush()
            assert child.stdout.readline().strip() == "refused"
            assert json.loads(_read_reply(early)) == {"ok": True}, "taken once descriptors were free again"
        assert query(state, "ping", timeout=5)["ok"] is True
        child.stdin.write("stop\n")
        child.stdin.flush()
        out, err = child.communicate(timeout=20)
    finally:
        if child.poll() is None:
            child.kill()
            child.communicate(timeout=10)
    assert child.returncode == 0, err
    assert out.strip() == "served on"
