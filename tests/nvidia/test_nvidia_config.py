"""NVIDIA's v1 config file and environment variables: accepted as NVIDIA writes them, typos rejected."""

from __future__ import annotations

import pytest

from dpkit.core.vendorapi.errors import ConfigError
from dpkit.nvidia.config import SharedResource, load_settings, mig_resource
from dpkit.nvidia.xids import APPLICATION_XIDS, policy_from_env

GPU_REF = "GPU-4cf8db2d-06c0-7d70-1a51-e59b25b2c16c"
NVIDIA_EXAMPLE = """
version: v1
flags:
  migStrategy: "mixed"
  failOnInitError: true
  nvidiaDriverRoot: "/run/nvidia/driver"
  plugin:
    passDeviceSpecs: true
    deviceListStrategy: ["envvar", "cdi-annotations"]
    deviceIDStrategy: "index"
  gfd:
    oneshot: false
    sleepInterval: 60s
sharing:
  timeSlicing:
    renameByDefault: true
    failRequestsGreaterThanOne: true
    resources:
    - name: nvidia.com/gpu
      replicas: 4
"""


def test_nvidia_config_file_is_read_as_nvidia_documents_it(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text(NVIDIA_EXAMPLE)
    s = load_settings({"config_file": str(path)}, environ={})
    assert s.mig_strategy == "mixed"
    assert s.driver_root == "/run/nvidia/driver"
    assert s.dev_root == "/run/nvidia/driver", "nvidiaDevRoot defaults to the driver root, as in NVIDIA's plugin"
    assert s.pass_device_specs is True
    assert s.list_strategies == ("envvar", "cdi-annotations")
    assert s.id_strategy == "index"
    assert s.shared == (SharedResource("nvidia.com/gpu", 4, "nvidia.com/gpu.shared", "all"),)
    assert s.fail_requests_greater_than_one is True
    assert s.source == str(path)
    assert any("flags.gfd" in note for note in s.notes), "accepted-but-unused keys are noted"


def test_config_file_can_come_from_nvidia_env_var(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("version: v1\nflags:\n  migStrategy: single\n")
    assert load_settings({}, environ={"CONFIG_FILE": str(path)}).mig_strategy == "single"


def test_environment_overrides_the_file_like_nvidia():
    doc = {"version": "v1", "flags": {"migStrategy": "single", "plugin": {"deviceIDStrategy": "uuid"}}}
    s = load_settings({"config": doc}, environ={
        "MIG_STRATEGY": "mixed", "DEVICE_ID_STRATEGY": "index", "PASS_DEVICE_SPECS": "True",
        "DEVICE_LIST_STRATEGY": "volume-mounts,cdi-cri", "NVIDIA_DEV_ROOT": "/host",
    })
    assert (s.mig_strategy, s.id_strategy, s.pass_device_specs) == ("mixed", "index", True)
    assert s.list_strategies == ("volume-mounts", "cdi-cri")
    assert s.dev_root == "/host"


def test_defaults_match_nvidias_plugin():
    s = load_settings({}, environ={})
    assert (s.mig_strategy, s.list_strategies, s.id_strategy) == ("none", ("envvar",), "uuid")
    assert s.pass_device_specs is False
    assert s.driver_root == s.dev_root == "/"
    assert s.cdi_annotation_prefix == "cdi.k8s.io/"
    assert s.shared == ()
    assert mig_resource(s, "1g.10gb") == "nvidia.com/mig-1g.10gb"


@pytest.mark.parametrize(("doc", "needle"), [
    ({"flags": {"migStratgy": "mixed"}}, "'flags.migStratgy': unknown key (did you mean 'migStrategy'?)"),
    ({"flags": {"migStrategy": "partial"}}, "'flags.migStrategy': expected one of mixed, none, single"),
    ({"flags": {"plugin": {"passDeviceSpecs": "yes"}}}, "'flags.plugin.passDeviceSpecs': expected true or false"),
    ({"flags": {"plugin": {"deviceListStrategy": ["envvar", "cdi"]}}}, "deviceListStrategy[1]': expected one of"),
    ({"version": "v2"}, "'version': unknown version 'v2'"),
    ({"sharing": {"timeSlicing": {"resources": [{"name": "gpu", "replicas": 1}]}}},
     "'sharing.timeSlicing.resources[0].replicas': expected a number of replicas per GPU from 2 to 1024, got 1"),
    ({"sharing": {"timeSlicing": {"resources": [{"name": "gpu", "replicas": 10**8}]}}},
     "'sharing.timeSlicing.resources[0].replicas': expected a number of replicas per GPU from 2 to 1024, "
     "got 100000000"),
    ({"sharing": {"timeSlicing": {"resources": [{"name": "gpu"}]}}}, "resources[0].replicas': required"),
    ({"sharing": {"timeSlicing": {"resources": [{"name": "gpu", "replicas": 2, "devices": "some"}]}}},
     "expected 'all', a count or a list of devices"),
    ({"sharing": {"timeSlicing": {"resources": [{"name": "gpu", "replicas": 2, "devices": ["GPU-UUID"]}]}}},
     "key 'sharing.timeSlicing.resources[0].devices[0]': expected a GPU index, a MIG index (0:1), GPU-<uuid>, "
     "MIG-<uuid> or MIG-GPU-<uuid>/<gi>/<ci>, got 'GPU-UUID'"),
    ({"sharing": {"timeSlicng": {}}}, "key 'sharing.timeSlicng': unknown key (did you mean 'timeSlicing'?)"),
    ({"sharing": {"mps": {"resources": [{"name": "gpu", "replicas": 2}]}}}, "'flags.mpsRoot': using MPS requires"),
    ({"imex": {"channelIDs": [1]}}, "channelIDs must be [] or [0]; found [1]"),
    ({"resources": {"gpus": [{"pattern": "*"}]}}, "'resources.gpus[0].name': required"),
    ({"resources": {"gpus": [{"pattern": "*", "name": "Bad Name!"}]}}, "resources.gpus[0].name"),
    ({"flags": {"deviceDiscoveryStrategy": "tegra"}}, "dpkit discovers GPUs through NVML only"),
    ({"flags": {"nvidiaDevRoot": "relative/dev"}}, "expected an absolute path"),
    (["not", "a", "mapping"], "expected a mapping"),
])
def test_wrong_keys_and_values_name_the_key(doc, needle):
    with pytest.raises(ConfigError) as err:
        load_settings({"config": doc}, environ={})
    assert needle in str(err.value)
    assert str(err.value).startswith("vendor.config")


def test_wrong_environment_values_name_the_variable():
    with pytest.raises(ConfigError, match=r"environment MIG_STRATEGY: key 'flags\.migStrategy': "
                                          "expected one of mixed, none, single"):
        load_settings({}, environ={"MIG_STRATEGY": "bogus"})
    with pytest.raises(ConfigError, match=r"environment PASS_DEVICE_SPECS: key 'flags\.plugin\.passDeviceSpecs': "
                                          "expected true or false"):
        load_settings({}, environ={"PASS_DEVICE_SPECS": "maybe"})
    with pytest.raises(ConfigError, match="environment DP_DISABLE_HEALTHCHECKS: 'sometimes'"):
        load_settings({}, environ={"DP_DISABLE_HEALTHCHECKS": "48,sometimes"})


def test_replicas_up_to_the_limit_are_accepted():
    doc = {"sharing": {"timeSlicing": {"resources": [{"name": "gpu", "replicas": 1024}]}}}
    assert load_settings({"config": doc}, environ={}).shared[0].replicas == 1024


def test_imex_environment_variables_are_read_like_the_imex_keys():
    s = load_settings({}, environ={"IMEX_CHANNEL_IDS": "0", "IMEX_REQUIRED": "true"})
    assert (s.imex_channel_ids, s.imex_required) == ((0,), True)
    with pytest.raises(ConfigError, match=r"environment IMEX_CHANNEL_IDS: .*channelIDs must be \[\] or \[0\]"):
        load_settings({}, environ={"IMEX_CHANNEL_IDS": "0,1"})
    with pytest.raises(ConfigError, match=r"environment IMEX_CHANNEL_IDS: key 'imex\.channelIDs\[0\]': "
                                          "expected an integer, got str 'x'"):
        load_settings({}, environ={"IMEX_CHANNEL_IDS": "x"})
    with pytest.raises(ConfigError, match=r"environment IMEX_REQUIRED: key 'imex\.required': expected true or false"):
        load_settings({}, environ={"IMEX_REQUIRED": "perhaps"})
    # unset in effect, as an empty imex section in the file is
    s = load_settings({}, environ={"IMEX_CHANNEL_IDS": " ", "IMEX_REQUIRED": "false"})
    assert (s.imex_channel_ids, s.imex_required) == ((), False)


def test_unknown_vendor_key_and_bad_file_are_clear_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"vendor.nvml_libary: unknown key \(did you mean 'nvml_library'\?\)"):
        load_settings({"nvml_libary": "/x"}, environ={})
    with pytest.raises(ConfigError, match="cannot read NVIDIA config file"):
        load_settings({"config_file": str(tmp_path / "missing.yaml")}, environ={})
    bad = tmp_path / "bad.yaml"
    bad.write_text("flags: [unclosed\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: not valid YAML at line \d+"):
        load_settings({"config_file": str(bad)}, environ={})
    with pytest.raises(ConfigError, match=r"vendor\.nvml_timeout: expected a positive number"):
        load_settings({"nvml_timeout": 0}, environ={})
    with pytest.raises(ConfigError, match="not both"):
        load_settings({"config": {}, "config_file": str(bad)}, environ={})


def test_resource_renames_and_time_slicing_entries():
    doc = {
        "resources": {"gpus": [{"pattern": "A100", "name": "gpu-a100"}, {"pattern": "*", "name": "gpu"}],
                      "mig": [{"pattern": "1g.*", "name": "mig-small"}]},
        "sharing": {"timeSlicing": {"resources": [
            {"name": "gpu-a100", "rename": "a100-shared", "replicas": 2, "devices": [0, GPU_REF]}]}},
    }
    s = load_settings({"config": doc}, environ={})
    assert [r.name for r in s.gpu_rules] == ["nvidia.com/gpu-a100", "nvidia.com/gpu"]
    assert not s.gpu_rules[0].matches("NVIDIA A100-SXM4-80GB"), "patterns are anchored, as NVIDIA's are now"
    assert s.gpu_rules[0].matches("A100")
    assert not s.gpu_rules[0].matches("NVIDIA H100")
    assert mig_resource(s, "1g.10gb") == "nvidia.com/mig-small"
    assert mig_resource(s, "3g.40gb") is None
    assert s.shared == (SharedResource("nvidia.com/gpu-a100", 2, "nvidia.com/a100-shared", ("0", GPU_REF)),)


def test_xid_policy_follows_nvidias_variables():
    default = policy_from_env({})
    assert all(not default.is_critical(x) for x in APPLICATION_XIDS)
    assert default.is_critical(79) and default.is_critical(48)
    extra = policy_from_env({"DP_DISABLE_HEALTHCHECKS": "79, 94"})
    assert not extra.is_critical(79) and not extra.is_critical(13) and extra.is_critical(48)
    xids_off = policy_from_env({"DP_DISABLE_HEALTHCHECKS": "xids"})
    assert not xids_off.is_critical(79) and xids_off.probe_wanted
    all_off = policy_from_env({"DP_DISABLE_HEALTHCHECKS": "all"})
    assert not all_off.probe_wanted
    enabled = policy_from_env({"DP_DISABLE_HEALTHCHECKS": "all", "DP_ENABLE_HEALTHCHECKS": "13,79"})
    assert enabled.probe_wanted and enabled.is_critical(13) and enabled.is_critical(79)
    assert not enabled.is_critical(48)
    every = policy_from_env({"DP_ENABLE_HEALTHCHECKS": "all"})
    assert every.is_critical(13) and every.is_critical(109)
