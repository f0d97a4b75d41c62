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
with open(os.environ["FAKE_ENGINE_LOG"], "a") as log:
    if args[:2] in (["image", "exists"], ["images", "-q"], ["image", "inspect"]):
        log.write(json.dumps(record) + "\\n")
        if os.environ.get("FAKE_NO_IMAGES"):
            sys.exit(1)
        print("0123456789ab")  # an image ID, as `buildah images -q` prints for an image it has
        sys.exit(0)
    if args and args[0] in ("build", "bud"):
        context = Path(args[-1])
        record["wheels"] = sorted(p.name for p in (context / "wheels").iterdir())
        if os.environ.get("FAKE_OCI_FAILS") and "chroot" not in args:
            log.write(json.dumps(record) + "\\n")
            print("STEP 2/5: RUN python3 -m venv /opt/pip")
            print("error running container: crun: cgroups in hybrid mode not supported, "
                  "use cgroupv2 or cgroupv1: OCI runtime error")
            sys.exit(1)
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


def run_script(tmp_path: Path, bin_dir: Path, *args: str, **extra_env: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PATH": str(bin_dir), "FAKE_ENGINE_LOG": str(tmp_path / "engine.log"), **extra_env}
    for name in ("DPKIT_IMAGE_ENGINE", "DPKIT_IMAGE_REGISTRY", "DPKIT_IMAGE_BASE", "BUILDAH_ISOLATION"):
        if name not in extra_env:
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
    assert f"-f {ROOT / 'images' / 'Containerfile'} " in line, "the one template, whatever the vendor"
    assert f"--build-arg VENDOR={vendor} --build-arg VERSION={package_version(vendor)} " in line
    assert "SOURCE" not in line and "example.invalid" not in line, "no placeholder source"
    assert line.endswith(str(tmp_path / "out" / vendor))
    assert engine_calls(tmp_path) == [], "a dry run runs nothing"
    assert not (tmp_path / "out").exists()


def test_without_vendor_every_vendor_package_is_built_in_turn(tmp_path: Path, build_script: ModuleType) -> None:
    """`./hatchw run images:build` passes no --vendor: every package under plugins/, a new vendor's included,
    each from images/Containerfile with its own VENDOR."""
    result = run_script(tmp_path, fake_bin(tmp_path, "podman"), "--dry-run")
    assert result.returncode == 0, result.stderr
    builds = [line for line in result.stdout.splitlines() if line.startswith("+ podman build")]
    assert {line.split(" -f ", 1)[1].split(" ", 1)[0] for line in builds} == {str(ROOT / "images" / "Containerfile")}
    built = [line.split("--build-arg VENDOR=", 1)[1].split(" ", 1)[0] for line in builds]
    expected = sorted(p.parent.name for p in (ROOT / "plugins").glob("*/pyproject.toml"))
    assert built == expected
    assert build_script.vendors() == expected and {"nvidia", "sfc", "kvm_vfio", "cex"} <= set(expected)


def test_a_per_vendor_containerfile_is_said_to_be_unused(tmp_path: Path, build_script: ModuleType,
                                                         monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    """`dpkit new-vendor` of an older core makes images/NAME/Containerfile: the build says it is not used."""
    images = tmp_path / "images"
    (images / "acme").mkdir(parents=True)
    (images / "acme" / "Containerfile").write_text("FROM scratch\n")
    monkeypatch.setattr(build_script, "IMAGES", images)
    assert build_script.stray_containerfiles() == [images / "acme" / "Containerfile"]
    monkeypatch.setattr(build_script, "find_engine", lambda requested=None: "podman")
    assert build_script.main(["--vendor", "sfc", "--dry-run", "--out", str(tmp_path / "out")]) == 0
    assert "images/acme/Containerfile is not used: every image is built from images/Containerfile" in \
        capsys.readouterr().out


def _table(tmp_path: Path, text: str) -> Path:
    table = tmp_path / "vendors.toml"
    table.write_text(text)
    return table


def test_the_vendor_table_is_checked(tmp_path: Path, build_script: ModuleType) -> None:
    """A typo in images/vendors.toml stops the build with the file and the fault, instead of a silently
    different image."""
    assert set(build_script.vendor_table()) == {"nvidia", "sfc", "kvm_vfio", "cex"}
    assert build_script.env_args() == {"NVIDIA_VISIBLE_DEVICES", "NVIDIA_DRIVER_CAPABILITIES"}
    cases = {
        '[no_such_vendor]\ndescription = "x"\n': r"\[no_such_vendor\]: no such vendor package under plugins/",
        '[sfc]\nruntime_package = ["libudev1"]\n': r"unknown key\(s\) runtime_package",
        '[sfc]\nruntime_packages = "libudev1"\n': r"runtime_packages must be a list of Debian package names",
        '[sfc]\ncompilers = ["g++; curl x | sh"]\n': r"compilers must be a list of Debian package names",
        '[nvidia]\nenv = { CUDA_VISIBLE_DEVICES = "all" }\n': r"env CUDA_VISIBLE_DEVICES: not an environment ARG of",
        '[nvidia]\nenv = { VENDOR = "sfc" }\n': r"env VENDOR: not an environment ARG of",
        '[nvidia]\nenv = { PIP_NO_INDEX = "0" }\n': r"env PIP_NO_INDEX: not an environment ARG of",
        '[nvidia]\nenv = { NVIDIA_VISIBLE_DEVICES = 1 }\n': r"env must be a table of strings",
        "[sfc\n": r"cannot read the vendors' image facts",
    }
    for text, error in cases.items():
        with pytest.raises(build_script.BuildError, match=error):
            build_script.vendor_table(_table(tmp_path, text))


def test_a_vendor_without_a_table_gets_the_defaults(build_script: ModuleType) -> None:
    """What a vendor made by `dpkit new-vendor` builds with: its name, no extra packages, no extra env."""
    image = build_script.VendorImage("acme", "dpkit-acme", "0.1.0", "")
    assert image.build_args() == [("VENDOR", "acme"), ("VERSION", "0.1.0"), ("TITLE", "dpkit-acme"),
                                  ("DESCRIPTION", "Kubernetes device plugin for acme devices (dpkit)")]


def test_core_has_no_placeholder_source_url() -> None:
    """The image source label comes from a real URL or is left out; core must not ship a made-up one."""
    with (ROOT / "core" / "pyproject.toml").open("rb") as f:
        urls = tomllib.load(f)["project"].get("urls", {})
    assert not any(".invalid" in url or "example." in url for url in urls.values()), urls


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
    result = run_script(tmp_path, fake_bin(tmp_path, "podman"), "--vendor", "no_such_vendor")
    assert result.returncode == 2
    assert "invalid choice: 'no_such_vendor'" in result.stderr
    with pytest.raises(build_script.BuildError, match="unknown vendor 'no_such_vendor'"):
        build_script.vendor_image("no_such_vendor")


def test_build_and_push_with_the_wheels_in_the_context(tmp_path: Path) -> None:
    """The real wheel step, then the engine's build and push on the fake podman."""
    result = run_script(tmp_path, fake_bin(tmp_path, "podman", "docker"), "--vendor", "sfc", "--push")
    assert result.returncode == 0, result.stdout + result.stderr
    tag = f"localhost/dpkit-sfc:{package_version('sfc')}"
    calls = [c for c in engine_calls(tmp_path) if c["args"][:2] != ["image", "exists"]]  # type: ignore[index]
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


# -- a build that finds what works on this host ---------------------------------------------------
def test_an_isolation_error_is_retried_with_chroot(tmp_path: Path) -> None:
    """crun's cgroups error (v1/hybrid hosts) under oci isolation: one retry with chroot, said in a line."""
    result = run_script(tmp_path, fake_bin(tmp_path, "buildah"), "--vendor", "sfc", "--isolation", "oci",
                        FAKE_OCI_FAILS="1")
    assert result.returncode == 0, result.stdout + result.stderr
    builds = [args for c in engine_calls(tmp_path) if isinstance(args := c["args"], list) and args[0] == "bud"]
    assert len(builds) == 2
    assert builds[0][builds[0].index("--isolation") + 1] == "oci"
    assert builds[1][builds[1].index("--isolation") + 1] == "chroot"
    assert "isolation error under oci; retrying with --isolation chroot" in result.stdout
    assert "cgroups in hybrid mode not supported" in result.stdout, "the engine's own output is shown"


def test_other_build_failures_are_not_retried(tmp_path: Path) -> None:
    bin_dir = fake_bin(tmp_path, "buildah")
    (bin_dir / "buildah").write_text(f"#!{sys.executable}\nimport sys\nif sys.argv[1] == 'bud':\n"
                                     "    print('Error: no space left on device')\n    sys.exit(125)\n"
                                     "print('0123456789ab')\n")  # `images -q`: the base is there
    broken = run_script(tmp_path, bin_dir, "--vendor", "sfc", "--isolation", "oci")
    assert broken.returncode == 1 and "failed with exit code 125" in broken.stderr
    assert "retrying" not in broken.stdout


def test_isolation_follows_the_hosts_cgroups(tmp_path: Path, build_script: ModuleType, monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.delenv("BUILDAH_ISOLATION", raising=False)
    v2 = tmp_path / "v2"
    v2.mkdir()
    (v2 / "cgroup.controllers").write_text("cpu memory\n")
    assert build_script.choose_isolation("buildah", cgroup_root=v2) == "oci"
    assert build_script.choose_isolation("podman", cgroup_root=tmp_path / "v1") == "chroot"
    assert "cgroups v1/hybrid here" in capsys.readouterr().out
    assert build_script.choose_isolation("docker", cgroup_root=tmp_path / "v1") is None
    assert build_script.choose_isolation("buildah", "rootless", cgroup_root=v2) == "rootless"
    monkeypatch.setenv("BUILDAH_ISOLATION", "chroot")
    assert build_script.choose_isolation("buildah", cgroup_root=v2) is None, "the engine reads the variable itself"


def test_a_missing_base_without_registry_access_says_what_to_do(tmp_path: Path) -> None:
    local = run_script(tmp_path, fake_bin(tmp_path, "buildah"), "--vendor", "sfc", "--base", "localhost/nothing:1",
                       FAKE_NO_IMAGES="1")
    assert local.returncode == 1
    assert "the base image localhost/nothing:1 is not in buildah's local storage" in local.stderr
    assert "images/local_base.py" in local.stderr and "--base localhost/dpkit-base:bookworm" in local.stderr
    # a registry nobody answers for (a reserved TLD: no DNS lookup can succeed)
    far = run_script(tmp_path, tmp_path / "bin", "--vendor", "sfc", "--base", "registry.invalid/python:3.11",
                     FAKE_NO_IMAGES="1")
    assert far.returncode == 1
    assert "its registry registry.invalid cannot be reached from here" in far.stderr
    assert "images/local_base.py" in far.stderr
    assert not (tmp_path / "out").exists(), "nothing is built before the base is known to be there"


def test_registry_host_of_image_references(build_script: ModuleType) -> None:
    assert build_script.registry_host("docker.io/library/python:3.11") == "registry-1.docker.io"
    assert build_script.registry_host("python:3.11") == "registry-1.docker.io"
    assert build_script.registry_host("quay.io/x/y:1") == "quay.io"
    assert build_script.registry_host("localhost:5000/x:1") is None
    assert build_script.registry_host("localhost/dpkit-base:bookworm") is None


def _project_with(root: Path, urls: str) -> Path:
    (root / "core").mkdir(parents=True)
    (root / "core" / "pyproject.toml").write_text(f'[project]\nname = "dpkit-core"\nversion = "1"\n{urls}')
    return root


def test_source_label_is_real_or_absent(tmp_path: Path, build_script: ModuleType) -> None:
    real = _project_with(tmp_path / "a", '[project.urls]\nSource = "https://git.corp.net/k8s/dpkit"\n')
    assert build_script.source_url(real) == "https://git.corp.net/k8s/dpkit"
    placeholder = _project_with(tmp_path / "b", '[project.urls]\nSource = "https://example.invalid/dpkit"\n')
    assert build_script.source_url(placeholder) == "", "no git repo, a placeholder URL: no label"
    subprocess.run(["git", "init", "-q", str(placeholder)], check=True, timeout=30)
    subprocess.run(["git", "-C", str(placeholder), "remote", "add", "origin",
                    "https://bot:s3cret@gitlab.corp.net/k8s/dpkit.git"], check=True, timeout=30)
    assert build_script.source_url(placeholder) == "https://gitlab.corp.net/k8s/dpkit.git", "credentials dropped"
    assert build_script._real_url("git@github.com:corp/dpkit.git") == "https://github.com/corp/dpkit.git"
    assert build_script._real_url("https://example.com/dpkit") == ""
    unlabelled = build_script.VendorImage("sfc", "dpkit-sfc", "1", "")
    assert "--label" not in build_script.build_command("buildah", unlabelled, "t", tmp_path, None, None)
    labelled = build_script.VendorImage("sfc", "dpkit-sfc", "1", "https://x.org/d")
    assert "org.opencontainers.image.source=https://x.org/d" in build_script.build_command(
        "buildah", labelled, "t", tmp_path, None, None)
