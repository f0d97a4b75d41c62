"""NVIDIA's config format as NVIDIA/k8s-device-plugin defines it, every key and shape, fed to dpkit.

The documents and the accept/reject cases below were written for this project from the upstream
reference: the Go types and their unmarshal/validation rules in ``api/config/v1`` (config.go,
flags.go, replicas.go, resources.go and resources_test.go, imex.go, sharing.go), the flags and
variables of ``cmd/nvidia-device-plugin/main.go``, and the Allocate answer built in
``internal/plugin/server.go`` (per device-list strategy, IMEX channels, GDS/MOFED CDI devices).
Each case asserts what NVIDIA's plugin does with it and what dpkit advertises and answers.
"""

from __future__ import annotations

import logging

import pytest
from fakenvml import FakeMig, FakeNode, gpu_uuid, mig_uuid

from dpkit.core.vendorapi.device import Health
from dpkit.core.vendorapi.errors import AllocationError, ConfigError
from dpkit.nvidia.config import load_settings

GPU_REF = "GPU-4cf8db2d-06c0-7d70-1a51-e59b25b2c16c"
MIG_REF = "MIG-3eb87630-93d5-b2b6-b8ff-9b359caf4ee2"
VOLUME = "/var/run/nvidia-container-devices"

#: every key of the v1 format, each set to a non-default value NVIDIA accepts
EVERY_KEY = {
    "version": "v1",
    "flags": {
        "migStrategy": "none", "failOnInitError": True, "mpsRoot": "/run/nvidia/mps",
        "nvidiaDriverRoot": "/", "gdsEnabled": True, "mofedEnabled": True, "gdrcopyEnabled": True,
        "useNodeFeatureAPI": False, "deviceDiscoveryStrategy": "auto",
        "plugin": {
            "passDeviceSpecs": True,
            "deviceListStrategy": ["envvar", "volume-mounts", "cdi-annotations", "cdi-cri"],
            "deviceIDStrategy": "uuid", "cdiAnnotationPrefix": "cdi.k8s.io/",
            "nvidiaCTKPath": "/usr/bin/nvidia-ctk", "nvidiaCDIHookPath": "/usr/bin/nvidia-cdi-hook",
            "containerDriverRoot": "/driver-root", "sharedDevicesAllocationPolicy": "packed",
        },
        "gfd": {"oneshot": False, "noTimestamp": True, "sleepInterval": "60s",
                "outputFile": "/etc/kubernetes/node-feature-discovery/features.d/gfd",
                "machineTypeFile": "/sys/class/dmi/id/product_name"},
    },
    "resources": {"gpus": [{"pattern": "*", "name": "gpu"}], "mig": [{"pattern": "1g.10gb", "name": "mig-small"}]},
    "sharing": {"timeSlicing": {"renameByDefault": False, "failRequestsGreaterThanOne": True,
                                "resources": [{"name": "nvidia.com/gpu", "replicas": 2, "devices": "all"}]}},
    "imex": {"channelIDs": [0], "required": False},
}


def settings(document, environ=None):
    return load_settings({"config": document}, environ=environ or {})


