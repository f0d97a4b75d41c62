"""The DaemonSet's liveness command, run for real against a running plugin, a gone one and a hung one."""

from __future__ import annotations

import shutil
import socket
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from deploy.manifests import CONFIG, liveness_probe, overlay_config
from dpkit.core.engine.manager import Manager
from dpkit.core.support.config import Config
from dpkit.core.tools.kubelet import Kubelet
from dpkit.core.tools.sim import SimulatedVendor

pytestmark = pytest.mark.timeout(60)
Probe = Callable[[str], subprocess.CompletedProcess[str]]


@pytest.fixture
def probe(short_tmp: Path) -> Probe:
    """``probe(state_dir)`` runs the sfc overlay's liveness command on its config, moved to ``state_dir``."""
    command = liveness_probe("sfc")["exec"]["command"]
    if shutil.which(command[0]) is None:
        pytest.skip(f"{command[0]} is not on PATH (the test env installs core as a workspace member)")
    config = yaml.safe_load(overlay_config("sfc"))
    config_path = short_tmp / "config.yaml"
    assert CONFIG in command, "the probe reads the mounted config file"
    argv = [str(config_path) if arg == CONFIG else arg for arg in command]

    def run(state_dir: str) -> subprocess.CompletedProcess[str]:
        config_path.write_text(yaml.safe_dump({**config, "state_dir": state_dir}))
        return subprocess.run(argv, capture_output=True, text=True, timeout=30)

    return run


def test_probe_passes_while_the_plugin_answers_and_fails_once_it_is_gone(
        probe: Probe, kubelet: Kubelet, run_manager: Callable[..., Manager],
        make_config: Callable[..., Config]) -> None:
    state_dir = make_config().state_dir
    manager = run_manager(SimulatedVendor({}))
    alive = probe(state_dir)
    assert alive.returncode == 0, alive.stderr
    assert alive.stdout.startswith("vendor sim")
    manager.stop()
    gone = probe(state_dir)
    assert gone.returncode != 0
    assert "no control socket" in gone.stderr


def test_probe_fails_by_itself_when_the_plugin_hangs(probe: Probe, short_tmp: Path) -> None:
    """A control socket that takes the request and never answers."""
    state = short_tmp / "hung"
    state.mkdir()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.bind(str(state / "control.sock"))
        sock.listen(4)  # connections wait in the backlog: accepted by nobody, answered by nobody
        hung = probe(str(state))
    assert hung.returncode != 0
    assert "did not answer" in hung.stderr


def test_probe_timeout_outlasts_the_status_query() -> None:
    spec = liveness_probe("sfc")
    assert "--timeout" not in spec["exec"]["command"], "dpkit status then waits its default 3 s"
    assert spec["timeoutSeconds"] > 3
