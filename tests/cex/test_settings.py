"""Settings: the vendor section, IBM's environment variables with IBM's ranges, clear errors."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest

from dpkit.cex.settings import ENV_VARS, CexSettings, go_atoi, load_settings
from dpkit.core.vendorapi.errors import ConfigError


def test_defaults_follow_the_issue_and_ibm() -> None:
    s = load_settings({}, {})
    assert s == CexSettings()
    assert (s.poll_interval, s.overcommit, s.live_sysfs, s.shadow_sysfs) == (5.0, 1, True, True)
    assert (s.config_file, s.shadow_dir) == ("/config/cex_resources.json", "/var/tmp/shadowsysfs")
    assert (s.delete_unused_after, s.delete_never_used_after, s.reconcile_interval) == (120.0, 1800.0, 30.0)


# Ranges, defaults and fallbacks as IBM's plugin applies them (ibm-s390-cloud/k8s-cex-dev-plugin,
# src/cex-device-plugin: getenvint(name, default, min[, max]) clamps; a value strconv.Atoi cannot
# read falls back to the default, which here means the variable is ignored).
@pytest.mark.parametrize(("variable", "value", "key", "expected"), [
    ("APQN_OVERCOMMIT_LIMIT", "3", "overcommit", 3),
    ("APQN_OVERCOMMIT_LIMIT", "0", "overcommit", 1),          # IBM: below 1 -> 1
    ("APQN_OVERCOMMIT_LIMIT", "-7", "overcommit", 1),
    ("APQN_OVERCOMMIT_LIMIT", "500", "overcommit", 100),      # IBM: at most 100
    ("APQN_OVERCOMMIT_LIMIT", "+4", "overcommit", 4),         # Atoi takes a sign
    ("APQN_LIVE_SYSFS", "0", "live_sysfs", False),
    ("APQN_LIVE_SYSFS", "1", "live_sysfs", True),
    ("APQN_LIVE_SYSFS", "7", "live_sysfs", True),             # IBM: 0..1
    ("APQN_LIVE_SYSFS", "-1", "live_sysfs", False),
    ("APQN_CHECK_INTERVAL", "45", "poll_interval", 45.0),
    ("APQN_CHECK_INTERVAL", "2", "poll_interval", 10.0),      # IBM: 10..120 s
    ("APQN_CHECK_INTERVAL", "999", "poll_interval", 120.0),
    ("CRYPTOCONFIG_CHECK_INTERVAL", "60", "config_check_interval", 60.0),
    ("CRYPTOCONFIG_CHECK_INTERVAL", "5", "config_check_interval", 30.0),     # IBM: 30..300 s
    ("CRYPTOCONFIG_CHECK_INTERVAL", "3600", "config_check_interval", 300.0),  # IBM's cap
    ("PODLISTER_POLL_INTERVAL", "15", "reconcile_interval", 15.0),
    ("PODLISTER_POLL_INTERVAL", "1", "reconcile_interval", 10.0),
    ("RESOURCE_DELETE_UNUSED", "5", "delete_unused_after", 30.0),
    ("RESOURCE_DELETE_NEVER_USED", "600", "delete_never_used_after", 600.0),
    ("RESOURCE_DELETE_NEVER_USED", "0", "delete_never_used_after", 30.0),
    ("SHADOWSYSFS_BASEDIR", "/srv/shadow", "shadow_dir", "/srv/shadow"),
    ("CCS_JSON_FILE", "/etc/cex/sets.json", "config_file", "/etc/cex/sets.json"),
    ("PROC_SYSINFO_FILE", "/host/proc/sysinfo", "sysinfo_path", "/host/proc/sysinfo"),
    ("APSYSFS_BUSDIR", "/host/sys/bus/ap", "ap_bus_dir", "/host/sys/bus/ap"),
    ("APSYSFS_DEVSDIR", "/host/sys/devices/ap", "ap_devices_dir", "/host/sys/devices/ap"),
    ("ZCRYPT_CLASSDIR", "/host/sys/class/zcrypt", "zcrypt_class_dir", "/host/sys/class/zcrypt"),
])
def test_ibm_environment_variables_keep_their_meaning(variable: str, value: str, key: str, expected: Any) -> None:
    assert getattr(load_settings({}, {variable: value}), key) == expected


@pytest.mark.parametrize("value", ["many", "", " 30", "30 ", "3_0", "1e2", "0x10", "\u0663", "9" * 20, "9" * 5000])
def test_a_variable_go_cannot_read_as_an_integer_is_ignored_as_ibm_ignores_it(
        value: str, caplog: pytest.LogCaptureFixture) -> None:
    for variable in ("APQN_OVERCOMMIT_LIMIT", "APQN_CHECK_INTERVAL", "CRYPTOCONFIG_CHECK_INTERVAL"):
        assert load_settings({}, {variable: value}) == CexSettings()
    assert "not an integer" in caplog.text


def test_go_atoi_reads_what_strconv_atoi_reads() -> None:
    assert [go_atoi(t) for t in ("0", "-0", "+12", "007", "9223372036854775807", "-9223372036854775808")] == [
        0, 0, 12, 7, 2**63 - 1, -2**63]
    assert [go_atoi(t) for t in ("", "+", "1.0", "9223372036854775808", "١٢", " 1")] == [None] * 6


def test_the_sysfs_paths_follow_sysfs_root_unless_ibm_variables_set_them() -> None:
    s = load_settings({"sysfs_root": "/t/sys"}, {})
    assert (s.bus_dir, s.devices_dir, s.class_dir) == (
        Path("/t/sys/bus/ap"), Path("/t/sys/devices/ap"), Path("/t/sys/class/zcrypt"))
    s = load_settings({}, {"APSYSFS_BUSDIR": "/b", "APSYSFS_DEVSDIR": "/d", "ZCRYPT_CLASSDIR": "/z"})
    assert (s.bus_dir, s.devices_dir, s.class_dir) == (Path("/b"), Path("/d"), Path("/z"))


def test_every_variable_ibm_reads_is_known_and_exporter_ones_are_accepted(caplog: pytest.LogCaptureFixture) -> None:
    names = {v.name for v in ENV_VARS}
    assert names == {
        "APQN_OVERCOMMIT_LIMIT", "APQN_LIVE_SYSFS", "APQN_CHECK_INTERVAL", "CRYPTOCONFIG_CHECK_INTERVAL",
        "PODLISTER_POLL_INTERVAL", "RESOURCE_DELETE_UNUSED", "RESOURCE_DELETE_NEVER_USED", "SHADOWSYSFS_BASEDIR",
        "CCS_JSON_FILE", "PROC_SYSINFO_FILE", "APSYSFS_BUSDIR", "APSYSFS_DEVSDIR", "ZCRYPT_CLASSDIR",
        "METRICS_POLL_INTERVAL", "NODENAME", "CEX_PROM_EXPORTER_COLLECTOR_SERVICE",
        "CEX_PROM_EXPORTER_COLLECTOR_SERVICE_NAMESPACE", "CEX_PROM_EXPORTER_COLLECTOR_SERVICE_PORT"}
    # IBM's DaemonSet sets NODENAME from the downward API; it is accepted and changes nothing
    with caplog.at_level(logging.INFO, logger="dpkit.cex.settings"):
        assert load_settings({}, {"NODENAME": "node-1", "METRICS_POLL_INTERVAL": "15"}) == CexSettings()
    assert {getattr(r, "fields", {}).get("variable") for r in caplog.records} == {"NODENAME", "METRICS_POLL_INTERVAL"}


def test_a_vendor_key_wins_over_the_environment() -> None:
    environ = {"APQN_OVERCOMMIT_LIMIT": "9", "APQN_CHECK_INTERVAL": "60"}
    s = load_settings({"overcommit": 4, "poll_interval": 0.5}, environ)
    assert (s.overcommit, s.poll_interval) == (4, 0.5)


@pytest.mark.parametrize(("key", "value"), [
    ("overcommit", 0), ("overcommit", 101), ("overcommit", "2"), ("overcommit", True),
    ("poll_interval", 0), ("poll_interval", -1), ("poll_interval", "5s"),
    ("delete_unused_after", -1), ("live_sysfs", "yes"), ("uevents", 1),
    ("sysfs_root", "sys"), ("config_file", 7), ("shadow_dir", ""),
])
def test_a_bad_vendor_value_names_its_key(key: str, value: Any) -> None:
    with pytest.raises(ConfigError, match=f"vendor.{key}"):
        load_settings({key: value}, {})


def test_unknown_keys_and_garbage_variables_are_named() -> None:
    with pytest.raises(ConfigError, match=r"vendor.overcomit: unknown key \(did you mean 'overcommit'\?\)"):
        load_settings({"overcomit": 2}, {})
    for variable in ("SHADOWSYSFS_BASEDIR", "CCS_JSON_FILE", "APSYSFS_BUSDIR"):
        with pytest.raises(ConfigError, match=variable):
            load_settings({}, {variable: "relative/dir"})
    assert load_settings({}, {"CCS_JSON_FILE": ""}) == CexSettings()  # set but empty: the default


def test_zero_grace_is_allowed_for_removal_timers() -> None:
    assert load_settings({"delete_unused_after": 0}, {}).delete_unused_after == 0.0
