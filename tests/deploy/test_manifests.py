"""Render each kustomize overlay and check every object against the Kubernetes schema and our rules.

Rendering uses ``kustomize build`` or ``kubectl kustomize`` (skipped, with the reason, where
neither exists); the schema check uses kubernetes-validate's bundled schemas, so it is offline.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import yaml

from deploy.manifests import (
    DEPLOY,
    K8S_VERSIONS,
    NEEDS_DEV,
    PRIVILEGED,
    ROOT,
    SHIPPED,
    VENDORS,
    WRITES_SYSFS,
    Obj,
    container,
    dpkit_config_map,
    mounts,
    one,
    package_version,
    pod,
    render,
)
from dpkit.core.support.config import load_config
from dpkit.core.tools.registry import load_vendor_class
from dpkit.core.vendorapi.errors import VendorError


@pytest.fixture(scope="module")
def rendered() -> Callable[[str], list[Obj]]:
    cache: dict[str, list[Obj]] = {}

    def get(vendor: str) -> list[Obj]:
        if vendor not in cache:
            cache[vendor] = render(DEPLOY / "overlays" / vendor)
        return cache[vendor]

    return get


def test_every_vendor_package_has_an_overlay() -> None:
    packages = sorted(p.parent.name for p in (ROOT / "plugins").glob("*/pyproject.toml"))
    assert VENDORS == packages and SHIPPED <= set(VENDORS)


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_base_resources_validate_without_kustomize(version: str) -> None:
    """The base files are whole objects: the schema check needs no renderer."""
    files = yaml.safe_load((DEPLOY / "base" / "kustomization.yaml").read_text())["resources"]
    assert files
    for name in files:
        for obj in yaml.safe_load_all((DEPLOY / "base" / name).read_text()):
            kubernetes_validate.validate(obj, version, strict=True)


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("vendor", VENDORS)
def test_every_rendered_object_matches_the_kubernetes_schema(
        vendor: str, version: str, rendered: Callable[[str], list[Obj]]) -> None:
    objs = rendered(vendor)
    assert sorted(o["kind"] for o in objs).count("DaemonSet") == 1
    for obj in objs:
        assert obj["metadata"]["namespace"] == "kube-system", obj["metadata"]["name"]
        kubernetes_validate.validate(obj, version, strict=True)


def test_the_schema_check_rejects_a_broken_daemonset(rendered: Callable[[str], list[Obj]]) -> None:
    ds = json.loads(json.dumps(one(rendered("sfc"), "DaemonSet")))
    ds["spec"]["template"]["spec"]["containers"][0]["volumeMount"] = []  # a typo'd field
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(ds, K8S_VERSIONS[-1], strict=True)


@pytest.mark.parametrize("vendor", VENDORS)
def test_daemonset_schedules_on_the_vendors_pool_as_node_critical(
        vendor: str, rendered: Callable[[str], list[Obj]]) -> None:
    objs = rendered(vendor)
    ds = one(objs, "DaemonSet", "dpkit-")
    label = "dpkit.io/" + vendor.replace("_", "-")
    assert ds["metadata"]["name"] == "dpkit-" + vendor.replace("_", "-")
    spec = pod(objs)
    assert spec["priorityClassName"] == "system-node-critical"
    assert spec["nodeSelector"][label] == "true"
    tolerated = {(t.get("key"), t.get("effect")) for t in spec["tolerations"]}
    assert {(label, "NoSchedule"), ("CriticalAddonsOnly", None)} <= tolerated
    assert spec["automountServiceAccountToken"] is False
    selector = ds["spec"]["selector"]["matchLabels"]
    assert selector.items() <= ds["spec"]["template"]["metadata"]["labels"].items()
    assert selector["app.kubernetes.io/instance"] == ds["metadata"]["name"], "vendors' selectors never overlap"


@pytest.mark.parametrize("vendor", VENDORS)
def test_image_is_the_vendors_at_its_package_version(vendor: str, rendered: Callable[[str], list[Obj]]) -> None:
    image = container(rendered(vendor))["image"]
    assert image.rsplit("/", 1)[1] == f"dpkit-{vendor.replace('_', '-')}:{package_version(vendor)}"


@pytest.mark.parametrize("vendor", VENDORS)
def test_host_access_is_what_the_vendor_needs(vendor: str, rendered: Callable[[str], list[Obj]]) -> None:
    objs = rendered(vendor)
    by_path = mounts(objs)
    host = {m["volume"]["hostPath"]["path"]: m for m in by_path.values() if "hostPath" in m["volume"]}
    plugins = host["/var/lib/kubelet/device-plugins"]
    assert plugins["mountPath"] == "/var/lib/kubelet/device-plugins" and not plugins.get("readOnly")
    assert host["/var/lib/kubelet/pod-resources"].get("readOnly") is True
    assert host["/sys"]["mountPath"] == "/sys"
    assert bool(host["/sys"].get("readOnly")) == (vendor not in WRITES_SYSFS)
    assert ("/dev" in host) == (vendor in NEEDS_DEV)
    if "/dev" in host:
        assert host["/dev"]["mountPath"] == "/dev"
    for path, mount in by_path.items():
        if "emptyDir" not in mount["volume"] and "configMap" not in mount["volume"]:
            assert "hostPath" in mount["volume"], path
    mounted = {m["name"] for c in pod(objs)["containers"] for m in c["volumeMounts"]}
    assert {v["name"] for v in pod(objs)["volumes"]} == mounted, "every volume is mounted, every mount has a volume"


@pytest.mark.parametrize("vendor", VENDORS)
def test_privilege_only_where_the_device_needs_it(vendor: str, rendered: Callable[[str], list[Obj]]) -> None:
    sc = container(rendered(vendor))["securityContext"]
    assert sc["runAsUser"] == 0
    assert sc["readOnlyRootFilesystem"] is True
    if vendor in PRIVILEGED:
        assert sc["privileged"] is True
        # The API server rejects privileged together with allowPrivilegeEscalation: false.
        assert sc.get("allowPrivilegeEscalation") is not False
    else:
        assert not sc.get("privileged")
        assert sc["allowPrivilegeEscalation"] is False
        assert sc["capabilities"]["drop"] == ["ALL"]
        assert "add" not in sc["capabilities"]


@pytest.mark.parametrize("vendor", VENDORS)
def test_resources_liveness_and_metrics_port(vendor: str, rendered: Callable[[str], list[Obj]],
                                             tmp_path: Path) -> None:
    objs = rendered(vendor)
    ctr = container(objs)
    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= ctr["resources"][kind].keys()
    args = ctr["args"]
    config_path = args[args.index("--config") + 1]
    assert ctr["livenessProbe"]["exec"]["command"] == ["dpkit", "status", "--config", config_path]
    assert ctr["livenessProbe"]["timeoutSeconds"] >= 5, "python start-up plus a 3 s status query"
    state = mounts(objs)["/run/dpkit"]
    assert "emptyDir" in state["volume"] and not state.get("readOnly")

    cm = dpkit_config_map(objs)
    config_file = tmp_path / "config.yaml"
    config_file.write_text(cm["data"]["config.yaml"])
    config = load_config(config_file, environ={})
    assert config.state_dir == "/run/dpkit", "the liveness probe finds the control socket there"
    port = int(config.metrics_address.rsplit(":", 1)[1])
    assert [(p["name"], p["containerPort"]) for p in ctr["ports"]] == [("metrics", port)]
    annotations = one(objs, "DaemonSet")["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(port)
    # the plugin writes where its config says: each such host directory must be mounted there
    for directory in (config.cdi_dir, config.nfd_features_dir):
        if directory:
            mount = mounts(objs)[directory]
            assert mount["volume"]["hostPath"]["path"] == directory and not mount.get("readOnly")


def test_metrics_ports_differ_so_vendors_can_share_a_node(rendered: Callable[[str], list[Obj]]) -> None:
    ports = [container(rendered(v))["ports"][0]["containerPort"] for v in VENDORS]
    assert len(set(ports)) == len(ports)


def materialize(objs: list[Obj], root: Path) -> dict[str, Path]:
    """Write every ConfigMap volume's files under ``root``; container mount path -> local dir."""
    by_name = {o["metadata"]["name"]: o for o in objs if o["kind"] == "ConfigMap"}
    places: dict[str, Path] = {}
    for path, mount in mounts(objs).items():
        if "configMap" in mount["volume"]:
            local = root / path.strip("/").replace("/", "_")
            local.mkdir(parents=True)
            for key, text in by_name[mount["volume"]["configMap"]["name"]]["data"].items():
                (local / key).write_text(text)
            places[path] = local
    return places