def test_every_key_is_accepted_and_acted_on_as_nvidia_does(host, vendors):
    host.apply(FakeNode.with_gpus(2))
    host.touch_node("nvidia-caps-imex-channels/channel0")
    document = {**EVERY_KEY, "flags": {**EVERY_KEY["flags"], "nvidiaDevRoot": str(host.dev_root)}}
    vendor = vendors({**host.vendor_config(), "config": document})
    s = vendor.settings
    assert (s.sharing_strategy, s.allocation_policy, s.imex_channel_ids) == ("time-slicing", "packed", (0,))
    assert any("flags.gfd is accepted but unused" in n for n in s.notes)
    snapshot = vendor.discover()
    ids = [d.id for d in snapshot["nvidia.com/gpu"]]
    assert ids == [f"{gpu_uuid(g)}::{n}" for g in range(2) for n in range(2)], "no rename: renameByDefault false"

    spec = vendor.container_spec("nvidia.com/gpu", [snapshot["nvidia.com/gpu"][0]])
    uuid0 = gpu_uuid(0)
    assert dict(spec.env) == {"NVIDIA_VISIBLE_DEVICES": VOLUME, "NVIDIA_IMEX_CHANNELS": "0", "NVIDIA_GDS": "enabled",
                              "NVIDIA_MOFED": "enabled", "NVIDIA_GDRCOPY": "enabled"}
    # volume-mounts entries are writable, as NVIDIA's Mount leaves ReadOnly false
    assert {(m.host_path, m.container_path, m.read_only) for m in spec.mounts} == {
        ("/dev/null", f"{VOLUME}/{uuid0}", False), ("/dev/null", f"{VOLUME}/imex/0", False)}
    nodes = {d.container_path: d.host_path for d in spec.devices}
    channel = "/dev/nvidia-caps-imex-channels/channel0"
    assert nodes[channel] == str(host.dev_root / channel.lstrip("/"))
    assert "/dev/nvidia0" in nodes and "/dev/nvidiactl" in nodes
    extras = ["nvidia.com/imex-channel=0", "nvidia.com/gds=all", "nvidia.com/mofed=all"]
    assert list(spec.cdi_devices) == [f"nvidia.com/gpu={uuid0}", *extras]
    (key, value), = spec.annotations.items()
    assert key.startswith("cdi.k8s.io/nvidia-device-plugin_")
    assert value.split(",") == [f"nvidia.com/gpu={uuid0}", *extras]
    with pytest.raises(AllocationError, match=r'invalid allocation request for "nvidia.com/gpu": invalid request: '
                                              r"maximum request size for shared resources is 1; found 2"):
        vendor.container_spec("nvidia.com/gpu", snapshot["nvidia.com/gpu"][:2])


@pytest.mark.parametrize("devices", ["all", 1, [0], ["0"], ["0:0"], [GPU_REF], [MIG_REF],
                                     [f"MIG-{GPU_REF}/0/0"], [0, "0:0", GPU_REF]])
def test_replica_device_selectors_nvidia_accepts(devices):
    s = settings({"sharing": {"timeSlicing": {"resources": [{"name": "gpu", "replicas": 2, "devices": devices}]}}})
    assert s.shared[0].devices == (devices if devices in ("all", 1) else tuple(str(d) for d in devices))


@pytest.mark.parametrize("devices", ["not-all", -2, 2.0, [-1], ["-1"], ["invalid-UUID"], ["GPU-UUID"], ["MIG-UUID"],
                                     [f"MIG-{GPU_REF}"], [f"MIG-{GPU_REF}/0"], [True], ["0\n"], [f"{GPU_REF}x"]])
def test_replica_device_selectors_nvidia_rejects(devices):
    with pytest.raises(ConfigError, match=r"sharing\.timeSlicing\.resources\[0\]\.devices"):
        settings({"sharing": {"timeSlicing": {"resources": [{"name": "gpu", "replicas": 2, "devices": devices}]}}})


