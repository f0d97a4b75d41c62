"""``dpkit new-vendor`` in a small checkout: it adds files and edits none, and the lint finds the new package.

The slow end-to-end version (a fresh clone, the new vendor's tests, deploy checks, lint and image
dry run) is tests/ops/test_first_hour.py; this one runs in well under a second.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

from dpkit.core.tools.scaffold import scaffold
from dpkit.core.vendorapi.errors import DpkitError

ROOT = Path(__file__).resolve().parents[2]


def lint_script() -> ModuleType:
    """scripts/lint.py as a module (scripts/ is a folder of scripts, not a package)."""
    spec = importlib.util.spec_from_file_location("dpkit_scripts_lint", ROOT / "scripts" / "lint.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def checkout(tmp_path: Path) -> Path:
    """The parts of a dpkit checkout the scaffold and the lint look at, copied from this one."""
    root = tmp_path / "dpkit"
    for rel in ("pyproject.toml", "core/pyproject.toml", "core/src/dpkit/core/__init__.py",
                "plugins/sfc/pyproject.toml", "plugins/sfc/src/dpkit/sfc/__init__.py",
                "deploy/overlays/sfc/config.yaml", "deploy/overlays/cex/config.yaml"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / rel, root / rel)
    return root


def files(root: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_new_vendor_adds_files_and_edits_none(checkout: Path) -> None:
    before = files(checkout)
    made = scaffold("acme", checkout)
    after = files(checkout)
    assert {p: after[p] for p in before} == before, "no existing file (the root pyproject.toml included) is edited"
    assert made.updated == [] and made.notes == []
    assert sorted(after.keys() - before.keys()) == sorted(made.created)
    assert checkout / "plugins" / "acme" / "src" / "dpkit" / "acme" / "vendor.py" in made.created
    with pytest.raises(DpkitError, match="exists already"):
        scaffold("acme", checkout)
    assert files(checkout) == after


def test_the_lint_finds_a_scaffolded_vendor(checkout: Path) -> None:
    lint = lint_script()
    assert list(lint.packages(checkout)) == ["dpkit.core", "dpkit.sfc"]
    scaffold("acme", checkout)
    assert list(lint.packages(checkout)) == ["dpkit.core", "dpkit.acme", "dpkit.sfc"]
    ruff, mypy = lint.commands([], checkout, python="py")
    assert mypy == ["py", "-m", "mypy", "--strict", "-p", "dpkit.core", "-p", "dpkit.acme", "-p", "dpkit.sfc"]
    assert ruff[:4] == ["py", "-m", "ruff", "check"] and str(checkout / "plugins") in ruff
    ruff, mypy = lint.commands(["dpkit.acme"], checkout, python="py")
    assert ruff[4:] == [str(checkout / "plugins" / "acme" / "src" / "dpkit" / "acme")]
    assert mypy[-2:] == ["-p", "dpkit.acme"] and mypy.count("-p") == 1
    with pytest.raises(ValueError, match=r"unknown package\(s\) dpkit\.nope"):
        lint.commands(["dpkit.nope"], checkout)


def test_the_lint_finds_every_package_of_this_checkout() -> None:
    found = lint_script().packages()
    assert {"dpkit.core", "dpkit.nvidia", "dpkit.sfc", "dpkit.kvm_vfio", "dpkit.cex"} <= found.keys()
    assert sorted(found) == sorted(["dpkit.core", *(f"dpkit.{p.parent.name}"
                                                    for p in (ROOT / "plugins").glob("*/pyproject.toml"))])


def test_the_scaffolded_vendor_serves_and_declares_its_config(checkout: Path) -> None:
    """The template's vendor runs as made, and its config section goes through the core's schema layer."""
    scaffold("acme", checkout)
    code = """
from dpkit.acme.vendor import AcmeVendor
from dpkit.core import ConfigError
print(*(len(next(iter(AcmeVendor(c).discover().values()))) for c in ({"devices": 3}, None)))
for bad in ({"devices": -1}, {"devicez": 1}, {"devices": "x"}):
    try:
        AcmeVendor(bad)
    except ConfigError as exc:
        print(exc)
"""
    env = {**os.environ, "PYTHONPATH": str(checkout / "plugins" / "acme" / "src")}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "3 2",  # the devices asked for, then the default
        "vendor.devices: expected a whole number from 0 to 1024, got -1",
        "vendor.devicez: unknown key (did you mean 'devices'?)",
        "vendor.devices: expected a whole number, got str 'x'",
    ]


@pytest.mark.parametrize("name", ["acme", "zeta"])  # sorting before and after "core"
def test_what_new_vendor_writes_is_ruff_clean_whatever_the_name(checkout: Path, name: str) -> None:
    made = scaffold(name, checkout)
    python_files = [str(p) for p in made.created if p.suffix == ".py"]
    result = subprocess.run([sys.executable, "-m", "ruff", "check", "--config", str(ROOT / "pyproject.toml"),
                             *python_files], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
