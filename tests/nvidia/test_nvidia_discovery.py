"""Discovery through the real pynvml binding against the fake libnvidia-ml.so.1, and why GPUs are missed."""

from __future__ import annotations

import json
import logging
import os
import time

import pytest
import yaml
from fakenvml import FakeGpu, FakeMig, FakeNode, bus_id, gpu_uuid, mig_uuid

from dpkit.core.tools.cli import main as dpkit_main
from dpkit.core.vendorapi.device import Health
from dpkit.core.vendorapi.errors import VendorError
from dpkit.nvidia.vendor import NvidiaVendor

GPU = "nvidia.com/gpu"


def by_id(snapshot, resource=GPU):
    return {d.id: d for d in snapshot[resource]}


def findings(vendor):
    return [f"{f.subject}: {f.reason}" for f in vendor.explain()]


def test_discovery_reads_every_gpu_fact(host, vendors):
    host.apply(FakeNode.with_gpus(2, numa_split=1))
    snapshot = vendors(host.vendor_config()).discover()
    assert set(snapshot) == {GPU}
    devices = by_id(snapshot)
    assert list(devices) == [gpu_uuid(0), gpu_uuid(1)]
    first = devices[gpu_uuid(0)]
    assert first.health is Health.HEALTHY
    assert first.numa_nodes == (0,) and devices[gpu_uuid(1)].numa_nodes == (1,)
    assert dict(first.attributes) == {
        "product": "NVIDIA H100 80GB HBM3", "uuid": gpu_uuid(0), "index": "0", "gpu": gpu_uuid(0),
        "memory_mib": "81920", "minor": "0", "pci": bus_id(0), "driver": "550.54.15", "cuda": "12.4",
    }
    assert first.spec.env == {"NVIDIA_VISIBLE_DEVICES": gpu_uuid(0)}


def test_garbage_numa_node_in_sysfs_is_reported_not_fatal(host, vendors):
    host.apply(FakeNode.with_gpus(2))
    (host.sys / "bus/pci/devices/0000:18:00.0/numa_node").write_text("banana\n")
    vendor = vendors(host.vendor_config())
    devices = by_id(vendor.discover())
    assert devices[gpu_uuid(0)].numa_nodes == () and devices[gpu_uuid(0)].healthy
    assert devices[gpu_uuid(1)].numa_nodes == (0,)
    assert any("not a NUMA node number" in f for f in findings(vendor))


def mig_node() -> FakeNode:
    node = FakeNode.with_gpus(2)
    node.gpus[0].mig_enabled = True
    node.gpus[0].migs = [FakeMig(mig_uuid(0, 0), gi=1, ci=0), FakeMig(mig_uuid(0, 1), gi=2, ci=0),
                         FakeMig(mig_uuid(0, 2), gi=3, ci=0, gi_slices=3, ci_slices=3, memory_mb=40192)]
    return node


def test_mig_mixed_strategy_advertises_profiles_next_to_whole_gpus(host, vendors):
    host.apply(mig_node())
    snapshot = vendors(host.vendor_config(flags={"migStrategy": "mixed"})).discover()
    assert set(snapshot) == {GPU, "nvidia.com/mig-1g.10gb", "nvidia.com/mig-3g.40gb"}
    assert list(by_id(snapshot)) == [gpu_uuid(1)]
    small = by_id(snapshot, "nvidia.com/mig-1g.10gb")
    assert list(small) == [mig_uuid(0, 0), mig_uuid(0, 1)]
    attrs = small[mig_uuid(0, 1)].attributes
    assert (attrs["index"], attrs["gi"], attrs["ci"], attrs["gpu"], attrs["mig_profile"]) == (
        "0:1", "2", "0", gpu_uuid(0), "1g.10gb")
    assert small[mig_uuid(0, 1)].spec.env == {"NVIDIA_VISIBLE_DEVICES": mig_uuid(0, 1)}


def test_mig_single_strategy_needs_uniform_mig_gpus(host, vendors):
    node = mig_node()
    node.gpus[0].migs = node.gpus[0].migs[:2]
    node.gpus[1].mig_enabled = True
    node.gpus[1].migs = [FakeMig(mig_uuid(1, 0), gi=1, ci=0)]
    host.apply(node)
    vendor = vendors(host.vendor_config(flags={"migStrategy": "single"}))
    devices = by_id(vendor.discover())
    assert list(devices) == [mig_uuid(0, 0), mig_uuid(0, 1), mig_uuid(1, 0)]
    assert all(d.healthy for d in devices.values())

    node.gpus[1].mig_enabled = False  # now one GPU is whole: nothing may be handed out
    node.write()
    devices = by_id(vendor.discover())
    assert not any(d.healthy for d in devices.values())
    assert "not in MIG mode while others are" in devices[gpu_uuid(1)].reason

    node.gpus[1].mig_enabled = True  # two profiles on the node
    node.gpus[1].migs = [FakeMig(mig_uuid(1, 0), gi=1, ci=0, gi_slices=3, ci_slices=3, memory_mb=40192)]
    node.write()
    devices = by_id(vendor.discover())
    assert "needs one MIG profile on the node, found 1g.10gb, 3g.40gb" in devices[mig_uuid(0, 0)].reason


