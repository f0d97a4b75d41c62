"""The new user's first hour, played on a fresh clone exactly as README and docs/getting-started.md say.

git clone of this repository's HEAD into a temp dir; the README's set-up (``./hatchw`` bootstraps
hatch); ``./dpkit vendors``; ``./dpkit kubelet --dir`` + ``./dpkit run sim --devices`` +
``./dpkit kubelet allocate``; SIGTERM through the documented wrapper with no process left;
``./dpkit new-vendor acme`` with no further edit: its tests, the deploy manifest and Containerfile
checks, its lint and ``images:build --dry-run`` take it in. Slow (a fresh hatch and three fresh
environments, a few minutes); the clone's environments live in the temp dir (``HATCH_DATA_DIR``),
not with the main ones.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from child_process import processes_mentioning, read_until

ROOT = Path(__file__).resolve().parents[2]
WIDGET = "example.com/widget"

pytestmark = pytest.mark.timeout(1500)


def user_env(home: Path) -> dict[str, str]:
    """A shell as a new user has it: no active hatch or virtual env, hatch's data in the temp dir."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("HATCH_", "VIRTUAL_ENV", "PYTHON", "DPKIT_")) and k not in ("PIP_PYTHON",)}
    active = os.path.dirname(sys.executable)
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if p and p != active)
    env["HATCH_DATA_DIR"] = str(home / "hatch-data")
    return env


def sh(clone: Path, env: dict[str, str], *cmd: str, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(list(cmd), cwd=clone, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{' '.join(cmd)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


@pytest.fixture(scope="module")
def fresh_clone(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, dict[str, str]]]:
    home = tmp_path_factory.mktemp("first-hour")
    clone = home / "dpkit"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True, timeout=120)
    yield clone, user_env(home)


def test_the_first_hour_on_a_fresh_clone(fresh_clone: tuple[Path, dict[str, str]], short_tmp: Path) -> None:
    clone, env = fresh_clone
    assert not (clone / ".hatch-venv").exists(), "a fresh clone has no hatch yet"

    # README "Using it", after the README's set-up: the ./dpkit wrapper makes the env on first use
    vendors = sh(clone, env, "./dpkit", "vendors").stdout
    assert vendors.splitlines()[-1].startswith("sim\tdpkit.core.tools.sim:SimulatedVendor")
    assert {"nvidia", "sfc", "kvm_vfio", "cex"} <= {line.split("\t")[0] for line in vendors.splitlines()}

    # docs/getting-started.md "Try it": the kubelet emulator, the plugin against it, an allocation
    kubelet_dir = short_tmp / "kl"
    devices = short_tmp / "devices.yaml"
    devices.write_text(yaml.safe_dump({"resources": {WIDGET: [{"id": f"w{i}", "numa": 0} for i in range(3)]}}))
    kubelet = subprocess.Popen(["./dpkit", "kubelet", "--dir", str(kubelet_dir)], cwd=clone, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    plugin = None
    try:
        read_until(kubelet, "SIGTERM or Ctrl-C stops it.", timeout=120)
        plugin = subprocess.Popen(["./dpkit", "run", "sim", "-c", str(kubelet_dir / "dpkit.yaml"),
                                   "--devices", str(devices)], cwd=clone, env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 60
        while True:  # each round is one `./dpkit kubelet devices` call, as a user would retry it
            seen = sh(clone, env, "./dpkit", "kubelet", "--dir", str(kubelet_dir), "devices", "--json").stdout
            resources = json.loads(seen)["resources"]
            if (resources and resources[0]["healthy"] == 3) or time.monotonic() > deadline:
                break
        assert resources and resources[0]["healthy"] == 3, seen
        allocated = sh(clone, env, "./dpkit", "kubelet", "--dir", str(kubelet_dir), "allocate", WIDGET, "2")
        assert "allocated w0, w1 to default/try-1/main" in allocated.stdout
        assert "SIM_VISIBLE_DEVICES=w0,w1" in allocated.stdout
        status = sh(clone, env, "./dpkit", "status", "-c", str(kubelet_dir / "dpkit.yaml")).stdout
        assert f"{WIDGET}: 3/3 healthy, 2 held, registered" in status

        # SIGTERM through the documented wrapper stops `dpkit run` itself: nothing left behind
        plugin.send_signal(signal.SIGTERM)
        _, err = plugin.communicate(timeout=30)
        assert plugin.returncode == 0, err
        assert processes_mentioning(str(devices)) == []
        assert not list((kubelet_dir / "device-plugins").glob("dpkit-*.sock"))
        assert not (kubelet_dir / "state" / "control.sock").exists()
    finally:
        for proc in (plugin, kubelet):
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.communicate(timeout=20)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.communicate(timeout=10)
        for pid in processes_mentioning(str(short_tmp)):
            os.kill(pid, signal.SIGKILL)
    assert kubelet.returncode == 0
    assert not (kubelet_dir / "control.sock").exists()

    # a vendor engineer: scaffold, the wrapper picks the new package up, and with no edit anywhere its
    # tests, the deploy manifest checks, the lint and the image build all take it in
    made = sh(clone, env, "./dpkit", "new-vendor", "acme").stdout
    assert "created plugins/acme/pyproject.toml" in made and "updated" not in made
    changed = sh(clone, env, "git", "status", "--porcelain", "--untracked-files=no").stdout
    assert changed == "", f"new-vendor edits no existing file:\n{changed}"
    assert "acme\tdpkit.acme.vendor:AcmeVendor" in sh(clone, env, "./dpkit", "vendors").stdout
    tested = sh(clone, env, "./hatchw", "run", "test:python", "-m", "pytest", "-v", "-p", "no:cacheprovider",
                "tests/acme", "tests/deploy/test_manifests.py", "tests/images/test_containerfiles.py",
                timeout=1200).stdout
    assert " failed" not in tested and " passed" in tested, tested[-3000:]
    for test in ("tests/acme/test_acme_vendor.py::test_registers_and_allocates_through_the_emulated_kubelet",
                 "test_manifests.py::test_every_vendor_package_has_an_overlay",
                 "test_manifests.py::test_the_vendor_accepts_its_configmap[acme]",
                 "test_manifests.py::test_host_access_is_what_the_vendor_needs[acme]",
                 "test_containerfiles.py::test_every_vendor_package_has_an_image_that_images_build_builds",
                 "test_containerfiles.py::test_multi_stage_slim_runtime_with_labels_and_entrypoint[acme]"):
        assert f"{test} PASSED" in tested, f"{test} did not pass:\n{tested[-3000:]}"
    linted = sh(clone, env, "./hatchw", "run", "test:lint", "dpkit.acme").stdout
    assert "mypy --strict -p dpkit.acme" in linted and "Success: no issues found" in linted, linted
    everything = sh(clone, env, "./hatchw", "run", "images:build", "--dry-run").stdout
    for vendor in ("nvidia", "sfc", "kvm-vfio", "cex", "acme"):
        assert f"would build localhost/dpkit-{vendor}:" in everything, everything
    one = sh(clone, env, "./hatchw", "run", "images:build", "--vendor", "acme", "--dry-run").stdout
    assert one.count("would build ") == 1 and "would build localhost/dpkit-acme:0.1.0" in one, one
