"""Shared parts of the process benchmarks: a real `dpkit run simbench`, the kubelet process, /proc figures.

Everything lives in one short temp dir under /tmp (unix socket paths are limited to 107 bytes)
and is removed afterwards.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import IO, Any

import yaml
from sidechannel import device_ids

BENCH_DIR = Path(__file__).resolve().parent
RESOURCE = "example.com/bench"
# Above this the devices are generated inside the bench vendor: the core refuses devices files over
# 1 MiB or 250k YAML values (issue 12), and 100k devices take about 3 MiB.
FILE_MAX_DEVICES = 20000


def pct(samples: list[float], q: float) -> float:
    """The q-quantile (nearest rank) of samples."""
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def write_devices(path: Path, count: int) -> None:
    """A sim devices file of ``count`` devices in block style, as an operator would write it."""
    lines = ["resources:", f"  {RESOURCE}:" + ("" if count else " []")]
    for i, device_id in enumerate(device_ids(count)):
        lines.append(f"  - id: {device_id}\n    numa: {i % 2}")
    path.write_text("\n".join(lines) + "\n")


def vendor_site(tmp: Path) -> Path:
    """A directory holding a ``.dist-info`` that registers ``simbench`` as a ``dpkit.vendors`` entry point.

    Put on PYTHONPATH (with bench/ for the module), it makes ``dpkit run simbench`` load
    :class:`benchvendor.SideChannelSim` the way a vendor package is loaded.
    """
    site = tmp / "site"
    info = site / "dpkit_benchvendor-0.dist-info"
    info.mkdir(parents=True, exist_ok=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: dpkit-benchvendor\nVersion: 0\n")
    (info / "entry_points.txt").write_text("[dpkit.vendors]\nsimbench = benchvendor:SideChannelSim\n")
    return site


def bench_env(tmp: Path) -> dict[str, str]:
    paths = [str(vendor_site(tmp)), str(BENCH_DIR), *filter(None, [os.environ.get("PYTHONPATH")])]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}


def proc_cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def wait_path(path: Path, timeout: float, proc: subprocess.Popen[Any] | None = None) -> None:
    """Wait for a socket file a child creates; fail early if the child died."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process {proc.args!r} exited with {proc.returncode} before creating {path}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} did not appear within {timeout:g} s")
        time.sleep(0.01)


def stop_process(proc: subprocess.Popen[Any], timeout: float = 20.0) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


class KubeletProcess:
    """Drives ``kubelet_proc.py``: start it, then ask when a resource is registered with its full list."""

    def __init__(self, plugin_dir: Path, pod_resources_socket: Path, env: dict[str, str]) -> None:
        self.proc = subprocess.Popen([sys.executable, str(BENCH_DIR / "kubelet_proc.py"), str(plugin_dir),
                                      str(pod_resources_socket)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, env=env)
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.stdin: IO[str] = self.proc.stdin
        self.stdout: IO[str] = self.proc.stdout
        if self.stdout.readline().strip() != "ready":
            raise RuntimeError("kubelet emulator process did not start")

    def wait_registered(self, resource: str, count: int, timeout: float,
                        server: subprocess.Popen[Any] | None = None) -> float:
        """``time.monotonic()`` when the kubelet held ``count`` devices of ``resource``.

        Asks in 1 s steps so a ``server`` process that exits is noticed at once; the time comes
        from the kubelet process, so the steps do not coarsen it.
        """
        deadline = time.monotonic() + timeout
        while True:
            self.stdin.write(f"wait {resource} {count} {min(1.0, timeout)}\n")
            self.stdin.flush()
            answer = self.stdout.readline().split()
            if answer and answer[0] == "ok":
                return float(answer[1])
            if server is not None and server.poll() is not None:
                raise RuntimeError(f"{server.args!r} exited with {server.returncode} before registering")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{resource} not registered with {count} devices within {timeout:g} s")

    def stop(self) -> None:
        self.stdin.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        self.stdout.close()


class DpkitProcess:
    """A real ``dpkit run simbench`` process (the CLI, config file, observers, signal handling)."""

    def __init__(self, tmp: Path, count: int, env: dict[str, str], *, pod_resources_socket: Path,
                 generate: bool | None = None) -> None:
        self.tmp = tmp
        self.count = count
        self.generated = count > FILE_MAX_DEVICES if generate is None else generate
        self.devices = tmp / "devices.yaml"
        self.control = tmp / "bench-control.sock"
        self.state_dir = tmp / "st"
        self.plugin_dir = tmp / "dp"
        self.socket = self.plugin_dir / f"dpkit-{RESOURCE.replace('/', '_')}.sock"
        write_devices(self.devices, 0 if self.generated else count)
        vendor: dict[str, Any] = {"devices_file": str(self.devices), "script": False, "control": str(self.control)}
        if self.generated:
            vendor["generate"] = {RESOURCE: count}
        self.config = tmp / "config.yaml"
        self.config.write_text(yaml.safe_dump({
            "plugin_dir": str(self.plugin_dir), "state_dir": str(self.state_dir), "cdi_dir": str(tmp / "cdi"),
            "nfd_features_dir": str(tmp / "nfd"), "pod_resources_socket": str(pod_resources_socket),
            "vendor": vendor,
        }))
        self.log_path = tmp / "dpkit.log"
        self.env = env
        self.proc: subprocess.Popen[bytes] | None = None
        self.started = 0.0

    def start(self) -> DpkitProcess:
        with self.log_path.open("wb") as log:
            self.started = time.monotonic()
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "dpkit.core.tools.cli", "run", "simbench", "-c", str(self.config)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=self.env)
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def wait_control(self, timeout: float) -> None:
        """The side channel is up once the vendor's watch thread runs."""
        assert self.proc is not None
        try:
            wait_path(self.control, timeout, self.proc)
        except (RuntimeError, TimeoutError) as exc:
            raise RuntimeError(f"{exc}\n--- dpkit log tail ---\n{self.log_tail()}") from None

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)
