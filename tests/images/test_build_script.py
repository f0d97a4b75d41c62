"""images/build.py without a real engine: engine choice, its clear failure, tags and commands.

A fake engine is a small executable on PATH that records its arguments, so these tests run the
real script (and the real pip, for the wheels) everywhere.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = ROOT / "images" / "build.py"
FAKE_ENGINE = """#!{python}
import json, os, sys
from pathlib import Path
args = sys.argv[1:]
record = {{"engine": Path(sys.argv[0]).name, "args": args}}
if args and args[0] in ("build", "bud"):
    context = Path(args[-1])
    record["wheels"] = sorted(p.name for p in (context / "wheels").iterdir())
with open(os.environ["FAKE_ENGINE_LOG"], "a") as log:
    log.write(json.dumps(record) + "\\n")
"""


def package_version(vendor: str) -> str:
    with (ROOT / "plugins" / vendor / "pyproject.toml").open("rb") as f:
        return str(tomllib.load(f)["project"]["version"])


def fake_bin(tmp_path: Path, *engines: str) -> Path:
    """A PATH directory holding fake ``engines`` and nothing else."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in engines:
        exe = bin_dir / name
        exe.write_text(FAKE_ENGINE.format(python=sys.executable))
        exe.chmod(0o755)
    return bin_dir


def run_script(tmp_path: Path, bin_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PATH": str(bin_dir), "FAKE_ENGINE_LOG": str(tmp_path / "engine.log")}
    for name in ("DPKIT_IMAGE_ENGINE", "DPKIT_IMAGE_REGISTRY", "DPKIT_IMAGE_BASE"):
        env.pop(name, None)
    return subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path / "out"), *args],
                          capture_output=True, text=True, env=env, timeout=300)


def engine_calls(tmp_path: Path) -> list[dict[str, object]]:
    log = tmp_path / "engine.log"
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def test_no_engine_fails_with_a_clear_message(tmp_path: Path) -> None:
    result = run_script(tmp_path, fake_bin(tmp_path), "--vendor", "sfc")
    assert result.returncode == 1
    assert "no container engine found: install buildah, podman or docker" in result.stderr
    assert not (tmp_path / "out").exists(), "nothing is built before the engine is known"


def test_a_requested_engine_that_is_missing_is_named(tmp_path: Path) -> None:
    result = run_script(tmp_path, fake_bin(tmp_path, "podman"), "--vendor", "sfc", "--engine", "docker")
    assert result.returncode == 1
    assert "container engine 'docker' is not installed" in result.stderr


def test_engine_preference_buildah_then_podman_then_docker(build_script: ModuleType) -> None:
    def installed(*names: str) -> object:
        return lambda name: f"/usr/bin/{name}" if name in names else None

    assert build_script.find_engine(which=installed("docker", "podman", "buildah")) == "buildah"
    assert build_script.find_engine(which=installed("docker", "podman")) == "podman"
    assert build_script.find_engine(which=installed("docker")) == "docker"
    assert build_script.find_engine("docker", which=installed("docker", "buildah")) == "docker"


@pytest.mark.parametrize("vendor", ["nvidia", "sfc", "kvm_vfio", "cex"])
def test_dry_run_tags_each_vendor_with_its_package_version(tmp_path: Path, vendor: str) -> None:
    result = run_script(tmp_path, fake_bin(tmp_path, "podman"), "--vendor", vendor, "--dry-run",
                        "--registry", "registry.example.com/dpkit/")
    assert result.returncode == 0, result.stderr
    tag = f"registry.example.com/dpkit/dpkit-{vendor.replace('_', '-')}:{package_version(vendor)}"
    build_lines = [line for line in result.stdout.splitlines() if line.startswith("+ podman build")]
    assert len(build_lines) == 1, result.stdout
    line = build_lines[0]
    assert f"-t {tag} " in line
    assert f"-f {ROOT / 'images' / vendor / 'Containerfile'} " in line
    assert f"--build-arg VERSION={package_version(vendor)} " in line
    assert "--build-arg SOURCE=" in line
    assert line.endswith(str(tmp_path / "out" / vendor))
    assert engine_calls(tmp_path) == [], "a dry run runs nothing"
    assert not (tmp_path / "out").exists()


def test_another_cpu_lets_pip_fetch_that_cpus_wheels(tmp_path: Path, build_script: ModuleType) -> None:
    image = build_script.vendor_image("cex")
    native = build_script.build_command("buildah", image, "t", tmp_path, None, None)
    assert "PIP_NO_INDEX=0" not in " ".join(native)
    other = "linux/s390x" if build_script.is_native("linux/amd64") else "linux/amd64"
    cross = build_script.build_command("buildah", image, "t", tmp_path, "localhost/base:1", other)
    assert cross[:2] == ["buildah", "bud"]
    assert ["--platform", other] == cross[cross.index("--platform"):cross.index("--platform") + 2]
    assert "PIP_NO_INDEX=0" in cross and "BASE=localhost/base:1" in cross


def test_unknown_vendor_is_refused(tmp_path: Path, build_script: ModuleType) -> None:
    result = run_script(tmp_path, fake_bin(tmp_path, "podman"), "--vendor", "acme")
    assert result.returncode == 2
    assert "invalid choice: 'acme'" in result.stderr
    with pytest.raises(build_script.BuildError, match="unknown vendor 'acme'"):
        build_script.vendor_image("acme")


def test_build_and_push_with_the_wheels_in_the_context(tmp_path: Path) -> None:
    """The real wheel step, then the engine's build and push on the fake podman."""
    result = run_script(tmp_path, fake_bin(tmp_path, "podman", "docker"), "--vendor", "sfc", "--push")
    assert result.returncode == 0, result.stdout + result.stderr
    tag = f"localhost/dpkit-sfc:{package_version('sfc')}"
    calls = engine_calls(tmp_path)
    assert [c["engine"] for c in calls] == ["podman", "podman"]
    assert isinstance(calls[0]["args"], list) and calls[0]["args"][0] == "build"
    assert calls[1]["args"] == ["push", tag]
    wheels = calls[0]["wheels"]
    assert isinstance(wheels, list)
    names = {w.split("-")[0].lower() for w in wheels}
    assert {"dpkit_core", "dpkit_sfc", "pyudev", "grpcio"} <= names
    assert not names & {"dpkit_nvidia", "dpkit_cex", "dpkit_kvm_vfio", "nvidia_ml_py"}
    assert f"built {tag}" in result.stdout


def test_unusable_package_metadata_names_the_file(tmp_path: Path, build_script: ModuleType) -> None:
    broken = tmp_path / "pyproject.toml"
    broken.write_text("[project\nname = 'x'\n")
    with pytest.raises(build_script.BuildError, match=f"{broken}: cannot read the package metadata"):
        build_script._project(broken)
    broken.write_text("[project]\nname = 'x'\ndynamic = ['version']\n")
    with pytest.raises(build_script.BuildError, match="needs a static name and version"):
        build_script._project(broken)
