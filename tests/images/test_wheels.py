"""Each vendor's wheels install into a clean venv with only its own dependencies.

The wheelhouse is exactly what images/build.py puts in that vendor's image; installing it with
``--no-index`` into a bare ``python -m venv`` is what the image's install stage does.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import venv
from collections.abc import Callable
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

VENDORS = ["nvidia", "sfc", "kvm_vfio", "cex"]
# A dependency only some vendors have; no other vendor's venv may hold it.
EXCLUSIVE = {"nvidia-ml-py": {"nvidia"}, "pyudev": {"sfc", "kvm_vfio", "cex"}}


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def wheel_dists(wheels: Path) -> set[str]:
    return {canonical(w.name.split("-")[0]) for w in wheels.glob("*.whl")}


@pytest.fixture(scope="module")
def clean_venv(wheelhouse: Callable[[str], Path], tmp_path_factory: pytest.TempPathFactory
               ) -> Callable[[str], Path]:
    """``clean_venv(vendor)``: a new venv (no pip) with only ``dpkit-<vendor>`` installed from its wheels."""
    made: dict[str, Path] = {}

    def get(vendor: str) -> Path:
        if vendor not in made:
            env_dir = tmp_path_factory.mktemp(f"venv-{vendor}") / "venv"
            venv.EnvBuilder(with_pip=False).create(env_dir)
            dist = "dpkit-" + vendor.replace("_", "-")
            result = subprocess.run(
                [sys.executable, "-m", "pip", "--python", str(env_dir / "bin" / "python"), "install", "-q",
                 "--disable-pip-version-check", "--no-index", "--find-links", str(wheelhouse(vendor)), dist],
                capture_output=True, text=True, timeout=300)
            assert result.returncode == 0, result.stdout + result.stderr
            made[vendor] = env_dir
        return made[vendor]

    return get


def in_venv(env_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(env_dir / "bin" / args[0]), *args[1:]], capture_output=True, text=True,
                          timeout=120, cwd=env_dir)


@pytest.mark.parametrize("vendor", VENDORS)
def test_dpkit_vendors_lists_exactly_that_vendor(vendor: str, clean_venv: Callable[[str], Path]) -> None:
    result = in_venv(clean_venv(vendor), "dpkit", "vendors", "--json")
    assert result.returncode == 0, result.stderr
    assert sorted(json.loads(result.stdout)) == sorted([vendor, "sim"]), "its package and the built-in sim"


@pytest.mark.parametrize("vendor", VENDORS)
def test_only_its_own_dependencies(vendor: str, clean_venv: Callable[[str], Path],
                                   wheelhouse: Callable[[str], Path]) -> None:
    listing = in_venv(clean_venv(vendor), "python", "-c",
                      "import importlib.metadata as m, json; "
                      "print(json.dumps(sorted(d.metadata['Name'] for d in m.distributions())))")
    assert listing.returncode == 0, listing.stderr
    installed = {canonical(n) for n in json.loads(listing.stdout)}
    # pip resolved the wheelhouse from this vendor's requirements alone: the venv is exactly that.
    assert installed == wheel_dists(wheelhouse(vendor))
    assert {d for d in installed if d.startswith("dpkit-")} == {"dpkit-core", canonical("dpkit-" + vendor)}
    for dep, owners in EXCLUSIVE.items():
        assert (dep in installed) == (vendor in owners), f"{dep} in the {vendor} venv"
    assert "pip" not in installed


@pytest.mark.parametrize("vendor", VENDORS)
def test_the_vendor_class_loads_with_only_those_dependencies(vendor: str,
                                                              clean_venv: Callable[[str], Path]) -> None:
    module = ROOT / "plugins" / vendor / "src" / "dpkit" / vendor / "vendor.py"
    if not module.exists():
        pytest.skip(f"{module.relative_to(ROOT)} is not written yet: nothing to import")
    result = in_venv(clean_venv(vendor), "python", "-c",
                     "import sys; from dpkit.core.tools.registry import load_vendor_class; "
                     f"cls = load_vendor_class({vendor!r}); print(cls.__module__)")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"dpkit.{vendor}.vendor"
