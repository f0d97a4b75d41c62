"""Rendering the kustomize overlays, and finding things in what they render (shared by the tests)."""

from __future__ import annotations

import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
#: every overlay under deploy/overlays (a vendor made by `dpkit new-vendor` included), found, not listed,
#: so a scaffolded vendor is checked like the shipped ones without editing this file
VENDORS = sorted(p.parent.name for p in (DEPLOY / "overlays").glob("*/kustomization.yaml"))
SHIPPED = {"nvidia", "sfc", "kvm_vfio", "cex"}
# Oldest Kubernetes the manifests claim, and the newest schema kubernetes-validate ships.
K8S_VERSIONS = ["1.29.0", kubernetes_validate.latest_version()]
NEEDS_DEV = {"sfc", "kvm_vfio", "cex"}  # nvidia: the NVIDIA runtime injects its nodes
PRIVILEGED = {"kvm_vfio", "cex"}
WRITES_SYSFS = {"cex"}
Obj = dict[str, Any]
CONFIG = "/etc/dpkit/config.yaml"  # where the base mounts the dpkit ConfigMap
#: containers an overlay may add next to "dpkit" (nvidia: the MPS control daemons, as NVIDIA deploys them)
SIDE_CONTAINERS = {"mps-control-daemon"}


def renderer() -> list[str] | None:
    if shutil.which("kustomize"):
        return ["kustomize", "build"]
    if shutil.which("kubectl"):
        return ["kubectl", "kustomize"]
    return None


def render(path: Path) -> list[Obj]:
    cmd = renderer()
    if cmd is None:
        pytest.skip("neither kustomize nor kubectl (which has kustomize built in) is installed")
    result = subprocess.run([*cmd, str(path)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    docs: list[Obj] = [doc for doc in yaml.safe_load_all(result.stdout) if doc]
    return docs


def one(objs: list[Obj], kind: str, name_prefix: str = "") -> Obj:
    found = [o for o in objs if o["kind"] == kind and o["metadata"]["name"].startswith(name_prefix)]
    assert len(found) == 1, f"expected one {kind} {name_prefix!r}, got {[o['metadata']['name'] for o in found]}"
    return found[0]


def pod(objs: list[Obj]) -> Obj:
    spec: Obj = one(objs, "DaemonSet")["spec"]["template"]["spec"]
    return spec


def container(objs: list[Obj], name: str = "dpkit") -> Obj:
    containers: list[Obj] = pod(objs)["containers"]
    names = [c["name"] for c in containers]
    assert names[0] == "dpkit" and set(names[1:]) <= SIDE_CONTAINERS, names
    return next(c for c in containers if c["name"] == name)


def mounts(objs: list[Obj], name: str = "dpkit") -> dict[str, Obj]:
    """mountPath -> the mount of container ``name``, with its volume under "volume"."""
    volumes = {v["name"]: v for v in pod(objs)["volumes"]}
    return {m["mountPath"]: {**m, "volume": volumes[m["name"]]} for m in container(objs, name)["volumeMounts"]}


def package_version(vendor: str) -> str:
    with (ROOT / "plugins" / vendor / "pyproject.toml").open("rb") as f:
        return str(tomllib.load(f)["project"]["version"])


def dpkit_config_map(objs: list[Obj]) -> Obj:
    """The ConfigMap behind the --config file the container is started with."""
    args = container(objs)["args"]
    config_path = Path(args[args.index("--config") + 1])
    mount = mounts(objs)[str(config_path.parent)]
    name = mount["volume"]["configMap"]["name"]
    cm = next(o for o in objs if o["kind"] == "ConfigMap" and o["metadata"]["name"] == name)
    assert config_path.name in cm["data"]
    return cm


def overlay_config(vendor: str) -> str:
    """The overlay's dpkit config.yaml, as the ConfigMap generator reads it."""
    return (DEPLOY / "overlays" / vendor / "config.yaml").read_text()


def liveness_probe(vendor: str) -> Obj:
    probe: Obj = container(render(DEPLOY / "overlays" / vendor))["livenessProbe"]
    return probe
