"""Config validation: every error names the file or variable, the key and what was expected."""

from __future__ import annotations

import pytest

from dpkit.core.support.config import Config, load_config
from dpkit.core.tools.sim import SimulatedVendor
from dpkit.core.vendorapi.errors import ConfigError


def write(tmp_path, text: str):  # type: ignore[no-untyped-def]
    path = tmp_path / "dpkit.yaml"
    path.write_text(text)
    return path


def test_defaults_without_a_file():
    config = load_config(None, environ={})
    assert config == Config()
    assert str(config.kubelet_socket_path) == "/var/lib/kubelet/device-plugins/kubelet.sock"


def test_file_and_env_overrides(tmp_path):
    path = write(tmp_path, "plugin_dir: /x\nlog_format: json\nprobe_heartbeat_timeout: 3\nvendor: {a: 1}\n")
    config = load_config(path, environ={"DPKIT_PLUGIN_DIR": "/y", "DPKIT_CDI_ALLOCATE": "true"})
    assert config.plugin_dir == "/y" and config.log_format == "json"
    assert config.probe_heartbeat_timeout == 3.0 and config.cdi_allocate is True
    assert config.vendor == {"a": 1} and config.source == str(path)


@pytest.mark.parametrize(("text", "message"), [
    ("plugin_dir: [1]\n", "key 'plugin_dir': expected a string, got list"),
    ("log_format: xml\n", "key 'log_format': expected one of human, json, got 'xml'"),
    ("probe_heartbeat_timeout: -1\n", "key 'probe_heartbeat_timeout': expected a positive number"),
    ("probe_heartbeat_timeout: soon\n", "key 'probe_heartbeat_timeout': expected a number of seconds"),
    ("probe_heartbeat_timeout: .nan\n", "key 'probe_heartbeat_timeout': expected a positive number"),
    ("register_backoff_max: .inf\n", "key 'register_backoff_max': expected a positive number"),
    ("cdi_allocate: maybe\n", "key 'cdi_allocate': expected true or false"),
    ("plugn_dir: /x\n", "key 'plugn_dir': unknown key (did you mean 'plugin_dir'?)"),
    ("vendor: [1, 2]\n", "key 'vendor': expected a mapping"),
    ("- a\n- b\n", "expected a mapping of settings at the top level"),
    ("plugin_dir: [unclosed\n", "not valid YAML at line"),
    ("metrics_address: nonsense\n", "key 'metrics_address': expected host:port"),
])
def test_malformed_files_name_file_and_key(tmp_path, text, message):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load_config(path, environ={})
    assert str(path) in str(err.value)
    assert message in str(err.value)


def test_bad_env_override_names_the_variable(tmp_path):
    with pytest.raises(ConfigError, match="environment DPKIT_REGISTER_BACKOFF_MAX: key 'register_backoff_max'"):
        load_config(None, environ={"DPKIT_REGISTER_BACKOFF_MAX": "fast"})


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "absent.yaml", environ={})


def test_empty_file_means_defaults(tmp_path):
    assert load_config(write(tmp_path, ""), environ={}).plugin_dir == Config().plugin_dir


def test_sim_vendor_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="unknown key"):
        SimulatedVendor({"devics_file": "x"})
    bad = tmp_path / "d.yaml"
    bad.write_text("resources:\n  example.com/w:\n    - {id: 'has space'}\n")
    with pytest.raises(ConfigError, match=r"resources.example.com/w\[0\].*has space"):
        SimulatedVendor({"devices_file": str(bad)})


def test_sim_devices_file_errors_name_the_file_the_key_and_the_line(tmp_path):
    absent = tmp_path / "absent.yaml"
    with pytest.raises(ConfigError, match=rf"{absent}: cannot read vendor.devices_file"):
        SimulatedVendor({"devices_file": str(absent)})
    broken = tmp_path / "broken.yaml"
    broken.write_text("resources: [unclosed\n")
    with pytest.raises(ConfigError, match=rf"{broken}: not valid YAML at line 2"):
        SimulatedVendor({"devices_file": str(broken)})


