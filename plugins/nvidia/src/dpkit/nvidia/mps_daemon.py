"""``dpkit mps-control-daemon``: the MPS control daemons for ``sharing.mps``, one per shared resource.

Runs as the second container of the nvidia DaemonSet pod, reading the same config as the
plugin, as NVIDIA's ``mps-control-daemon`` does. For each resource shared through MPS it puts
the resource's GPUs in EXCLUSIVE_PROCESS compute mode (NVML), starts
``nvidia-cuda-mps-control -d`` with its pipe and log directories under ``--root``, sets each
GPU's pinned-memory limit (memory / replicas) and the active-thread percentage (100 /
replicas), and writes ``.ready``. Every ``--interval`` seconds it asks the daemon
``get_default_active_thread_percentage`` and records the answer in ``health.json``, which the
plugin turns into device health; a daemon that stops answering is restarted. SIGTERM/SIGINT
quit the daemons and restore the DEFAULT compute mode; SIGHUP re-reads the config.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import FrameType
from typing import Any

import pynvml

from dpkit.core import DpkitError, get_logger, kv, load_config, setup_logging
from dpkit.nvidia import inventory, mps, nvml
from dpkit.nvidia.config import MPS_CONTAINER_ROOT, Settings, load_settings
from dpkit.nvidia.gpus import NodeReader
from dpkit.nvidia.guard import Guard

log = get_logger("nvidia.mps")

CONTROL_BINARY = "nvidia-cuda-mps-control"
COMMAND_TIMEOUT = 10.0  # seconds for one control command; a wedged daemon must not stall the loop
EXCLUSIVE_PROCESS = 3  # NVML_COMPUTEMODE_EXCLUSIVE_PROCESS
DEFAULT_MODE = 0  # NVML_COMPUTEMODE_DEFAULT


class MpsError(DpkitError):
    """A control command failed or a daemon could not be started."""


def find_control_binary(driver_root: str, explicit: str = "") -> str:
    """The control binary: ``explicit``, else under the driver root, else on PATH."""
    if explicit:
        return explicit
    for directory in ("usr/bin", "usr/local/bin", "bin"):
        candidate = Path(driver_root) / directory / CONTROL_BINARY
        if candidate.is_file():
            return str(candidate)
    return shutil.which(CONTROL_BINARY) or CONTROL_BINARY


class Daemon:
    """One resource's control daemon."""

    def __init__(self, resource: str, gpus: Sequence[mps.GpuShare], root: str, control: str) -> None:
        self.resource = resource
        self.gpus = list(gpus)
        self.root = root
        self.control = control
        self.base = mps.resource_dir(root, resource)
        self.env = {**os.environ, **mps.daemon_env(root, resource)}
        self.started = False

    def command(self, text: str) -> str:
        """Send one command on the control binary's stdin, as NVIDIA's daemon does; its answer."""
        try:
            done = subprocess.run([self.control], input=text, env=self.env, capture_output=True, text=True,
                                  timeout=COMMAND_TIMEOUT, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise MpsError(f"{self.control}: {text!r}: {exc}") from exc
        if done.returncode != 0:
            detail = (done.stderr or done.stdout).strip()[:200] or f"exit status {done.returncode}"
            raise MpsError(f"{self.control}: {text!r} failed: {detail}")
        return done.stdout.strip()

    def start(self, set_mode: Any) -> None:
        """Compute mode, directories, the daemon, its limits, then ``.ready``."""
        for gpu in self.gpus:
            set_mode(gpu.uuid, EXCLUSIVE_PROCESS)
        for part in (mps.PIPE, mps.LOG):
            (self.base / part).mkdir(parents=True, exist_ok=True, mode=0o755)
        log.info("starting MPS control daemon", extra=kv(resource=self.resource, pipe=str(self.base / mps.PIPE)))
        try:
            done = subprocess.run([self.control, "-d"], env=self.env, capture_output=True, text=True,
                                  timeout=COMMAND_TIMEOUT, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise MpsError(f"cannot start {self.control} -d: {exc}") from exc
        if done.returncode != 0:
            raise MpsError(f"{self.control} -d failed: {(done.stderr or done.stdout).strip()[:200]}")
        self.started = True
        for index, limit in mps.pinned_memory_limits(self.gpus).items():
            self.command(f"set_default_device_pinned_mem_limit {index} {limit}")
        percentage = mps.active_thread_percentage(self.gpus)
        if percentage:
            self.command(f"set_default_active_thread_percentage {percentage}")
        (self.base / mps.READY).touch()
        mps.write_health(self.root, self.resource, True)
        log.info("MPS control daemon ready", extra=kv(resource=self.resource, gpus=len(self.gpus),
                                                      thread_percentage=percentage))

    def check(self) -> str:
        """Ask the daemon a question; record and return what is wrong ("" when it answers)."""
        try:
            self.command("get_default_active_thread_percentage")
            problem = ""
        except MpsError as exc:
            problem = f"{exc}{self._last_log_line()}"
        mps.write_health(self.root, self.resource, not problem, problem)
        return problem

    def _last_log_line(self) -> str:
        try:
            lines = (self.base / mps.LOG / "control.log").read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return f"; control.log: {lines[-1][:200]}" if lines else ""

    def stop(self, set_mode: Any) -> None:
        """``quit``, DEFAULT compute mode, and no ``.ready`` left behind for the plugin to trust."""
        (self.base / mps.READY).unlink(missing_ok=True)
        if self.started:
            try:
                self.command("quit")
            except MpsError as exc:
                log.warning("MPS control daemon did not quit cleanly", extra=kv(resource=self.resource, error=str(exc)))
            self.started = False
        for gpu in self.gpus:
            try:
                set_mode(gpu.uuid, DEFAULT_MODE)
            except Exception as exc:  # one GPU must not keep the others in exclusive mode
                log.warning("cannot restore the DEFAULT compute mode", extra=kv(gpu=gpu.uuid, error=str(exc)))
        (self.base / mps.HEALTH).unlink(missing_ok=True)
        shutil.rmtree(self.base / mps.LOG, ignore_errors=True)
        log.info("MPS control daemon stopped", extra=kv(resource=self.resource))


def shared_resources(settings: Settings, reader: NodeReader) -> dict[str, list[mps.GpuShare]]:
    """resource -> its GPUs, for every resource shared through MPS."""
    node = reader.read(topology=False)
    built = inventory.build(settings, node)
    out = {}
    for resource, devices in built.snapshot.items():
        gpus = mps.shares([d for d in devices if "mig_profile" not in d.attributes])
        if gpus:
            out[resource] = gpus
    return out


class Runner:
    """Starts, watches and stops the daemons of one configuration."""

    def __init__(self, settings: Settings, root: str, control: str) -> None:
        self.settings = settings
        self.root = root
        self.control = control
        self.reader = NodeReader(nvml.library_path(settings.nvml_library, settings.driver_root),
                                 settings.sysfs_root, Guard(settings.nvml_timeout))
        self.daemons: list[Daemon] = []

    def set_mode(self, gpu_uuid: str, mode: int) -> None:
        self.reader.guard.call("compute-mode", _set_compute_mode, gpu_uuid, mode)

    def start(self) -> None:
        """Start every daemon not running; a failure is recorded in its health file and retried later."""
        if not self.daemons:
            if not self.settings.mps:
                log.info("sharing strategy is not MPS; no MPS control daemon to run",
                         extra=kv(strategy=self.settings.sharing_strategy))
                return
            try:
                found = shared_resources(self.settings, self.reader)
            except (DpkitError, nvml.NVMLError) as exc:
                log.error("cannot read the GPUs to share through MPS; retrying", extra=kv(error=str(exc)))
                return
            self.daemons = [Daemon(r, g, self.root, self.control) for r, g in found.items()]
            if not self.daemons:
                log.info("no GPU is shared through MPS on this node")
        for daemon in self.daemons:
            if daemon.started:
                continue
            try:
                daemon.start(self.set_mode)
            except Exception as exc:  # NVML or the control binary: reported to the plugin, retried
                log.error("MPS control daemon failed to start; retrying", extra=kv(resource=daemon.resource,
                                                                                   error=str(exc)))
                daemon.stop(self.set_mode)
                daemon.base.mkdir(parents=True, exist_ok=True)
                mps.write_health(self.root, daemon.resource, False, f"failed to start: {exc}")

    def check(self) -> None:
        """Health of every running daemon; one that stops answering is restarted on the next round."""
        for daemon in self.daemons:
            if not daemon.started:
                continue
            problem = daemon.check()
            if problem:
                log.warning("MPS control daemon unhealthy; restarting it", extra=kv(resource=daemon.resource,
                                                                                     error=problem))
                daemon.stop(self.set_mode)
                daemon.base.mkdir(parents=True, exist_ok=True)
                mps.write_health(self.root, daemon.resource, False, problem)

    def stop(self) -> None:
        for daemon in self.daemons:
            daemon.stop(self.set_mode)
        self.daemons = []
        self.reader.close()


def _set_compute_mode(gpu_uuid: str, mode: int) -> None:
    pynvml.nvmlDeviceSetComputeMode(pynvml.nvmlDeviceGetHandleByUUID(gpu_uuid), mode)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dpkit mps-control-daemon",
        description="Run the MPS control daemons for NVIDIA's sharing.mps (docs/nvidia.md)")
    parser.add_argument("-c", "--config", help="dpkit config file (its vendor: section is the nvidia one)")
    parser.add_argument("--root", default=MPS_CONTAINER_ROOT,
                        help="the host's mpsRoot as mounted in this container (default: /mps)")
    parser.add_argument("--control", default="", help=f"the {CONTROL_BINARY} binary (default: found under "
                                                      "nvidiaDriverRoot, then on PATH)")
    parser.add_argument("--interval", type=float, default=5.0, help="seconds between health checks (default: 5)")
    return parser


def _load(path: str | None, environ: Mapping[str, str]) -> tuple[Settings, str]:
    config = load_config(path, environ)
    setup_logging(config.log_format, config.log_level)
    return load_settings(config.vendor, environ), config.source


def main(argv: list[str]) -> int:
    """Entry point of ``dpkit mps-control-daemon`` (group ``dpkit.commands``); returns the exit status."""
    args = _parser().parse_args(argv)
    if args.interval <= 0:
        print("dpkit mps-control-daemon: error: --interval must be positive", file=sys.stderr)
        return 2
    stop, reload = threading.Event(), threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        (reload if signum == signal.SIGHUP else stop).set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    runner: Runner | None = None
    try:
        try:
            settings, _ = _load(args.config, os.environ)
        except DpkitError as exc:
            print(f"dpkit mps-control-daemon: error: {exc}", file=sys.stderr)
            return 2
        runner = Runner(settings, args.root, find_control_binary(settings.driver_root, args.control))
        runner.start()
        while not stop.is_set():
            if reload.is_set():
                reload.clear()
                log.info("SIGHUP: re-reading the config and restarting the MPS control daemons")
                try:
                    settings, _ = _load(args.config, os.environ)
                except DpkitError as exc:
                    log.error("config rejected; keeping the running daemons", extra=kv(error=str(exc)))
                else:
                    runner.stop()
                    runner = Runner(settings, args.root, find_control_binary(settings.driver_root, args.control))
            runner.start()
            runner.check()
            stop.wait(args.interval)
        return 0
    finally:
        if runner is not None:
            runner.stop()
        for signum, handler in previous.items():
            signal.signal(signum, handler)
