"""The nvidia overlay's MPS control daemon container, deployed next to the plugin as NVIDIA deploys it."""

from __future__ import annotations

import pytest
import yaml

from deploy.manifests import CONFIG, DEPLOY, Obj, container, dpkit_config_map, mounts, render
from dpkit.nvidia.config import load_settings

MPS_ROOT = "/run/nvidia/mps"


@pytest.fixture(scope="module")
def nvidia() -> list[Obj]:
    return render(DEPLOY / "overlays" / "nvidia")


def env(ctr: Obj) -> dict[str, str]:
    return {e["name"]: e["value"] for e in ctr.get("env", [])}


def test_the_daemon_runs_from_the_plugin_image_with_the_same_config(nvidia: list[Obj]) -> None:
    plugin, daemon = container(nvidia), container(nvidia, "mps-control-daemon")
    assert daemon["image"] == plugin["image"]
    assert daemon["command"] == ["dpkit", "mps-control-daemon"]
    assert daemon["args"] == ["--config", CONFIG, "--root", "/mps"]
    assert env(plugin)["MPS_ROOT"] == env(daemon)["MPS_ROOT"] == MPS_ROOT
    sc = daemon["securityContext"]
    assert not sc.get("privileged") and sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]


def test_both_see_the_host_mps_root_and_the_daemon_shares_its_shm(nvidia: list[Obj]) -> None:
    plugin, daemon = mounts(nvidia), mounts(nvidia, "mps-control-daemon")
    assert plugin["/mps"]["volume"]["hostPath"]["path"] == MPS_ROOT and plugin["/mps"]["readOnly"] is True
    assert daemon["/mps"]["volume"]["hostPath"]["path"] == MPS_ROOT and not daemon["/mps"].get("readOnly")
    # workload containers get <mpsRoot>/shm as /dev/shm from Allocate: the server must use the same directory
    assert daemon["/dev/shm"]["volume"]["hostPath"]["path"] == f"{MPS_ROOT}/shm"
    assert daemon[CONFIG.rsplit("/", 1)[0]]["volume"] == plugin[CONFIG.rsplit("/", 1)[0]]["volume"]


def test_the_config_accepts_mps_with_the_overlays_environment(nvidia: list[Obj], tmp_path) -> None:
    vendor = yaml.safe_load(dpkit_config_map(nvidia)["data"]["config.yaml"]).get("vendor") or {}
    document = {"sharing": {"mps": {"resources": [{"name": "nvidia.com/gpu", "replicas": 2}]}}}
    settings = load_settings({**vendor, "config": document}, environ=env(container(nvidia)))
    assert settings.mps and settings.mps_root == MPS_ROOT and settings.mps_container_root == "/mps"
