"""The cex vendor's settings: the ``vendor:`` config section, IBM's environment variables, defaults.

Operators moving from IBM's k8s-cex-dev-plugin keep their DaemonSet environment: each IBM
variable still means what it meant there, clamped to the same range. A key in the ``vendor:``
section wins over the variable (it is the more explicit of the two) and is checked strictly:
a bad value is a :class:`ConfigError` naming ``vendor.<key>``, never a silent adjustment.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from dpkit.core.config import DEFAULT_POD_RESOURCES_SOCKET
from dpkit.core.errors import ConfigError

MAX_OVERCOMMIT = 100


@dataclass(frozen=True)
class CexSettings:
    """Everything the vendor acts on; see docs/cex.md for each key."""

    config_file: str = "/config/cex_resources.json"
    sysfs_root: str = "/sys"
    dev_dir: str = "/dev"
    sysinfo_path: str = "/proc/sysinfo"
    pod_resources_socket: str = DEFAULT_POD_RESOURCES_SOCKET
    shadow_sysfs: bool = True
    shadow_dir: str = "/var/tmp/shadowsysfs"
    live_sysfs: bool = True
    overcommit: int = 1
    poll_interval: float = 5.0
    config_check_interval: float = 10.0
    reconcile_interval: float = 30.0
    delete_unused_after: float = 120.0
    delete_never_used_after: float = 1800.0
    node_timeout: float = 5.0
    uevents: bool = True


@dataclass(frozen=True)
class _EnvVar:
    """One IBM variable: the setting it feeds and IBM's accepted range (out of range: clamped)."""

    name: str
    low: int | None = None
    high: int | None = None


# IBM variable -> setting; ranges as IBM's plugin applies them.
ENV_VARS: dict[str, _EnvVar] = {
    "overcommit": _EnvVar("APQN_OVERCOMMIT_LIMIT", 1, MAX_OVERCOMMIT),
    "live_sysfs": _EnvVar("APQN_LIVE_SYSFS", 0, 1),
    "poll_interval": _EnvVar("APQN_CHECK_INTERVAL", 10, 120),
    "config_check_interval": _EnvVar("CRYPTOCONFIG_CHECK_INTERVAL", 120),
    "reconcile_interval": _EnvVar("PODLISTER_POLL_INTERVAL", 10),
    "delete_unused_after": _EnvVar("RESOURCE_DELETE_UNUSED", 30),
    "delete_never_used_after": _EnvVar("RESOURCE_DELETE_NEVER_USED", 30),
    "shadow_dir": _EnvVar("SHADOWSYSFS_BASEDIR"),
}

_FIELDS = {f.name: f for f in dataclasses.fields(CexSettings)}
_PATHS = ("config_file", "sysfs_root", "dev_dir", "sysinfo_path", "pod_resources_socket", "shadow_dir")
_ZERO_OK = ("delete_unused_after", "delete_never_used_after")


def _from_env(key: str, var: _EnvVar, raw: str) -> Any:
    if key == "shadow_dir":
        return _path(f"environment {var.name}", raw)
    try:
        number = int(raw.strip())
    except ValueError:
        raise ConfigError(f"environment {var.name}: expected an integer, got {raw!r}") from None
    if var.low is not None:
        number = max(var.low, number)
    if var.high is not None:
        number = min(var.high, number)
    if key == "live_sysfs":
        return bool(number)
    return number if key == "overcommit" else float(number)


def _path(where: str, value: Any) -> str:
    if not isinstance(value, str) or not value.startswith("/"):
        raise ConfigError(f"{where}: expected an absolute path, got {value!r}")
    return value


def _from_config(key: str, value: Any) -> Any:
    where = f"vendor.{key}"
    if key in _PATHS:
        return _path(where, value)
    kind = _FIELDS[key].type
    if kind == "bool":
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if kind == "int":
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_OVERCOMMIT:
            raise ConfigError(f"{where}: expected an integer from 1 to {MAX_OVERCOMMIT}, got {value!r}")
        return value
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"{where}: expected a number of seconds, got {value!r}")
    if value < 0 or (value == 0 and key not in _ZERO_OK):
        raise ConfigError(f"{where}: expected a positive number of seconds, got {value!r}")
    return float(value)


def load_settings(config: Mapping[str, Any], environ: Mapping[str, str]) -> CexSettings:
    """Defaults, then IBM's variables from ``environ``, then the ``vendor:`` section."""
    unknown = sorted(set(config) - set(_FIELDS))
    if unknown:
        raise ConfigError(f"vendor: unknown key(s) {', '.join(unknown)} for vendor cex "
                          f"(known: {', '.join(sorted(_FIELDS))})")
    values: dict[str, Any] = {}
    for key, var in ENV_VARS.items():
        if var.name in environ:
            values[key] = _from_env(key, var, environ[var.name])
    for key, value in config.items():
        values[key] = _from_config(key, value)
    return CexSettings(**values)
