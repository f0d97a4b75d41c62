"""images/local_base.py fails with a reason, and reuses a finished tree instead of debootstrapping again."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from images.conftest import load_script

ROOT = Path(__file__).resolve().parents[2]


def test_a_missing_engine_is_reported_not_raised(tmp_path: Path) -> None:
    empty = tmp_path / "bin"
    empty.mkdir()
    result = subprocess.run([sys.executable, str(ROOT / "images" / "local_base.py"), "--engine", "podman",
                             "--cache", str(tmp_path / "cache")],
                            capture_output=True, text=True, env={**os.environ, "PATH": str(empty)}, timeout=60)
    assert result.returncode == 1
    assert result.stderr.startswith("images/local_base.py: error: cannot run podman:")
    assert not (tmp_path / "cache").exists(), "nothing is debootstrapped before the engine answers"


def test_a_finished_tree_is_reused(tmp_path: Path) -> None:
    local_base = load_script("local_base")
    (tmp_path / "rootfs").mkdir()
    (tmp_path / ".complete").write_text("bookworm\n")
    assert local_base.rootfs(tmp_path) == tmp_path / "rootfs"