def relocate(value: Any, places: dict[str, Path]) -> Any:
    """A vendor setting naming a file in a ConfigMap mount, pointed at the local copy."""
    if isinstance(value, str):
        for mount_path, local in places.items():
            if value.startswith(mount_path.rstrip("/") + "/"):
                return str(local / value[len(mount_path.rstrip("/")) + 1:])
    return value


@pytest.mark.parametrize("vendor", VENDORS)
def test_the_vendor_accepts_its_configmap(vendor: str, rendered: Callable[[str], list[Obj]],
                                         tmp_path: Path) -> None:
    objs = rendered(vendor)
    places = materialize(objs, tmp_path)
    args = container(objs)["args"]
    config_path = args[args.index("--config") + 1]
    config = load_config(relocate(config_path, places), environ={})
    try:
        vendor_class = load_vendor_class(vendor)
    except VendorError as exc:
        pytest.skip(f"the {vendor} package cannot be loaded yet: {exc}")
    settings = {key: relocate(value, places) for key, value in config.vendor.items()}
    vendor_class(settings)  # a ConfigError here names the bad key


def test_cex_mounts_the_crypto_config_sets_where_the_vendor_reads_them(
        rendered: Callable[[str], list[Obj]]) -> None:
    objs = rendered("cex")
    cm = dpkit_config_map(objs)
    vendor = yaml.safe_load(cm["data"]["config.yaml"])["vendor"]
    config_file = Path(vendor["config_file"])
    sets = mounts(objs)[str(config_file.parent)]["volume"]["configMap"]["name"]
    data = one(objs, "ConfigMap", sets)["data"]
    assert json.loads(data[config_file.name]) == {"cryptoconfigsets": []}
    assert not re.search(r"-[a-z0-9]{10}$", sets), "no hash suffix: edits reach the running plugin"
    shadow = mounts(objs)[vendor["shadow_dir"]]
    assert shadow["volume"]["hostPath"]["path"] == vendor["shadow_dir"], "containers mount it by host path"
    assert pod(objs)["nodeSelector"]["kubernetes.io/arch"] == "s390x"
