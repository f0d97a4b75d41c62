"""Real image builds with buildah, from a base made locally with debootstrap (no registry).

Two vendors from the one images/Containerfile: sfc (a udev vendor) and nvidia (the NVIDIA_*
environment), so the build arguments are seen to make two different images.

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
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]

CACHE = Path("/var/tmp/dpkit-test-base")
BASE = "localhost/dpkit-test-base:bookworm"
VENDOR = "sfc"  # exercises the libudev step of the udev vendors as well
OTHER = "nvidia"  # the same template with other build arguments
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


def tag_of(vendor: str) -> str:
    with (ROOT / "plugins" / vendor / "pyproject.toml").open("rb") as f:
        return f"{REGISTRY}/dpkit-{vendor.replace('_', '-')}:{tomllib.load(f)['project']['version']}"


@pytest.fixture(scope="module")
def images(buildah_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """vendor -> tag of its image, both built by one images/build.py run."""
    base = run(buildah_env, sys.executable, str(ROOT / "images" / "local_base.py"), "--tag", BASE,
               "--cache", str(CACHE / "debootstrap"), timeout=540)
    assert base.returncode == 0, base.stdout + base.stderr
    out = tmp_path_factory.mktemp("build")
    built = run(buildah_env, sys.executable, str(ROOT / "images" / "build.py"), "--vendor", VENDOR, "--vendor", OTHER,
                "--engine", "buildah", "--base", BASE, "--registry", REGISTRY, "--out", str(out), timeout=540)
    assert built.returncode == 0, built.stdout[-4000:] + built.stderr[-4000:]
    tags = {vendor: tag_of(vendor) for vendor in (VENDOR, OTHER)}
    for tag in tags.values():
        assert f"built {tag}" in built.stdout
    try:
        yield tags
    finally:
        for tag in tags.values():
            run(buildah_env, "buildah", "rmi", "-f", tag)


@pytest.fixture(scope="module")
def image(images: dict[str, str]) -> str:
    return images[VENDOR]


def config_of(env: dict[str, str], tag: str) -> dict[str, Any]:
    result = run(env, "buildah", "inspect", "--type", "image", tag)
    assert result.returncode == 0, result.stderr
    config: dict[str, Any] = json.loads(result.stdout)["OCIv1"]["config"]
    return config


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
    config = config_of(buildah_env, image)
    labels = config["Labels"]
    source = build_script.source_url()
    assert labels["org.opencontainers.image.version"] == image.rsplit(":", 1)[1]
    # the project's real source, or no label at all: never a placeholder
    assert labels.get("org.opencontainers.image.source", "") == source
    assert "example.invalid" not in json.dumps(labels)
    assert labels["io.dpkit.vendor"] == VENDOR
    assert labels["org.opencontainers.image.title"] == "dpkit-sfc"
    assert labels["org.opencontainers.image.description"] == \
        "Kubernetes device plugin for Solarflare NICs and Onload (dpkit)"
    assert config["Entrypoint"] == ["/bin/sh", "-c", 'exec dpkit run "${DPKIT_VENDOR}" "$@"', "dpkit"]
    assert config["User"] == "0:0"


def test_each_image_is_what_its_build_arguments_make(buildah_env: dict[str, str], images: dict[str, str]) -> None:
    """The one template, two vendors: labels, environment and user differ exactly where the arguments say."""
    configs = {vendor: config_of(buildah_env, tag) for vendor, tag in images.items()}
    for vendor, config in configs.items():
        env = dict(item.split("=", 1) for item in config["Env"])
        assert env["DPKIT_VENDOR"] == vendor and config["Labels"]["io.dpkit.vendor"] == vendor
        assert config["Labels"]["org.opencontainers.image.title"] == "dpkit-" + vendor
        nvidia = {k: v for k, v in env.items() if k.startswith("NVIDIA_")}
        if vendor == "nvidia":
            assert nvidia == {"NVIDIA_VISIBLE_DEVICES": "all", "NVIDIA_DRIVER_CAPABILITIES": "utility"}
        else:  # empty is what the NVIDIA container runtime treats as unset
            assert nvidia == {"NVIDIA_VISIBLE_DEVICES": "", "NVIDIA_DRIVER_CAPABILITIES": ""}
        assert config["User"] == "0:0"


@pytest.mark.parametrize("vendor", [VENDOR, OTHER])
def test_the_entrypoint_runs_dpkit_run_vendor(buildah_env: dict[str, str], images: dict[str, str], vendor: str) -> None:
    """The image's own entrypoint and environment, run in it with the DaemonSet's args, start `dpkit run <vendor>`
    (a `dpkit` that prints its arguments comes first on PATH), and the image holds that vendor."""
    config = config_of(buildah_env, images[vendor])
    made = run(buildah_env, "buildah", "from", "-q", images[vendor])
    assert made.returncode == 0, made.stderr
    name = made.stdout.strip()
    try:
        fake = run(buildah_env, "buildah", "run", name, "--", "sh", "-c",
                   "mkdir -p /tmp/echo && printf '#!/bin/sh\\necho dpkit \"$*\"\\n' > /tmp/echo/dpkit"
                   " && chmod 755 /tmp/echo/dpkit")
        assert fake.returncode == 0, fake.stderr
        ran = run(buildah_env, "buildah", "run", "--env", "PATH=/tmp/echo:/opt/dpkit/bin:/usr/bin:/bin", name, "--",
                  *config["Entrypoint"], "--config", "/etc/dpkit/config.yaml")
        vendors = run(buildah_env, "buildah", "run", name, "--", "dpkit", "vendors", "--json")
    finally:
        run(buildah_env, "buildah", "rm", name)
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout.strip() == f"dpkit run {vendor} --config /etc/dpkit/config.yaml"
    assert vendors.returncode == 0 and sorted(json.loads(vendors.stdout)) == sorted([vendor, "sim"]), vendors.stderr
