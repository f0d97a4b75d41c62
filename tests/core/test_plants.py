"""What someone else plants in the shared directories never turns dpkit against the node, nor stops it.

plugin_dir is shared by every device plugin of the node and state_dir may be a shared tmpfs:
each plant below is put there before a real Manager starts against a real kubelet emulator.
"""

from __future__ import annotations

import os
import socket
import stat
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from scripted_vendor import RES, ScriptedVendor

from dpkit.core.engine.control import query
from dpkit.core.engine.manager import Manager
from dpkit.core.tools import cli
from dpkit.core.tools.kubelet import Kubelet

pytestmark = pytest.mark.timeout(60)
NOBODY = 65534


def stale_socket(path: Path) -> Path:
    """A unix socket file nobody listens on, like the one a killed run leaves."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    sock.close()
    return path


@pytest.fixture
def precious(short_tmp: Path) -> Iterator[Path]:
    """A directory of files (and a socket) that must survive whatever dpkit does."""
    target = short_tmp / "precious"
    target.mkdir()
    (target / "data").write_text("keep me\n")
    (target / "sub").mkdir()
    stale_socket(target / "s.sock")
    yield target
    assert sorted(p.name for p in target.iterdir()) == ["data", "s.sock", "sub"]
    assert (target / "data").read_text() == "keep me\n"


def serves(kubelet: Kubelet) -> bool:
    return kubelet.wait_for(lambda k: k.allocatable(RES) == 4, 10)


def test_bind_dir_name_as_a_symlink_to_a_full_directory(kubelet, run_manager, plugin_dir, precious):
    plugin_dir.mkdir(exist_ok=True)  # the kubelet made it
    (plugin_dir / ".dpkit-bind-evil").symlink_to(precious)
    run_manager(ScriptedVendor())
    assert serves(kubelet)
    assert (plugin_dir / ".dpkit-bind-evil").is_symlink(), "not ours: left where it is"


def test_bind_dir_name_as_a_file_or_a_directory(kubelet, run_manager, plugin_dir):
    plugin_dir.mkdir(exist_ok=True)  # the kubelet made it
    (plugin_dir / ".dpkit-bind-file").write_text("x")
    full = plugin_dir / ".dpkit-bind-dir"
    (full / "nested").mkdir(parents=True)
    (full / "data").write_text("x")
    foreign = plugin_dir / ".dpkit-bind-foreign"
    foreign.mkdir()
    stale_socket(foreign / "s.sock")
    os.chown(foreign / "s.sock", NOBODY, NOBODY)
    os.chown(foreign, NOBODY, NOBODY)
    run_manager(ScriptedVendor())
    assert serves(kubelet)
    assert (plugin_dir / ".dpkit-bind-file").read_text() == "x"
    assert sorted(p.name for p in full.iterdir()) == ["data", "nested"], "never recursing"
    assert (foreign / "s.sock").exists(), "another user's socket is not ours to remove"


def test_a_killed_runs_leftovers_are_still_cleaned(kubelet, run_manager, plugin_dir, precious):
    plugin_dir.mkdir(exist_ok=True)  # the kubelet made it
    leftover = plugin_dir / ".dpkit-bind-k1ll3d"
    leftover.mkdir(mode=0o700)
    stale_socket(leftover / "s.sock")
    old = stale_socket(plugin_dir / "dpkit-example.com_gone.sock")
    (plugin_dir / "dpkit-link.sock").symlink_to(precious / "s.sock")
    (plugin_dir / "dpkit-file.sock").write_text("x")
    run_manager(ScriptedVendor())
    assert serves(kubelet)
    assert not leftover.exists() and not old.exists()
    assert (plugin_dir / "dpkit-link.sock").is_symlink() and (plugin_dir / "dpkit-file.sock").read_text() == "x"


def test_shared_state_dir_keeps_its_mode_and_dpkit_uses_its_own_subdirectory(
        kubelet: Kubelet, run_manager: Callable[..., Manager], short_tmp: Path) -> None:
    shared = short_tmp / "shared"
    shared.mkdir()
    shared.chmod(0o1777)
    run_manager(ScriptedVendor(), state_dir=str(shared))
    assert stat.S_IMODE(shared.stat().st_mode) == 0o1777
    own = shared / f"dpkit-{os.geteuid()}"
    assert stat.S_IMODE(own.lstat().st_mode) == 0o700
    st = (own / "control.sock").lstat()
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
    assert not (shared / "control.sock").exists()
    assert query(shared)["status"]["vendor"] == "scripted", "the client finds the socket from state_dir alone"
    assert cli.main(["status", "--state-dir", str(shared)]) == 0


def test_state_dir_subdirectory_name_planted_first(
        kubelet: Kubelet, run_manager: Callable[..., Manager], short_tmp: Path, precious: Path) -> None:
    shared = short_tmp / "shared"
    shared.mkdir()
    shared.chmod(0o1777)
    planted = shared / f"dpkit-{os.geteuid()}"
    planted.symlink_to(precious)
    run_manager(ScriptedVendor(), state_dir=str(shared))
    assert serves(kubelet)
    [own] = shared.glob(f"dpkit-{os.geteuid()}.*")
    assert stat.S_IMODE(own.lstat().st_mode) == 0o700 and (own / "control.sock").exists()
    assert query(shared)["status"]["vendor"] == "scripted"
    assert planted.is_symlink()


def test_own_state_dir_is_used_as_it_is(kubelet, run_manager, short_tmp):
    state = short_tmp / "state"
    state.mkdir()
    state.chmod(0o755)
    run_manager(ScriptedVendor(), state_dir=str(state))
    assert stat.S_IMODE(state.stat().st_mode) == 0o755, "never re-permissioned"
    assert stat.S_IMODE((state / "control.sock").lstat().st_mode) == 0o600
    assert not list(state.glob(".dpkit-bind-*")), "the staging directory is gone"
    assert query(state)["status"]["vendor"] == "scripted"
