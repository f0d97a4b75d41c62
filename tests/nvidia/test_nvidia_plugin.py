"""The NVIDIA vendor end to end: Manager + emulated kubelet over real sockets, fake NVML, real probe process."""

from __future__ import annotations

import json
import os
import signal

import grpc
import pytest
from fakenvml import DBE_EVENT, FakeMig, FakeNode, gpu_uuid, mig_uuid

from dpkit.core.engine.manager import Manager
from dpkit.core.integrations.observers import attach_observers
from dpkit.nvidia.vendor import NvidiaVendor

GPU = "nvidia.com/gpu"


def devices_of(manager, resource=GPU):
    return {d["id"]: d for r in manager.status()["resources"] if r["name"] == resource for d in r["devices"]}


def health(kubelet, resource, device_id):
    state = kubelet.devices(resource).get(device_id)
    return state.health if state else None


def nvlinked_pairs(count: int) -> FakeNode:
    """GPUs 0-1 and 2-3 joined by NVLink; GPU 0 and 3 share NUMA 0 with 1, 2 on NUMA 1."""
    node = FakeNode.with_gpus(count, numa_split=count // 2)
    for a, b in ((0, 1), (2, 3)):
        node.gpus[a].nvlinks = [node.gpus[b].bus_id] * 4
        node.gpus[b].nvlinks = [node.gpus[a].bus_id] * 4
    return node


def test_gpus_register_and_allocate_the_nvlinked_pair(host, kubelet, run_manager):
    host.apply(nvlinked_pairs(4))
    manager = run_manager(NvidiaVendor(host.vendor_config(), environ={}))
    assert kubelet.wait_for(lambda k: k.allocatable(GPU) == 4, 10)
    chosen, response = kubelet.allocate(GPU, 2, pod="a")
    assert sorted(chosen) == [gpu_uuid(0), gpu_uuid(1)]
    assert response.envs["NVIDIA_VISIBLE_DEVICES"] == ",".join(chosen)
    chosen, _ = kubelet.allocate(GPU, 2, pod="b")
    assert sorted(chosen) == [gpu_uuid(2), gpu_uuid(3)]
    assert manager.status()["probes"][0]["name"] == "nvml-health"


@pytest.mark.parametrize("strategy", ["envvar", "volume-mounts", "cdi-annotations", "cdi-cri"])
def test_each_device_list_strategy(host, kubelet, run_manager, strategy):
    host.apply(FakeNode.with_gpus(2))
    flags = {"plugin": {"deviceListStrategy": strategy, "passDeviceSpecs": True}}
    run_manager(NvidiaVendor(host.vendor_config(flags=flags), environ={}))
    assert kubelet.wait_for(lambda k: k.allocatable(GPU) == 2, 10)
    chosen, r = kubelet.allocate(GPU, 2)
    ids = [gpu_uuid(0), gpu_uuid(1)]
    assert sorted(chosen) == ids
    nodes = {d.container_path: d.host_path for d in r.devices}
    if strategy == "envvar":
        assert sorted(r.envs["NVIDIA_VISIBLE_DEVICES"].split(",")) == ids
        assert not r.mounts and not r.annotations and not r.cdi_devices
    elif strategy == "volume-mounts":
        assert r.envs["NVIDIA_VISIBLE_DEVICES"] == "/var/run/nvidia-container-devices"
        assert sorted(m.container_path for m in r.mounts) == [f"/var/run/nvidia-container-devices/{i}" for i in ids]
        assert {m.host_path for m in r.mounts} == {"/dev/null"}
    elif strategy == "cdi-annotations":
        (key, value), = r.annotations.items()
        assert key.startswith("cdi.k8s.io/nvidia-device-plugin_")
        assert sorted(value.split(",")) == [f"nvidia.com/gpu={i}" for i in ids]
        assert "NVIDIA_VISIBLE_DEVICES" not in r.envs and not nodes, "CDI-only: the CDI spec provides the rest"
    else:
        assert sorted(c.name for c in r.cdi_devices) == [f"nvidia.com/gpu={i}" for i in ids]
        assert not r.annotations and not nodes
    if not strategy.startswith("cdi-"):
        dev = host.dev_root / "dev"
        assert nodes == {"/dev/nvidiactl": str(dev / "nvidiactl"), "/dev/nvidia-uvm": str(dev / "nvidia-uvm"),
                         "/dev/nvidia-uvm-tools": str(dev / "nvidia-uvm-tools"),
                         "/dev/nvidia0": str(dev / "nvidia0"), "/dev/nvidia1": str(dev / "nvidia1")}


def test_mig_devices_by_index_with_capability_nodes(host, kubelet, run_manager):
    node = FakeNode.with_gpus(1, mig_enabled=True)
    node.gpus[0].migs = [FakeMig(mig_uuid(0, 0), gi=1, ci=0), FakeMig(mig_uuid(0, 1), gi=2, ci=0)]
    host.apply(node)
    flags = {"migStrategy": "mixed", "plugin": {"deviceIDStrategy": "index", "passDeviceSpecs": True}}
    run_manager(NvidiaVendor(host.vendor_config(flags=flags), environ={}))
    resource = "nvidia.com/mig-1g.10gb"
    assert kubelet.wait_for(lambda k: k.allocatable(resource) == 2, 10)
    chosen, r = kubelet.allocate(resource, 1)
    index = "0:0" if chosen == [mig_uuid(0, 0)] else "0:1"
    assert r.envs["NVIDIA_VISIBLE_DEVICES"] == index
    paths = sorted(d.container_path for d in r.devices)
    # mig-minors written by FakeHost: gi1 -> 3, gi1/ci0 -> 4, gi2 -> 5, gi2/ci0 -> 6
    caps = ["/dev/nvidia-caps/nvidia-cap3", "/dev/nvidia-caps/nvidia-cap4"] if index == "0:0" else \
        ["/dev/nvidia-caps/nvidia-cap5", "/dev/nvidia-caps/nvidia-cap6"]
    assert paths == sorted([*caps, "/dev/nvidia0", "/dev/nvidia-uvm", "/dev/nvidia-uvm-tools", "/dev/nvidiactl"])


def test_shared_gpus_spread_and_refuse_requests_above_one(host, kubelet, run_manager):
    host.apply(FakeNode.with_gpus(2))
    document = {"sharing": {"timeSlicing": {"renameByDefault": True, "failRequestsGreaterThanOne": True,
                                            "resources": [{"name": "nvidia.com/gpu", "replicas": 4}]}}}
    run_manager(NvidiaVendor(host.vendor_config(document=document), environ={}))
    shared = "nvidia.com/gpu.shared"
    assert kubelet.wait_for(lambda k: k.allocatable(shared) == 8, 10)
    first, r1 = kubelet.allocate(shared, 1, pod="a")
    second, _ = kubelet.allocate(shared, 1, pod="b")
    assert {first[0].split("::")[0], second[0].split("::")[0]} == {gpu_uuid(0), gpu_uuid(1)}, "replicas spread"
    assert r1.envs["NVIDIA_VISIBLE_DEVICES"] == first[0].split("::")[0]
    with pytest.raises(grpc.RpcError) as err:
        kubelet.allocate(shared, 2, pod="c")
    assert "maximum request size for shared resources is 1" in err.value.details()


def test_critical_xid_marks_the_gpu_unhealthy_and_application_xids_are_ignored(host, kubelet, run_manager):
    node = host.apply(FakeNode.with_gpus(3))
    manager = run_manager(NvidiaVendor(host.vendor_config(), environ={}))
    assert kubelet.wait_for(lambda k: k.allocatable(GPU) == 3, 10)
    assert kubelet.wait_for(lambda k: manager.probes.probes["nvml-health"].beats > 2, 15)
    node.xid(0, 13)  # graphics engine exception: caused by an application
    node.xid(1, 79)  # fallen off the bus
    assert kubelet.wait_for(lambda k: health(k, GPU, gpu_uuid(1)) == "Unhealthy", 15)
    assert health(kubelet, GPU, gpu_uuid(0)) == "Healthy"
    assert kubelet.allocatable(GPU) == 2
    assert devices_of(manager)[gpu_uuid(1)]["reason"] == "XID 79 (critical error) reported by NVML"
    node.deliver(2, DBE_EVENT, 0)
    assert kubelet.wait_for(lambda k: health(k, GPU, gpu_uuid(2)) == "Unhealthy", 15)
    assert "double-bit ECC" in devices_of(manager)[gpu_uuid(2)]["reason"]


def test_extra_ignored_and_explicitly_enabled_xids(host, kubelet, run_manager, monkeypatch):
    monkeypatch.setenv("DP_DISABLE_HEALTHCHECKS", "48")
    monkeypatch.setenv("DP_ENABLE_HEALTHCHECKS", "13")
    node = host.apply(FakeNode.with_gpus(2))
    manager = run_manager(NvidiaVendor(host.vendor_config()))
    assert kubelet.wait_for(lambda k: manager.probes.probes["nvml-health"].beats > 2, 15)
    node.xid(0, 48)  # ignored by DP_DISABLE_HEALTHCHECKS
    node.xid(1, 13)  # ignored by default, enabled by DP_ENABLE_HEALTHCHECKS
    assert kubelet.wait_for(lambda k: health(k, GPU, gpu_uuid(1)) == "Unhealthy", 15)
    assert health(kubelet, GPU, gpu_uuid(0)) == "Healthy"


def test_mig_xid_marks_only_the_mig_device_it_names(host, kubelet, run_manager):
    node = FakeNode.with_gpus(1, mig_enabled=True)
    node.gpus[0].migs = [FakeMig(mig_uuid(0, 0), gi=1, ci=0), FakeMig(mig_uuid(0, 1), gi=2, ci=0)]
    host.apply(node)
    manager = run_manager(NvidiaVendor(host.vendor_config(flags={"migStrategy": "mixed"}), environ={}))
    resource = "nvidia.com/mig-1g.10gb"
    assert kubelet.wait_for(lambda k: k.allocatable(resource) == 2, 10)
    assert kubelet.wait_for(lambda k: manager.probes.probes["nvml-health"].beats > 2, 15)
    node.xid(0, 94, gi=2, ci=0)
    assert kubelet.wait_for(lambda k: health(k, resource, mig_uuid(0, 1)) == "Unhealthy", 15)
    assert health(kubelet, resource, mig_uuid(0, 0)) == "Healthy"
    node.xid(0, 79)  # no instance named: the whole GPU
    assert kubelet.wait_for(lambda k: k.allocatable(resource) == 0, 15)


def test_lost_gpu_is_unhealthy_and_a_reset_gpu_is_healthy_again(host, kubelet, run_manager, capfd):
    node = host.apply(FakeNode.with_gpus(2))
    manager = run_manager(NvidiaVendor(host.vendor_config(), environ={}))
    assert kubelet.wait_for(lambda k: manager.probes.probes["nvml-health"].beats > 2, 15)
    node.xid(1, 79)
    assert kubelet.wait_for(lambda k: health(k, GPU, gpu_uuid(1)) == "Unhealthy", 15)
    node.gpus[1].lost = True  # the GPU drops off the bus...
    node.write()
    seen_by_probe = "XID 79 (critical error) reported by NVML; GPU is lost (NVML_ERROR_GPU_IS_LOST)"
    assert kubelet.wait_for(lambda k: seen_by_probe in devices_of(manager)[gpu_uuid(1)]["reason"], 15)
    node.gpus[1].lost = False  # ...and comes back after a reset
    node.write()
    assert kubelet.wait_for(lambda k: health(k, GPU, gpu_uuid(1)) == "Healthy", 15)
    assert kubelet.allocatable(GPU) == 2
    err = capfd.readouterr().err
    assert "GPU answers NVML again after going away (a reset or recovery); marking its devices Healthy again" in err
    assert "cleared=lost,xid" in err


def test_hung_nvml_call_marks_the_gpu_unhealthy_until_it_returns(host, kubelet, run_manager):
    node = host.apply(FakeNode.with_gpus(2))
    manager = run_manager(NvidiaVendor(host.vendor_config(nvml_timeout=1.0), environ={}))
    assert kubelet.wait_for(lambda k: manager.probes.probes["nvml-health"].beats > 2, 15)
    node.hangs = [("nvmlDeviceGetName", 0)]
    node.write()
    assert kubelet.wait_for(lambda k: health(k, GPU, gpu_uuid(0)) == "Unhealthy", 15)
    assert health(kubelet, GPU, gpu_uuid(1)) == "Healthy"
    assert "hang" in devices_of(manager)[gpu_uuid(0)]["reason"]
    assert not manager.probes.probes["nvml-health"].silent, "the probe keeps beating while one GPU hangs"
    node.hangs = []
    node.write()
    assert kubelet.wait_for(lambda k: health(k, GPU, gpu_uuid(0)) == "Healthy", 15)


def test_xid_mark_survives_a_probe_restart(host, kubelet, run_manager):
    node = host.apply(FakeNode.with_gpus(2))
    manager = run_manager(NvidiaVendor(host.vendor_config(), environ={}))
    state = manager.probes.probes["nvml-health"]
    assert kubelet.wait_for(lambda k: state.beats > 2, 15)
    node.xid(0, 79)
    assert kubelet.wait_for(lambda k: health(k, GPU, gpu_uuid(0)) == "Unhealthy", 15)
    first = state.process
    assert first is not None
    os.kill(first.pid, signal.SIGKILL)  # the probe our manager started dies
    assert kubelet.wait_for(lambda k: state.restarts >= 1 and state.process is not None
                            and state.process.pid != first.pid and not state.silent, 20)
    beats = state.beats
    assert kubelet.wait_for(lambda k: state.beats > beats + 3, 15)
    assert health(kubelet, GPU, gpu_uuid(0)) == "Unhealthy"
    assert devices_of(manager)[gpu_uuid(0)]["reason"] == "XID 79 (critical error) reported by NVML"
    assert health(kubelet, GPU, gpu_uuid(1)) == "Healthy"


def test_health_checks_can_be_disabled_like_nvidia(host, kubelet, run_manager, monkeypatch):
    monkeypatch.setenv("DP_DISABLE_HEALTHCHECKS", "all")
    host.apply(FakeNode.with_gpus(1))
    manager = run_manager(NvidiaVendor(host.vendor_config()))
    assert kubelet.wait_for(lambda k: k.allocatable(GPU) == 1, 10)
    assert manager.status()["probes"] == []


def test_core_cdi_spec_kind_does_not_collide_with_the_toolkits(host):
    host.apply(FakeNode.with_gpus(1))
    vendor = NvidiaVendor(host.vendor_config(flags={"plugin": {"deviceListStrategy": "cdi-cri"}}), environ={})
    try:
        (device,) = vendor.discover()[GPU]
        assert device.spec.cdi_devices == (f"nvidia.com/gpu={gpu_uuid(0)}",), "names the toolkit's spec"
        assert vendor.cdi_kind(GPU) == "dpkit.io/nvidia.gpu"
        assert vendor.cdi_kind("nvidia.com/mig-1g.10gb") == "dpkit.io/nvidia.mig-1g.10gb"
    finally:
        vendor.close()


def test_core_cdi_files_and_node_labels_with_the_nvidia_vendor(host, kubelet, make_config, short_tmp):
    host.apply(FakeNode.with_gpus(2))
    config = make_config(cdi_dir=str(short_tmp / "cdi"), nfd_features_dir=str(short_tmp / "nfd"))
    flags = {"plugin": {"passDeviceSpecs": True}}
    manager = Manager(NvidiaVendor(host.vendor_config(flags=flags), environ={}), config)
    attach_observers(manager)
    manager.start()
    try:
        assert kubelet.wait_for(lambda k: k.allocatable(GPU) == 2, 10)
        spec_file = short_tmp / "cdi" / "dpkit-nvidia-nvidia.com_gpu.json"
        assert kubelet.wait_for(lambda k: spec_file.exists(), 10)
        spec = json.loads(spec_file.read_text())
        assert spec["kind"] == "dpkit.io/nvidia.gpu"
        assert sorted(d["name"] for d in spec["devices"]) == [gpu_uuid(0), gpu_uuid(1)]
        labels = "".join(p.read_text() for p in (short_tmp / "nfd").glob("*"))
        assert "nvidia.com/gpu.product=NVIDIA-H100-80GB-HBM3" in labels and "nvidia.com/gpu.count=2" in labels
    finally:
        manager.stop()
