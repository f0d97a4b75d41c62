"""The cex vendor's settings: the ``vendor:`` config section, IBM's environment variables, defaults.

Operators moving from IBM's k8s-cex-dev-plugin keep their DaemonSet environment: every variable
IBM's plugin reads still means what it meant there, with IBM's range (a value outside it is moved
to the nearest end) and IBM's fallback (a value that is not an integer as Go's ``strconv.Atoi``
reads one is ignored with a warning). A key in the ``vendor:`` section wins over the variable
(it is the more explicit of the two) and is checked strictly against the types and ranges
:class:`CexSettings` declares: a bad value is a :class:`ConfigError` naming ``vendor.<key>``,
never a silent adjustment. docs/cex.md has the table.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

from dpkit.core import DEFAULT_POD_RESOURCES_SOCKET, ConfigError, Meta, get_logger, kv, load_section

log = get_logger("cex.settings")

MAX_OVERCOMMIT = 100
DEFAULT_CONFIG_FILE = "/config/cex_resources.json"

AbsPath = Annotated[str, Meta(pattern="^/", description="an absolute path")]
Seconds = Annotated[float, Meta(gt=0, description="a number of seconds")]
Grace = Annotated[float, Meta(ge=0, description="a number of seconds")]  # 0: remove at once


@dataclass(frozen=True)
class CexSettings:
    """Everything the vendor acts on; see docs/cex.md for each key.

    ``ap_bus_dir``, ``ap_devices_dir`` and ``zcrypt_class_dir`` are "" unless set: then they are
    ``bus/ap``, ``devices/ap`` and ``class/zcrypt`` below ``sysfs_root`` (see the properties).
    """

    config_file: AbsPath = DEFAULT_CONFIG_FILE
    sysfs_root: AbsPath = "/sys"
    ap_bus_dir: AbsPath = ""
    ap_devices_dir: AbsPath = ""
    zcrypt_class_dir: AbsPath = ""
    dev_dir: AbsPath = "/dev"
    sysinfo_path: AbsPath = "/proc/sysinfo"
    pod_resources_socket: AbsPath = DEFAULT_POD_RESOURCES_SOCKET
    shadow_sysfs: bool = True
    shadow_dir: AbsPath = "/var/tmp/shadowsysfs"
    live_sysfs: bool = True
    overcommit: Annotated[int, Meta(ge=1, le=MAX_OVERCOMMIT)] = 1
    poll_interval: Seconds = 5.0
    config_check_interval: Seconds = 10.0
    reconcile_interval: Seconds = 30.0
    delete_unused_after: Grace = 120.0
    delete_never_used_after: Grace = 1800.0
    node_timeout: Seconds = 5.0
    uevents: bool = True

    @property
    def bus_dir(self) -> Path:
        return Path(self.ap_bus_dir or Path(self.sysfs_root) / "bus" / "ap")

    @property
    def devices_dir(self) -> Path:
        return Path(self.ap_devices_dir or Path(self.sysfs_root) / "devices" / "ap")

    @property
    def class_dir(self) -> Path:
        return Path(self.zcrypt_class_dir or Path(self.sysfs_root) / "class" / "zcrypt")


@dataclass(frozen=True)
class EnvVar:
    """One variable IBM's plugin reads: the setting it feeds, IBM's default and range.

    ``key`` is None for a variable that belongs to IBM's Prometheus exporter side: accepted and
    logged as not used (dpkit's own metrics endpoint replaces it). ``low``/``high`` None: no
    bound; a path variable has ``default`` as a string.
    """

    name: str
    key: str | None
    default: int | str
    low: int | None = None
    high: int | None = None


# What IBM's plugin (ibm-s390-cloud/k8s-cex-dev-plugin, src/cex-device-plugin) reads, with its
# defaults and getenvint ranges. Integers are seconds except the first two.
ENV_VARS: tuple[EnvVar, ...] = (
    EnvVar("APQN_OVERCOMMIT_LIMIT", "overcommit", 1, 1, MAX_OVERCOMMIT),
    EnvVar("APQN_LIVE_SYSFS", "live_sysfs", 1, 0, 1),
    EnvVar("APQN_CHECK_INTERVAL", "poll_interval", 30, 10, 120),
    EnvVar("CRYPTOCONFIG_CHECK_INTERVAL", "config_check_interval", 120, 30, 300),
    EnvVar("PODLISTER_POLL_INTERVAL", "reconcile_interval", 30, 10),
    EnvVar("RESOURCE_DELETE_UNUSED", "delete_unused_after", 120, 30),
    EnvVar("RESOURCE_DELETE_NEVER_USED", "delete_never_used_after", 1800, 30),
    EnvVar("SHADOWSYSFS_BASEDIR", "shadow_dir", "/var/tmp/shadowsysfs"),
    EnvVar("CCS_JSON_FILE", "config_file", DEFAULT_CONFIG_FILE),
    EnvVar("PROC_SYSINFO_FILE", "sysinfo_path", "/proc/sysinfo"),
    EnvVar("APSYSFS_BUSDIR", "ap_bus_dir", "/sys/bus/ap"),
    EnvVar("APSYSFS_DEVSDIR", "ap_devices_dir", "/sys/devices/ap"),
    EnvVar("ZCRYPT_CLASSDIR", "zcrypt_class_dir", "/sys/class/zcrypt"),
    # IBM's metrics push to its separate cex-prometheus-exporter
    EnvVar("METRICS_POLL_INTERVAL", None, 15, 10),
    EnvVar("NODENAME", None, ""),
    EnvVar("CEX_PROM_EXPORTER_COLLECTOR_SERVICE", None, "cex-prometheus-exporter-collector-service"),
    EnvVar("CEX_PROM_EXPORTER_COLLECTOR_SERVICE_NAMESPACE", None, ""),
    EnvVar("CEX_PROM_EXPORTER_COLLECTOR_SERVICE_PORT", None, 12358, 0),
)

_GO_INT = re.compile(r"^[+-]?[0-9]+$")
_INT64 = 2**63


def go_atoi(text: str) -> int | None:
    """``text`` as Go's ``strconv.Atoi`` reads it on a 64-bit machine; None where Atoi fails.

    No spaces, no underscores, ASCII digits with an optional sign, within int64. The length is
    checked before ``int()``, so a 5,000-digit value costs nothing and never trips Python's
    digit limit.
    """
    if not _GO_INT.match(text) or len(text.lstrip("+-")) > 19:
        return None
    value = int(text)
    return value if -_INT64 <= value < _INT64 else None


def _from_env(var: EnvVar, raw: str) -> Any:
    """The setting value for ``var``, or None to keep the default (IBM's fallback)."""
    if isinstance(var.default, str):
        if not raw:  # IBM would use an empty path as is and fail on it; unset is what was meant
            log.warning("empty environment variable ignored", extra=kv(variable=var.name))
            return None
        if not raw.startswith("/"):
            raise ConfigError(f"environment {var.name}: key 'vendor.{var.key}': expected an absolute path, got {raw!r}")
        return raw
    number = go_atoi(raw)
    if number is None:
        log.warning("environment variable is not an integer; ignored, as IBM's plugin ignores it",
                    extra=kv(variable=var.name, value=raw[:40]))
        return None
    if var.low is not None:
        number = max(var.low, number)
    if var.high is not None:
        number = min(var.high, number)
    if var.key == "live_sysfs":
        return number == 1
    return number if var.key == "overcommit" else float(number)


def load_settings(config: Mapping[str, Any], environ: Mapping[str, str]) -> CexSettings:
    """Defaults, then IBM's variables from ``environ``, then the ``vendor:`` section."""
    values: dict[str, Any] = {}
    for var in ENV_VARS:
        if var.name not in environ:
            continue
        if var.key is None:
            log.info("environment variable of IBM's Prometheus exporter side not used; dpkit serves "
                     "metrics itself (metrics_address)", extra=kv(variable=var.name))
            continue
        value = _from_env(var, environ[var.name])
        if value is not None:
            values[var.key] = value
    return load_section({**values, **config}, CexSettings, root="vendor")