def test_mig_strategy_none_advertises_mig_gpus_whole_and_explains_misconfigurations(host, vendors):
    node = mig_node()
    node.gpus[1].mig_pending = True  # a MIG change waiting for a reset
    host.apply(node)
    vendor = vendors(host.vendor_config())
    assert list(by_id(vendor.discover())) == [gpu_uuid(0), gpu_uuid(1)]
    assert any("MIG mode change pending: disabled now, enabled after the next GPU reset" in f for f in findings(vendor))

    node.gpus[0].migs = []
    node.write()
    mixed = vendors(host.vendor_config(flags={"migStrategy": "mixed"}))
    assert set(mixed.discover()) == {GPU}
    assert any("MIG mode is enabled but no MIG devices are configured" in f for f in findings(mixed))


def test_time_slicing_replicas_and_rename_by_default(host, vendors):
    host.apply(FakeNode.with_gpus(2))
    document = {"sharing": {"timeSlicing": {"renameByDefault": True,
                                            "resources": [{"name": "nvidia.com/gpu", "replicas": 3}]}}}
    snapshot = vendors(host.vendor_config(document=document)).discover()
    assert set(snapshot) == {"nvidia.com/gpu.shared"}
    shared = by_id(snapshot, "nvidia.com/gpu.shared")
    assert list(shared) == [f"{gpu_uuid(g)}::{n}" for g in range(2) for n in range(3)]
    assert shared[f"{gpu_uuid(1)}::2"].spec.env == {"NVIDIA_VISIBLE_DEVICES": gpu_uuid(1)}
    assert shared[f"{gpu_uuid(1)}::2"].attributes["replicas"] == "3"


def test_time_slicing_a_subset_keeps_the_rest_whole(host, vendors):
    host.apply(FakeNode.with_gpus(3))
    document = {"sharing": {"timeSlicing": {"resources": [
        {"name": "gpu", "replicas": 2, "devices": [1], "rename": "gpu-shared"}]}}}
    snapshot = vendors(host.vendor_config(document=document)).discover()
    assert list(by_id(snapshot)) == [gpu_uuid(0), gpu_uuid(2)]
    assert list(by_id(snapshot, "nvidia.com/gpu-shared")) == [f"{gpu_uuid(1)}::0", f"{gpu_uuid(1)}::1"]


def test_resource_renames_by_product_pattern(host, vendors):
    node = FakeNode.with_gpus(2)
    node.gpus[1].name = "NVIDIA A100-SXM4-80GB"
    host.apply(node)
    # patterns match the whole product name, as NVIDIA's are anchored now: 'A100' alone matches nothing here
    document = {"resources": {"gpus": [{"pattern": "A100", "name": "exact"}, {"pattern": "*A100*", "name": "a100"},
                                       {"pattern": "*H100*", "name": "h100"}]}}
    vendor = vendors(host.vendor_config(document=document))
    snapshot = vendor.discover()
    assert not snapshot.get("nvidia.com/exact")
    assert list(by_id(snapshot, "nvidia.com/a100")) == [gpu_uuid(1)]
    assert list(by_id(snapshot, "nvidia.com/h100")) == [gpu_uuid(0)]
    node.gpus[0].name = "Tesla T4"
    node.write()
    assert "nvidia.com/h100" not in vendor.discover() or not vendor.discover()["nvidia.com/h100"]
    assert any("matches no resources.gpus pattern" in f for f in findings(vendor))


def test_lost_gpu_turns_unhealthy_and_recovers_with_a_log_line(host, vendors, caplog):
    node = host.apply(FakeNode.with_gpus(2))
    vendor = vendors(host.vendor_config())
    assert all(d.healthy for d in vendor.discover()[GPU])
    node.gpus[1].lost = True
    node.write()
    with caplog.at_level(logging.INFO, logger="dpkit"):
        devices = by_id(vendor.discover())
        assert devices[gpu_uuid(0)].healthy
        lost = devices[gpu_uuid(1)]
        assert lost.health is Health.UNHEALTHY and "NVML_ERROR_GPU_IS_LOST" in lost.reason
        assert lost.attributes["pci"] == bus_id(1), "a lost GPU keeps its last known facts"
        node.gpus[1].lost = False
        node.write()
        assert by_id(vendor.discover())[gpu_uuid(1)].healthy
    lines = [r.getMessage() for r in caplog.records]
    assert "GPU unusable" in lines
    assert "GPU answers NVML again; its devices are Healthy again" in lines


