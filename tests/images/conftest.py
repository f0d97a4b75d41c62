"""Fixtures for the image checks: the build script as a module, and per-vendor wheelhouses."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[2]


def load_script(name: str) -> ModuleType:
    """images/<name>.py as a module (images/ is a folder of scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(f"dpkit_images_{name}", ROOT / "images" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def build_script() -> ModuleType:
    return load_script("build")


@pytest.fixture(scope="session")
def wheelhouse(build_script: ModuleType, tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """``wheelhouse(vendor)``: the wheels images/build.py would put in that vendor's image, built once."""
    made: dict[str, Path] = {}

    def get(vendor: str) -> Path:
        if vendor not in made:
            wheels = tmp_path_factory.mktemp(f"wheels-{vendor}")
            cmd = build_script.wheel_command(build_script.vendor_image(vendor), wheels)
            result = subprocess.run([*cmd, "-q"], capture_output=True, text=True, timeout=300)
            assert result.returncode == 0, f"pip wheel failed for {vendor}:\n{result.stdout}\n{result.stderr}"
            made[vendor] = wheels
        return made[vendor]

    return get
