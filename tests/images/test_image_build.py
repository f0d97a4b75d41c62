"""One real image build with buildah, from a base made locally with debootstrap (no registry).

Slow the first time on a machine (debootstrap, about a minute), quick afterwards: the base and
buildah's storage live in CACHE and are reused. Skipped, with the reason, where buildah cannot run.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[2]

CACHE = Path("/var/tmp/dpkit-test-base")
BASE = "localhost/dpkit-test-base:bookworm"
VENDOR = "sfc"  # exercises the libudev step of the udev vendors as well
REGISTRY = "localhost/dpkit-test"


def _skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "buildah with --storage-driver vfs and debootstrap need root"
    for tool in ("buildah", "debootstrap"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (apt-get install buildah debootstrap)"
    return None


pytestmark = [
    pytest.mark.skipif(_skip_reason() is not None, reason=_skip_reason() or ""),
    pytest.mark.timeout(600),
]


@pytest.fixture(scope="module")
def buildah_env() -> Iterator[dict[str, str]]:
    """Environment for buildah: vfs storage of its own under CACHE, chroot isolation; one user at a time."""
    CACHE.mkdir(parents=True, exist_ok=True)
    conf = CACHE / "storage.conf"
    conf.write_text(f'[storage]\ndriver = "vfs"\ngraphroot = "{CACHE}/storage"\nrunroot = "{CACHE}/run"\n')
    env = {**os.environ, "CONTAINERS_STORAGE_CONF": str(conf), "BUILDAH_ISOLATION": "chroot",
           "STORAGE_DRIVER": "vfs"}
    with (CACHE / "lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another test run on this machine waits here
        yield env


def run(env: dict[str, str], *cmd: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(cmd), capture_output=True, text=True, env=env, timeout=timeout)


@pytest.fixture(scope="module")
def image(buildah_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    base = run(buildah_env, sys.executable, str(ROOT / "images" / "local_base.py"), "--tag", BASE,
               "--cache", str(CACHE / "debootstrap"), timeout=540)
    assert base.returncode == 0, base.stdout + base.stderr
    out = tmp_path_factory.mktemp("build")
    built = run(buildah_env, sys.executable, str(ROOT / "images" / "build.py"), "--vendor", VENDOR,
                "--engine", "buildah", "--base", BASE, "--registry", REGISTRY, "--out", str(out))
    assert built.returncode == 0, built.stdout[-4000:] + built.stderr[-4000:]
    with (ROOT / "plugins" / VENDOR / "pyproject.toml").open("rb") as f:
        tag = f"{REGISTRY}/dpkit-{VENDOR}:{tomllib.load(f)['project']['version']}"
    assert f"built {tag}" in built.stdout
    try:
        yield tag
    finally:
        run(buildah_env, "buildah", "rmi", "-f", tag)


@pytest.fixture(scope="module")
def container(buildah_env: dict[str, str], image: str) -> Iterator[str]:
    made = run(buildah_env, "buildah", "from", "-q", image)
    assert made.returncode == 0, made.stderr
    name = made.stdout.strip()
    try:
        yield name
    finally:
        run(buildah_env, "buildah", "rm", name)


def test_dpkit_help_runs_in_the_image(buildah_env: dict[str, str], container: str) -> None:
    result = run(buildah_env, "buildah", "run", container, "--", "dpkit", "--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: dpkit")


def test_the_image_holds_exactly_its_vendor(buildah_env: dict[str, str], container: str) -> None:
    result = run(buildah_env, "buildah", "run", container, "--", "dpkit", "vendors", "--json")
    assert result.returncode == 0, result.stderr
    assert sorted(json.loads(result.stdout)) == sorted([VENDOR, "sim"])


def test_runtime_has_libudev_and_no_build_tools(buildah_env: dict[str, str], container: str) -> None:
    udev = run(buildah_env, "buildah", "run", container, "--", "python3", "-c",
               "import ctypes.util; print(ctypes.util.find_library('udev'))")
    assert udev.returncode == 0 and udev.stdout.strip().startswith("libudev.so"), udev.stdout + udev.stderr
    tools = run(buildah_env, "buildah", "run", container, "--", "sh", "-c",
                "for t in gcc cc g++ make pip pip3; do command -v $t; done; ls /opt; true")
    assert tools.returncode == 0, tools.stderr
    assert tools.stdout.split() == ["dpkit"], "only the dpkit venv under /opt, no compiler or pip on PATH"


def test_labels_entrypoint_and_user(buildah_env: dict[str, str], image: str, build_script: ModuleType) -> None:
    result = run(buildah_env, "buildah", "inspect", "--type", "image", image)
    assert result.returncode == 0, result.stderr
    config = json.loads(result.stdout)["OCIv1"]["config"]
    labels = config["Labels"]
    source = build_script.source_url()
    assert labels["org.opencontainers.image.version"] == image.rsplit(":", 1)[1]
    # the project's real source, or no label at all: never a placeholder
    assert labels.get("org.opencontainers.image.source", "") == source
    assert "example.invalid" not in json.dumps(labels)
    assert labels["io.dpkit.vendor"] == VENDOR
    assert config["Entrypoint"] == ["dpkit", "run", VENDOR]
    assert config["User"] == "0:0"