@pytest.mark.parametrize(("document", "needle"), [
    ({"sharing": {"timeSlicing": {"resources": [{"name": "valid", "devices": "all", "rename": "v-shared"}]}}},
     "resources[0].replicas': required"),
    ({"sharing": {"timeSlicing": {"resources": [{"name": "valid", "replicas": 0}]}}}, "from 2 to 1024, got 0"),
    ({"sharing": {"timeSlicing": {"resources": [{"name": "valid", "replicas": -1}]}}}, "from 2 to 1024, got -1"),
    ({"sharing": {"timeSlicing": {"resources": [{"name": "$invalid$", "replicas": 2}]}}}, "resources[0].name"),
    ({"sharing": {"timeSlicing": {"resources": [{"name": "valid", "replicas": 2, "rename": "$invalid$"}]}}},
     "resources[0].rename"),
    ({"sharing": {"mps": {"resources": [{"name": "gpu", "replicas": 2}]}}}, "using MPS requires mpsRoot"),
    ({"flags": {"migStrategy": "mixed", "mpsRoot": "/run/nvidia/mps"},
      "sharing": {"mps": {"resources": [{"name": "gpu", "replicas": 2}]}}}, "migStrategy mixed is not supported"),
    ({"imex": {"channelIDs": [0, 1]}}, "channelIDs must be [] or [0]; found [0, 1]"),
    ({"imex": {"channelIDs": ["0"]}}, "'imex.channelIDs[0]': expected an integer"),
    ({"resources": {"gpus": [{"name": "gpu"}]}}, "'resources.gpus[0].pattern': required"),
    ({"flags": {"plugin": {"sharedDevicesAllocationPolicy": "spread"}}},
     "'flags.plugin.sharedDevicesAllocationPolicy': expected one of distributed, packed"),
    ({"flags": {"plugin": {"deviceIDStrategy": "serial"}}},
     "'flags.plugin.deviceIDStrategy': expected one of index, uuid"),
    ({"version": "v2"}, "unknown version"),
])
def test_documents_nvidia_rejects_are_rejected_naming_the_key(document, needle):
    with pytest.raises(ConfigError) as err:
        settings(document)
    assert needle in str(err.value)


def test_shapes_nvidia_accepts():
    assert settings({"flags": {"plugin": {"deviceListStrategy": "cdi-cri"}}}).list_strategies == ("cdi-cri",)
    assert settings({"version": "v1"}) == settings({}), "a missing version means v1, as NVIDIA's loader says"
    assert settings({"version": "v1", "imex": {"channelIDs": []}}).imex_channel_ids == ()
    mps = settings({"flags": {"mpsRoot": "/run/nvidia/mps"}, "sharing": {"mps": {"renameByDefault": True, "resources": [
        {"name": "nvidia.com/gpu", "replicas": 3}]}, "timeSlicing": {"resources": [{"name": "gpu", "replicas": 2}]}}})
    assert mps.sharing_strategy == "mps" and mps.shared[0].rename == "nvidia.com/gpu.shared"
    assert mps.shared[0].replicas == 3
    assert any("sharing.timeSlicing is ignored" in w for w in mps.warnings), "MPS wins over time-slicing, as NVIDIA's"
    # NVIDIA's NewConfig: MPS keeps refusing requests above one replica unless the config relaxes it
    assert mps.fail_requests_greater_than_one
    relaxed = settings({"flags": {"mpsRoot": "/run/nvidia/mps"}, "sharing": {"mps": {
        "failRequestsGreaterThanOne": False, "resources": [{"name": "nvidia.com/gpu", "replicas": 3}]}}})
    assert relaxed.sharing_strategy == "mps" and not relaxed.fail_requests_greater_than_one


def test_resource_patterns_are_anchored_like_nvidias():
    s = settings({"resources": {"mig": [{"pattern": "1g.24gb", "name": "small"}, {"pattern": "*gb", "name": "gb"}]}})
    exact, suffix = s.mig_rules
    assert exact.matches("1g.24gb") and not exact.matches("1g.24gb-me") and not exact.matches("x1g.24gb")
    assert not exact.matches("1g.24gb+me.all") and suffix.matches("1g.24gb") and not suffix.matches("1g.24gb-me")


def test_environment_edge_cases_like_nvidias_cli():
    on = {"flags": {"plugin": {"passDeviceSpecs": True, "deviceListStrategy": "volume-mounts"}}}
    s = settings(on, {"PASS_DEVICE_SPECS": "", "DEVICE_LIST_STRATEGY": "", "IMEX_REQUIRED": " "})
    assert s.pass_device_specs is True and s.list_strategies == ("volume-mounts",), "empty variables are unset"
    s = settings({}, {"SHARED_DEVICES_ALLOCATION_POLICY": "packed", "MPS_ROOT": "/run/nvidia/mps",
                      "KUBELET_SOCKET": "/var/lib/kubelet/device-plugins/kubelet.sock", "GFD_ONESHOT": "true",
                      "NVIDIA_CTK_PATH": "/usr/bin/nvidia-ctk"})
    assert s.allocation_policy == "packed" and s.mps_root == "/run/nvidia/mps"
    warned = " | ".join(s.warnings)
    for name in ("KUBELET_SOCKET", "GFD_ONESHOT", "NVIDIA_CTK_PATH"):
        assert f"environment {name}" in warned, f"{name} is warned about, not dropped"


