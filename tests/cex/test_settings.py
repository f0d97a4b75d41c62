"""Settings: the vendor section, IBM's environment variables with IBM's ranges, clear errors."""

from __future__ import annotations

from typing import Any

import pytest

from dpkit.cex.settings import CexSettings, load_settings
from dpkit.core.errors import ConfigError


def test_defaults_follow_the_issue_and_ibm() -> None:
    s = load_settings({}, {})
    assert s == CexSettings()
    assert (s.poll_interval, s.overcommit, s.live_sysfs, s.shadow_sysfs) == (5.0, 1, True, True)
    assert (s.config_file, s.shadow_dir) == ("/config/cex_resources.json", "/var/tmp/shadowsysfs")
    assert (s.delete_unused_after, s.delete_never_used_after, s.reconcile_interval) == (120.0, 1800.0, 30.0)


@pytest.mark.parametrize(("variable", "value", "key", "expected"), [
    ("APQN_OVERCOMMIT_LIMIT", "3", "overcommit", 3),
    ("APQN_OVERCOMMIT_LIMIT", "0", "overcommit", 1),          # IBM: below 1 -> 1
    ("APQN_OVERCOMMIT_LIMIT", "500", "overcommit", 100),      # IBM: at most 100
    ("APQN_LIVE_SYSFS", "0", "live_sysfs", False),
    ("APQN_LIVE_SYSFS", "1", "live_sysfs", True),
    ("APQN_CHECK_INTERVAL", "45", "poll_interval", 45.0),
    ("APQN_CHECK_INTERVAL", "2", "poll_interval", 10.0),      # IBM: at least 10 s
    ("CRYPTOCONFIG_CHECK_INTERVAL", "30", "config_check_interval", 120.0),
    ("PODLISTER_POLL_INTERVAL", "15", "reconcile_interval", 15.0),
    ("RESOURCE_DELETE_UNUSED", "5", "delete_unused_after", 30.0),
    ("RESOURCE_DELETE_NEVER_USED", "600", "delete_never_used_after", 600.0),
    ("SHADOWSYSFS_BASEDIR", "/srv/shadow", "shadow_dir", "/srv/shadow"),
])
def test_ibm_environment_variables_keep_their_meaning(variable: str, value: str, key: str, expected: Any) -> None:
    assert getattr(load_settings({}, {variable: value}), key) == expected


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
    with pytest.raises(ConfigError, match=r"unknown key.*overcomit"):
        load_settings({"overcomit": 2}, {})
    with pytest.raises(ConfigError, match=r"APQN_OVERCOMMIT_LIMIT.*'many'"):
        load_settings({}, {"APQN_OVERCOMMIT_LIMIT": "many"})
    with pytest.raises(ConfigError, match="SHADOWSYSFS_BASEDIR"):
        load_settings({}, {"SHADOWSYSFS_BASEDIR": "relative/dir"})


def test_zero_grace_is_allowed_for_removal_timers() -> None:
    assert load_settings({"delete_unused_after": 0}, {}).delete_unused_after == 0.0