def test_vanished_gpu_is_simply_no_longer_advertised(host, vendors):
    node = host.apply(FakeNode.with_gpus(3))
    vendor = vendors(host.vendor_config())
    assert len(vendor.discover()[GPU]) == 3
    del node.gpus[2]
    node.write()
    assert list(by_id(vendor.discover())) == [gpu_uuid(0), gpu_uuid(1)]


def test_gpu_lost_before_first_discovery_is_explained(host, vendors):
    node = FakeNode.with_gpus(2)
    node.gpus[0].lost = True
    host.apply(node)
    vendor = vendors(host.vendor_config())
    assert list(by_id(vendor.discover())) == [gpu_uuid(1)]
    assert any(f.startswith("GPU 0: not advertised: GPU is lost") for f in findings(vendor))


def test_hung_nvml_call_marks_only_that_gpu_and_clears_when_it_returns(host, vendors):
    node = host.apply(FakeNode.with_gpus(3))
    vendor = vendors(host.vendor_config(nvml_timeout=1.0))
    vendor.discover()
    node.hangs = [("nvmlDeviceGetMinorNumber", 1)]
    node.write()
    devices = by_id(vendor.discover())
    assert [d.healthy for d in devices.values()] == [True, False, True]
    assert "NVML calls for this GPU hang" in devices[gpu_uuid(1)].reason
    again = by_id(vendor.discover())  # each discovery is a fresh subprocess: still named, still hung
    assert "NVML calls for this GPU hang" in again[gpu_uuid(1)].reason
    assert vendor.reader.last_pid is not None
    with pytest.raises(ProcessLookupError):  # the subprocess left with its stuck call; nothing piles up
        os.kill(vendor.reader.last_pid, 0)
    node.hangs = []
    node.write()
    assert by_id(vendor.discover())[gpu_uuid(1)].healthy


def test_implausible_gpu_count_reads_only_the_first_gpus(host, vendors):
    node = FakeNode.with_gpus(2)
    node.count = 4_000_000_000  # a garbage count would otherwise loop guarded calls for hours
    host.apply(node)
    vendor = vendors(host.vendor_config())
    started = time.monotonic()
    assert list(by_id(vendor.discover())) == [gpu_uuid(0), gpu_uuid(1)]
    assert time.monotonic() - started < 60  # 64 quick reads, not 4e9; generous for a loaded box
    found = findings(vendor)
    assert any(f.startswith("nvmlDeviceGetCount: NVML reports 4000000000 GPUs, more than dpkit reads (64)")
               for f in found)
    unread = [f for f in found if f.startswith("GPU ")]
    assert len(unread) == 62 and all(f"GPU {i}:" in " ".join(unread) for i in (2, 63))
    assert not any(f.startswith("GPU 64:") for f in found)


def test_malformed_uuid_from_nvml_is_not_advertised(host, vendors):
    node = FakeNode.with_gpus(2)
    node.gpus[0].uuid = "GPU-../../etc"
    host.apply(node)
    vendor = vendors(host.vendor_config())
    assert list(by_id(vendor.discover())) == [gpu_uuid(1)]
    assert any("UUID 'GPU-../../etc' from NVML is malformed" in f for f in findings(vendor))


def test_nvml_library_missing_is_explained_and_zero_gpus_advertised(host, vendors, tmp_path):
    vendor = vendors({**host.vendor_config(), "nvml_library": str(tmp_path / "libnvidia-ml.so.1")})
    assert vendor.discover() == {GPU: ()}
    assert f"NVML library: missing: {tmp_path / 'libnvidia-ml.so.1'} does not exist" in findings(vendor)
    check = next(c for c in vendor.doctor() if c.name == "NVML library loadable")
    assert not check.ok and "does not exist" in check.detail


def test_discover_says_why_nvml_is_missing_once(host, vendors, tmp_path, caplog):
    """Issue 15: `dpkit discover nvidia` printed NVML's reason twice (a log line and the finding)."""
    vendor = vendors({**host.vendor_config(), "nvml_library": str(tmp_path / "libnvidia-ml.so.1")})
    with caplog.at_level(logging.DEBUG, logger="dpkit"):
        said = findings(vendor)  # explain() discovers first, as `dpkit discover` does
    assert sum(text.count("does not exist") for text in said) == 1
    assert sum("NVML library" in text for text in said) == 1
    assert not [r for r in caplog.records if "does not exist" in r.getMessage() + str(r.__dict__.get("fields", ""))]