def test_empty_file_is_named_in_a_warning(tmp_path):
    import logging

    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    logger = logging.getLogger("dpkit.config")  # own handler: CLI tests may stop propagation
    logger.addHandler(handler)
    try:
        path = write(tmp_path, "# everything commented out\n")
        assert load_config(path, environ={}) == Config(source=str(path))
    finally:
        logger.removeHandler(handler)
    assert [r.getMessage() for r in records] == [f"{path}: the config file is empty; running with the defaults"]
    assert records[0].levelname == "WARNING"


def test_vendor_name_where_its_settings_go_says_where_the_vendor_is_chosen(tmp_path):
    path = write(tmp_path, "vendor: nvidia\n")
    with pytest.raises(ConfigError) as err:
        load_config(path, environ={})
    message = str(err.value)
    assert message.startswith(f"{path}: key 'vendor': expected a mapping of the vendor's own settings")
    assert "chosen on the command line (`dpkit run nvidia`)" in message


def test_vendor_section_left_empty_means_no_settings(tmp_path):
    assert load_config(write(tmp_path, "vendor:\n"), environ={}).vendor == {}


@pytest.mark.parametrize(("text", "where"), [
    ("resources:\n  example.com/w:\n    - {id: a, healthy: 'false'}\n", r"resources.example.com/w\[0\].healthy"),
    ("resources:\n  example.com/w:\n    - {id: a, healthy: 'no'}\n", r"resources.example.com/w\[0\].healthy"),
    ("resources:\n  example.com/w:\n    - {id: a, healthy: 0}\n", r"resources.example.com/w\[0\].healthy"),
    ("resources: {example.com/w: [{id: a}]}\n"
     "script:\n  - {health: {resource: example.com/w, id: a, healthy: 'false'}}\n",
     r"script\[0\].health.healthy"),
])
def test_sim_booleans_are_strict(tmp_path, text, where):
    path = tmp_path / "d.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=rf"{path}: {where}: expected true or false"):
        SimulatedVendor({"devices_file": str(path)})


def test_sim_script_flag_is_strict():
    with pytest.raises(ConfigError, match=r"vendor.script: expected true or false, got str 'false' \(quoted"):
        SimulatedVendor({"script": "false"})


def test_sim_script_steps_are_checked_at_load(tmp_path):
    path = tmp_path / "d.yaml"
    path.write_text("resources: {example.com/w: [{id: a}]}\nscript:\n  - {at: 1, helth: {resource: x, id: a}}\n")
    with pytest.raises(ConfigError, match=r"script\[0\]: expected one of health, add, remove"):
        SimulatedVendor({"devices_file": str(path)})


def test_sim_keeps_only_recent_one_device_specs(tmp_path):
    """The CDI writer asks for every device's spec: keeping them all cost about 240 bytes a device."""
    from dpkit.core.tools import sim

    lines = ["resources:", "  example.com/many:"] + [f"  - id: d{i}" for i in range(sim.MAX_KEPT_SPECS * 3)]
    (tmp_path / "devices.yaml").write_text("\n".join(lines) + "\n")
    vendor = SimulatedVendor({"devices_file": str(tmp_path / "devices.yaml"), "script": False})
    devices = vendor.discover()["example.com/many"]
    specs = [vendor.container_spec("example.com/many", [d]) for d in devices]
    assert len(vendor._specs) == sim.MAX_KEPT_SPECS
    last = devices[-1]
    assert vendor.container_spec("example.com/many", [last]) is specs[-1], "a recent one is answered from memory"
    assert vendor.container_spec("example.com/many", [devices[0]]) == specs[0], "an old one is made again, equal"
    assert specs[0].env["SIM_VISIBLE_DEVICES"] == "d0"
