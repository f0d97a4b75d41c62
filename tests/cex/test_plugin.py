"""The cex vendor under the real core: emulated kubelet, manager, gRPC over unix sockets."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest

from cex.aptree import STANDARD_SETS, ApTree, FakeZcryptKernel, mask, write_sets
from dpkit.cex.vendor import CexVendor
from dpkit.core.api.v1beta1 import api_pb2
from dpkit.core.engine.manager import Manager
from dpkit.core.tools.kubelet import Kubelet

CCA, EP11, GREEN = "cex.s390.ibm.com/cca-blue", "cex.s390.ibm.com/ep11-red", "cex.s390.ibm.com/any-green"


@pytest.fixture
def start(make_vendor: Callable[..., CexVendor], run_manager: Callable[..., Manager], kubelet: Kubelet,
          short_tmp: Path) -> Callable[..., tuple[CexVendor, Manager]]:
    """Run the cex vendor against the emulated kubelet (and its pod-resources API)."""
    def run(**overrides: Any) -> tuple[CexVendor, Manager]:
        settings = {"pod_resources_socket": str(short_tmp / "pr" / "kubelet.sock"), "poll_interval": 0.2, **overrides}
        vendor = make_vendor(**settings)
        manager = run_manager(vendor)
        assert kubelet.wait_for(lambda k: k.allocatable(CCA) == 6 and k.allocatable(EP11) == 1
                                and k.registered(GREEN))
        return vendor, manager

    return run


def _health(kubelet: Kubelet, resource: str, *ids: str) -> set[str]:
    devices = kubelet.devices(resource)
    return {devices[i].health for i in ids if i in devices}


def test_allocate_gives_the_container_its_own_restricted_z90crypt(
        start: Callable[..., tuple[CexVendor, Manager]], kubelet: Kubelet, kernel: FakeZcryptKernel,
        tree: ApTree, tmp_path: Path) -> None:
    start()
    assert kubelet.capacity(GREEN) == 0 and kubelet.endpoints[CCA].options.pre_start_required
    ids, response = kubelet.allocate(CCA, 2, pod="p1", namespace="blue")
    assert sorted(ids) == ["apqn-1-5-0", "apqn-2-5-0"]          # one domain, two adapters
    [device] = response.devices
    assert (device.container_path, device.host_path, device.permissions) == (
        "/dev/z90crypt", str(tmp_path / "dev" / "zcrypt-apqn-1-5-0"), "rw")
    assert dict(response.envs) == {"CEX_APQNS": "01.0005,02.0005", "CEX_MODE": "cca", "CEX_CONFIGSET": "cca-blue"}
    assert [m.container_path for m in response.mounts] == [
        "/sys/bus/ap", "/sys/devices/ap", "/sys/bus/ap/devices/01.0005", "/sys/bus/ap/devices/02.0005"]
    assert all(m.read_only for m in response.mounts)
    node = kernel.node("zcrypt-apqn-1-5-0")
    assert (node / "apmask").read_text() == mask({1, 2}) + "\n" and (node / "aqmask").read_text() == mask({5}) + "\n"
    ids2, response2 = kubelet.allocate(CCA, 1, pod="p2", namespace="blue")
    assert ids2 == ["apqn-1-6-0"]                                 # the least shared APQN
    assert response2.devices[0].host_path.endswith("zcrypt-apqn-1-6-0")
    assert kernel.created == ["zcrypt-apqn-1-5-0", "zcrypt-apqn-1-6-0"]


def test_an_apqn_going_offline_is_unhealthy_within_a_poll_and_recovers(
        start: Callable[..., tuple[CexVendor, Manager]], kubelet: Kubelet, tree: ApTree) -> None:
    start(poll_interval=0.2)
    tree.set("01.0005", "online", "0")
    assert kubelet.wait_for(lambda k: _health(k, CCA, "apqn-1-5-0", "apqn-1-5-1") == {"Unhealthy"}, timeout=10)
    assert kubelet.allocatable(CCA) == 4
    tree.set("card02", "chkstop", "1")
    tree.set("03.0005", "config", "0")
    assert kubelet.wait_for(lambda k: k.allocatable(CCA) == 2 and k.allocatable(EP11) == 0, timeout=10)
    for name, attr, value in (("01.0005", "online", "1"), ("card02", "chkstop", "0"), ("03.0005", "config", "1")):
        tree.set(name, attr, value)
    assert kubelet.wait_for(lambda k: k.allocatable(CCA) == 6 and k.allocatable(EP11) == 1, timeout=10)


def test_hot_unplug_and_plug_change_capacity(start: Callable[..., tuple[CexVendor, Manager]], kubelet: Kubelet,
                                             tree: ApTree) -> None:
    start()
    tree.remove("01.0006")
    assert kubelet.wait_for(lambda k: k.capacity(CCA) == 4, timeout=10)
    tree.queue(1, 6)
    assert kubelet.wait_for(lambda k: k.allocatable(CCA) == 6, timeout=10)


def test_a_node_no_container_uses_any_more_is_removed(
        start: Callable[..., tuple[CexVendor, Manager]], kubelet: Kubelet, kernel: FakeZcryptKernel,
        tmp_path: Path) -> None:
    start(reconcile_interval=0.2, delete_unused_after=0, delete_never_used_after=3)
    [a], _ = kubelet.allocate(CCA, 1, pod="a", namespace="blue")
    [b], _ = kubelet.allocate(EP11, 1, pod="b", namespace="red")
    assert (tmp_path / "shadow" / f"sysfs-{a}").is_dir()
    kubelet.release("a", "blue")
    assert kernel.wait_for(lambda k: f"zcrypt-{a}" in k.destroyed and not (tmp_path / "shadow" / f"sysfs-{a}").exists(),
                           timeout=15)
    assert kernel.node(f"zcrypt-{b}").is_dir() and (tmp_path / "shadow" / f"sysfs-{b}").is_dir()
    assert kernel.destroyed == [f"zcrypt-{a}"]


def test_pre_start_remakes_a_node_lost_since_allocate(
        start: Callable[..., tuple[CexVendor, Manager]], kubelet: Kubelet, kernel: FakeZcryptKernel,
        tmp_path: Path) -> None:
    vendor, _ = start()
    ids, _ = kubelet.allocate(EP11, 1, pod="b", namespace="red")
    vendor.keeper.remove(ids[0])                                   # as after a node reboot
    assert not kernel.node(f"zcrypt-{ids[0]}").exists()
    kubelet.stub(EP11).PreStartContainer(api_pb2.PreStartContainerRequest(devices_ids=ids), timeout=10)
    assert kernel.node(f"zcrypt-{ids[0]}").is_dir() and (tmp_path / "shadow" / f"sysfs-{ids[0]}").is_dir()
    assert (kernel.node(f"zcrypt-{ids[0]}") / "apmask").read_text() == mask({3}) + "\n"


def test_apqns_that_would_open_others_fail_allocate_with_the_reason(
        start: Callable[..., tuple[CexVendor, Manager]], kubelet: Kubelet, kernel: FakeZcryptKernel) -> None:
    start()
    request = api_pb2.AllocateRequest(container_requests=[
        api_pb2.ContainerAllocateRequest(devices_ids=["apqn-2-5-0", "apqn-1-6-0"])])
    with pytest.raises(grpc.RpcError) as failure:
        kubelet.stub(CCA).Allocate(request, timeout=10)
    assert failure.value.code() is grpc.StatusCode.INTERNAL
    assert "cannot share one zcrypt node" in (failure.value.details() or "")
    assert kernel.created == []


def test_config_map_changes_add_and_remove_sets_and_bad_ones_are_rejected(
        start: Callable[..., tuple[CexVendor, Manager]], kubelet: Kubelet, config_file: Path) -> None:
    _, manager = start(config_check_interval=0.2)
    write_sets(config_file, [STANDARD_SETS[0], {"setname": "new", "project": "p", "overcommit": 3,
                                                "apqns": [{"adapter": 2, "domain": 6}]}])
    assert kubelet.wait_for(lambda k: k.allocatable("cex.s390.ibm.com/new") == 3 and not k.registered(EP11)
                            and not k.registered(GREEN), timeout=10)
    dup = {"setname": "dup", "project": "p", "apqns": [{"adapter": 1, "domain": 5}]}
    write_sets(config_file, [STANDARD_SETS[0], dup])
    assert kubelet.wait_for(lambda k: any("change rejected" in e["msg"] for e in manager.status()["errors"]),
                            timeout=10)
    assert kubelet.registered("cex.s390.ibm.com/new") and not kubelet.registered("cex.s390.ibm.com/dup")


def test_a_set_used_from_another_namespace_is_reported(
        start: Callable[..., tuple[CexVendor, Manager]], kubelet: Kubelet, kernel: FakeZcryptKernel) -> None:
    _, manager = start(reconcile_interval=0.2)
    kubelet.allocate(CCA, 1, pod="intruder", namespace="red")
    assert kubelet.wait_for(lambda k: any(e["msg"] == "container uses a crypto config set of another project"
                                          and e.get("namespace") == "red" for e in manager.status()["errors"]),
                            timeout=10)
