"""MPS sharing end to end: ``dpkit mps-control-daemon`` against the fake NVML and a fake control
binary (a script that records what it is fed), and the plugin serving the replicas over real sockets.

No GPU here: two CUDA processes through a real MPS daemon are not run (see docs/hardware-runs.md).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest
import yaml
from fakenvml import FakeNode, gpu_uuid

from dpkit.nvidia import mps
from dpkit.nvidia.mps_daemon import main
from dpkit.nvidia.vendor import NvidiaVendor

SHARED = "nvidia.com/gpu.shared"
WAIT = 20.0

FAKE_CONTROL = """#!{python}
# fake nvidia-cuda-mps-control: records '-d' with its directories, and each command fed on stdin
import os, sys
with open({log!r}, "a") as f:
    if sys.argv[1:] == ["-d"]:
        f.write("start " + os.environ["CUDA_MPS_PIPE_DIRECTORY"] + " " + os.environ["CUDA_MPS_LOG_DIRECTORY"] + "\\n")
    else:
        f.write(sys.stdin.read().strip() + "\\n")
if os.path.exists({fail!r}):
    print("cannot reach the MPS control daemon", file=sys.stderr)
    sys.exit(1)
print("25")
"""


class Control:
    """The fake control binary and what it recorded."""

    def __init__(self, where: Path) -> None:
        self.path = where / "nvidia-cuda-mps-control"
        self.log = where / "control.log"
        self.fail = where / "fail"
        self.path.write_text(FAKE_CONTROL.format(python=sys.executable, log=str(self.log), fail=str(self.fail)))
        self.path.chmod(0o755)

    def lines(self) -> list[str]:
        return self.log.read_text().splitlines() if self.log.exists() else []


def mps_document(root: Path, replicas: int = 4) -> dict[str, object]:
    return {"flags": {"mpsRoot": str(root)},
            "sharing": {"mps": {"renameByDefault": True,
                                "resources": [{"name": "nvidia.com/gpu", "replicas": replicas}]}}}


def write_config(path: Path, vendor: dict[str, object]) -> Path:
    path.write_text(yaml.safe_dump({"log_format": "human", "vendor": vendor}))
    return path


def wait_until(predicate, timeout: float = WAIT) -> bool:
    done = threading.Event()
    deadline = threading.Timer(timeout, done.set)
    deadline.start()
    try:
        while not done.is_set():
            if predicate():
                return True
            done.wait(0.05)
        return predicate()
    finally:
        deadline.cancel()


def compute_modes(host) -> list[str]:
    path = Path(f"{host.description}.compute")
    return path.read_text().splitlines() if path.exists() else []


def test_main_configures_one_daemon_per_resource_and_restores_on_sigterm(host, short_tmp):
    host.apply(FakeNode.with_gpus(2))
    root = short_tmp / "mps"
    control = Control(short_tmp)
    config = write_config(short_tmp / "dpkit.yaml", host.vendor_config(document=mps_document(root)))
    ready = root / SHARED / mps.READY
    seen: dict[str, object] = {}

    def drive() -> None:  # in a thread: main owns the main thread and its signal handlers
        seen["ready"] = wait_until(ready.exists)
        seen["lines"] = control.lines()
        seen["modes"] = compute_modes(host)
        seen["health"] = mps.daemon_problem(str(root), SHARED)
        os.kill(os.getpid(), signal.SIGTERM)  # also when not ready, so the test cannot hang

    helper = threading.Thread(target=drive)
    helper.start()
    rc = main(["-c", str(config), "--root", str(root), "--control", str(control.path), "--interval", "0.1"])
    helper.join(WAIT)
    assert rc == 0 and seen["ready"] is True
    pipe, logs = root / SHARED / "pipe", root / SHARED / "log"
    lines = seen["lines"]
    assert lines[:4] == [f"start {pipe} {logs}",
                         "set_default_device_pinned_mem_limit 0 20480M",  # 80 GiB / 4 replicas
                         "set_default_device_pinned_mem_limit 1 20480M",
                         "set_default_active_thread_percentage 25"]  # 100 / 4 replicas
    assert seen["modes"] == [f"{gpu_uuid(0)} 3", f"{gpu_uuid(1)} 3"], "EXCLUSIVE_PROCESS before the daemon starts"
    assert seen["health"] == ""
    assert control.lines()[-1] == "quit"
    assert compute_modes(host)[-2:] == [f"{gpu_uuid(0)} 0", f"{gpu_uuid(1)} 0"], "DEFAULT again after SIGTERM"
    assert not ready.exists() and not logs.exists()
    assert "get_default_active_thread_percentage" in control.lines(), "health is checked"


def test_main_without_mps_sharing_runs_no_daemon(host, short_tmp):
    host.apply(FakeNode.with_gpus(1))
    control = Control(short_tmp)
    config = write_config(short_tmp / "dpkit.yaml", host.vendor_config())
    threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGTERM)).start()
    assert main(["-c", str(config), "--root", str(short_tmp / "mps"), "--control", str(control.path)]) == 0
    assert control.lines() == []


def test_main_rejects_a_bad_config_with_status_2(short_tmp, capsys):
    bad = write_config(short_tmp / "dpkit.yaml", {"config": {"sharing": {"mps": {
        "resources": [{"name": "gpu", "replicas": 2}]}}}})
    assert main(["-c", str(bad)]) == 2
    assert "using MPS requires mpsRoot" in capsys.readouterr().err


def dpkit_command() -> str:
    found = shutil.which("dpkit", path=str(Path(sys.executable).parent)) or shutil.which("dpkit")
    if found is None:
        pytest.skip("the dpkit command is not installed in this environment")
    return found


def test_plugin_serves_mps_replicas_only_while_the_daemon_is_healthy(host, kubelet, run_manager, short_tmp):
    host.apply(FakeNode.with_gpus(2))
    root = short_tmp / "mps"
    control = Control(short_tmp)
    vendor_config = host.vendor_config(document=mps_document(root), mps_container_root=str(root))
    config = write_config(short_tmp / "dpkit.yaml", vendor_config)
    manager = run_manager(NvidiaVendor(vendor_config, environ={}))
    assert kubelet.wait_for(lambda k: len(k.devices(SHARED)) == 8, 10)
    assert kubelet.allocatable(SHARED) == 0, "no daemon yet: replicas are advertised Unhealthy"
    reasons = {d["reason"] for r in manager.status()["resources"] if r["name"] == SHARED for d in r["devices"]}
    assert any("is not ready" in r for r in reasons)

    daemon = subprocess.Popen([dpkit_command(), "mps-control-daemon", "-c", str(config), "--root", str(root),
                               "--control", str(control.path), "--interval", "0.1"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        assert kubelet.wait_for(lambda k: k.allocatable(SHARED) == 8, WAIT)
        chosen, r = kubelet.allocate(SHARED, 1, pod="a")
        assert r.envs["NVIDIA_VISIBLE_DEVICES"] == chosen[0].split("::")[0]
        assert r.envs["CUDA_MPS_PIPE_DIRECTORY"] == "/mps/nvidia.com/gpu.shared/pipe"
        mounts = {m.container_path: (m.host_path, m.read_only) for m in r.mounts}
        assert mounts == {"/mps/nvidia.com/gpu.shared/pipe": (str(root / SHARED / "pipe"), False),
                          "/dev/shm": (str(root / "shm"), False)}
        with pytest.raises(grpc.RpcError) as err:
            kubelet.allocate(SHARED, 2, pod="b")
        assert err.value.details() == ('invalid allocation request for "nvidia.com/gpu.shared": invalid request: '
                                       "maximum request size for shared resources is 1; found 2")  # NVIDIA's text
        assert err.value.code() == grpc.StatusCode.UNKNOWN  # what a Go plugin's plain error is

        control.fail.touch()  # the daemon stops answering
        assert kubelet.wait_for(lambda k: k.allocatable(SHARED) == 0, WAIT)
        reasons = {d["reason"] for r in manager.status()["resources"] if r["name"] == SHARED for d in r["devices"]}
        assert any("unhealthy" in r and "cannot reach the MPS control daemon" in r for r in reasons)
        control.fail.unlink()  # it is restarted and answers again
        assert kubelet.wait_for(lambda k: k.allocatable(SHARED) == 8, WAIT)
    finally:
        daemon.send_signal(signal.SIGTERM)
        rc = daemon.wait(WAIT)
    assert rc == 0, daemon.stderr.read() if daemon.stderr else ""
    assert kubelet.wait_for(lambda k: k.allocatable(SHARED) == 0, WAIT), "a stopped daemon takes its replicas along"
    assert control.lines()[-1] == "quit"


def test_stale_daemon_report_makes_replicas_unhealthy(short_tmp):
    root = short_tmp / "mps"
    (root / SHARED).mkdir(parents=True)
    (root / SHARED / mps.READY).touch()
    mps.write_health(str(root), SHARED, True)
    assert mps.daemon_problem(str(root), SHARED) == ""
    later = mps.STALE_AFTER + 5
    assert "silent for" in mps.daemon_problem(str(root), SHARED, now=time.time() + later)