def test_unused_variables_are_warned_about_once(host, vendors, caplog):
    host.apply(FakeNode.with_gpus(1))
    with caplog.at_level(logging.WARNING, logger="dpkit"):
        vendor = vendors(host.vendor_config(), environ={"KUBELET_SOCKET": "/x/kubelet.sock"})
        for _ in range(3):
            vendor.discover()
    assert sum("KUBELET_SOCKET" in r.getMessage() for r in caplog.records) == 1


def test_packed_policy_fills_a_gpu_before_the_next(host, vendors):
    host.apply(FakeNode.with_gpus(2))
    for policy, expected in (("distributed", gpu_uuid(1)), ("packed", gpu_uuid(0))):
        document = {"flags": {"plugin": {"sharedDevicesAllocationPolicy": policy}},
                    "sharing": {"timeSlicing": {"resources": [{"name": "gpu", "replicas": 4}]}}}
        vendor = vendors(host.vendor_config(document=document))
        replicas = vendor.discover()["nvidia.com/gpu"]
        available = [d for d in replicas if d.id != f"{gpu_uuid(0)}::0"]  # one replica of GPU 0 is held
        (chosen,) = vendor.preferred_allocation("nvidia.com/gpu", available, [], 1)
        assert chosen.split("::")[0] == expected, policy


def test_imex_channels_missing_and_required(host, vendors):
    host.apply(FakeNode.with_gpus(1))
    optional = vendors(host.vendor_config(document={"imex": {"channelIDs": [0]}}))
    (device,) = optional.discover()["nvidia.com/gpu"]
    assert device.healthy and "NVIDIA_IMEX_CHANNELS" not in optional.container_spec("nvidia.com/gpu", [device]).env
    required = vendors(host.vendor_config(document={"imex": {"channelIDs": [0], "required": True}}))
    (device,) = required.discover()["nvidia.com/gpu"]
    assert device.health is Health.UNHEALTHY and "required IMEX channel 0 is missing" in device.reason
    host.touch_node("nvidia-caps-imex-channels/channel0")
    (device,) = required.discover()["nvidia.com/gpu"]
    assert device.healthy
    assert required.container_spec("nvidia.com/gpu", [device]).env["NVIDIA_IMEX_CHANNELS"] == "0"


def test_mps_refuses_mig_devices_as_nvidia_does(host, vendors, short_tmp):
    node = FakeNode.with_gpus(1, mig_enabled=True)
    node.gpus[0].migs = [FakeMig(mig_uuid(0, 0), gi=1, ci=0)]
    host.apply(node)
    document = {"flags": {"migStrategy": "single", "mpsRoot": str(short_tmp)},
                "sharing": {"mps": {"resources": [{"name": "nvidia.com/gpu", "replicas": 2}]}}}
    vendor = vendors(host.vendor_config(document=document, mps_container_root=str(short_tmp)))
    devices = vendor.discover()["nvidia.com/gpu"]
    assert devices and all("sharing using MPS is not supported for MIG devices" in d.reason for d in devices)


def test_a_key_left_empty_inside_a_list_item_reads_as_absent_as_nvidias_loader():
    """A Helm-rendered `rename:` or `devices:` with no value is not set, in list items too."""
    shared = settings({"sharing": {"timeSlicing": {"resources": [
        {"name": "nvidia.com/gpu", "replicas": 4, "rename": None, "devices": None}]}}}).shared[0]
    assert (shared.replicas, shared.rename, shared.devices) == (4, "", "all")
    with pytest.raises(ConfigError, match="deviceListStrategy"):  # a null list item itself stays an error
        settings({"flags": {"plugin": {"deviceListStrategy": ["envvar", None]}}})