def test_driver_not_loaded_and_no_gpu_are_explained(host, vendors):
    node = FakeNode.with_gpus(0)
    node.init_rc = 9  # NVML_ERROR_DRIVER_NOT_LOADED
    host.apply(node)
    vendor = vendors(host.vendor_config())
    assert vendor.discover() == {GPU: ()}
    assert any("driver not loaded" in f for f in findings(vendor))
    assert not next(c for c in vendor.doctor() if c.name == "NVIDIA driver loaded").ok
    node.init_rc = 0
    node.write()
    empty = vendors(host.vendor_config())
    assert empty.discover() == {GPU: ()}
    assert any("no GPU: NVML reports 0 devices" in f for f in findings(empty))


def test_nvml_failing_after_success_keeps_the_last_list(host, vendors):
    node = host.apply(FakeNode.with_gpus(1))
    vendor = vendors(host.vendor_config(nvml_timeout=1.0))
    vendor.discover()
    node.hangs = [("nvmlDeviceGetCount", -1)]
    node.write()
    with pytest.raises(VendorError, match="NVML hangs"):
        vendor.discover()  # the manager logs this and keeps serving the last list
    node.hangs = []
    node.write()


def test_absent_device_node_is_explained_and_unhealthy_when_specs_are_passed(host, vendors):
    host.apply(FakeNode.with_gpus(2))
    (host.dev_root / "dev/nvidia1").unlink()
    plain = vendors(host.vendor_config())
    assert all(d.healthy for d in plain.discover()[GPU])
    assert any("device node" in f and "nvidia1 is absent" in f for f in findings(plain))
    assert not next(c for c in plain.doctor() if c.name == "device nodes present and accessible").ok
    passing = vendors(host.vendor_config(flags={"plugin": {"passDeviceSpecs": True}}))
    devices = by_id(passing.discover())
    assert devices[gpu_uuid(0)].healthy
    assert not devices[gpu_uuid(1)].healthy and "nvidia1 is absent" in devices[gpu_uuid(1)].reason


def test_doctor_passes_on_a_healthy_node(host, vendors):
    host.apply(FakeNode.with_gpus(2))
    checks = {c.name: c for c in vendors(host.vendor_config()).doctor()}
    assert [name for name, c in checks.items() if not c.ok] == []
    assert {"NVML library loadable", "NVIDIA driver loaded", "device nodes present and accessible"} <= set(checks)


def test_dpkit_discover_command_explains_misses(host, tmp_path, capsys):
    node = FakeNode.with_gpus(1)
    node.gpus.append(FakeGpu(gpu_uuid(1), 1, bus_id(1), mig_enabled=False, mig_pending=True))
    host.apply(node)
    (host.dev_root / "dev/nvidia1").unlink()
    config = tmp_path / "dpkit.yaml"
    config.write_text(yaml.safe_dump({"vendor": host.vendor_config()}))
    assert dpkit_main(["discover", "nvidia", "--json", "-c", str(config)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [d["id"] for d in report["resources"][0]["devices"]] == [gpu_uuid(0), gpu_uuid(1)]
    reasons = " | ".join(f["reason"] for f in report["findings"])
    assert "MIG mode change pending" in reasons and "nvidia1 is absent" in reasons
    assert report["errors"] == []


def test_dpkit_doctor_command_runs_the_nvidia_checks(host, kubelet, plugin_dir, short_tmp, tmp_path, capsys):
    host.apply(FakeNode.with_gpus(1))
    config = tmp_path / "dpkit.yaml"
    config.write_text(yaml.safe_dump({
        "plugin_dir": str(plugin_dir), "state_dir": str(short_tmp / "st"),
        "pod_resources_socket": str(short_tmp / "pr" / "kubelet.sock"), "vendor": host.vendor_config(),
    }))
    assert dpkit_main(["doctor", "nvidia", "-c", str(config)]) == 0
    out = capsys.readouterr().out
    for name in ("NVML library loadable", "NVIDIA driver loaded", "device nodes present and accessible"):
        assert f"[ok  ] {name}" in out
    (host.dev_root / "dev/nvidia0").unlink()
    assert dpkit_main(["doctor", "nvidia", "-c", str(config)]) == 1
    assert "[FAIL] device nodes present and accessible" in capsys.readouterr().out


def test_mig_capability_label_follows_nvml(host):
    """GFD's nvidia.com/mig.capable: true only when NVML answers GetMigMode for every GPU."""
    host.apply(FakeNode([FakeGpu(gpu_uuid(0), 0, bus_id(0)),
                         FakeGpu(gpu_uuid(1), 1, bus_id(1), mig_capable=False)]))
    vendor = NvidiaVendor(host.vendor_config(), environ={})
    try:
        labels = vendor.node_labels(vendor.discover())
        assert labels["nvidia.com/mig.capable"] == "false"
        assert labels["nvidia.com/gpu.count"] == "2", "a GPU without MIG is still discovered"
        host.apply(FakeNode.with_gpus(2))
        assert vendor.node_labels(vendor.discover())["nvidia.com/mig.capable"] == "true"
    finally:
        vendor.close()
