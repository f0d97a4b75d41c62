"""Core configuration: one YAML file plus ``DPKIT_*`` environment overrides, validated on load.

Every error names the file (or variable), the key and what was expected, so an operator can
fix a ConfigMap without reading code. The ``vendor:`` section is passed to the vendor as is;
the vendor validates it.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from dpkit.core.errors import ConfigError

DEFAULT_PLUGIN_DIR = "/var/lib/kubelet/device-plugins"
DEFAULT_POD_RESOURCES_SOCKET = "/var/lib/kubelet/pod-resources/kubelet.sock"
DEFAULT_NFD_FEATURES_DIR = "/etc/kubernetes/node-feature-discovery/features.d"
ENV_PREFIX = "DPKIT_"


@dataclass(frozen=True)
class Config:
    """Settings the core acts on; see docs/configuration.md for each key."""

    plugin_dir: str = DEFAULT_PLUGIN_DIR
    kubelet_socket: str = "kubelet.sock"  # relative to plugin_dir unless absolute
    state_dir: str = "/run/dpkit"  # control and event sockets (mode 0700 dir, 0600 sockets)
    log_format: str = "human"  # human | json
    log_level: str = "info"
    probe_heartbeat_timeout: float = 10.0
    register_backoff_max: float = 5.0
    vendor_call_timeout: float = 10.0  # Allocate/PreStart/preferred-allocation vendor hooks
    metrics_address: str = ""  # host:port; empty disables the endpoint
    cdi_dir: str = "/var/run/cdi"  # empty disables CDI spec files
    cdi_allocate: bool = False  # answer Allocate with cdi_devices instead of raw specs
    nfd_features_dir: str = DEFAULT_NFD_FEATURES_DIR  # empty disables node-feature-discovery labels
    pod_resources_socket: str = DEFAULT_POD_RESOURCES_SOCKET
    vendor: Mapping[str, Any] = field(default_factory=dict)
    source: str = "<defaults>"

    @property
    def kubelet_socket_path(self) -> Path:
        return Path(self.plugin_dir) / self.kubelet_socket

    def replace(self, **changes: Any) -> Config:
        return dataclasses.replace(self, **changes)


_CHOICES = {"log_format": ("human", "json"), "log_level": ("debug", "info", "warning", "error")}
_FIELDS = {f.name: f for f in dataclasses.fields(Config) if f.name not in ("source",)}


def _coerce(source: str, key: str, value: Any, expected: type, from_env: bool) -> Any:
    where = f"{source}: key {key!r}"
    if expected is bool:
        if isinstance(value, bool):
            return value
        if from_env and isinstance(value, str) and value.lower() in ("1", "true", "yes", "0", "false", "no"):
            return value.lower() in ("1", "true", "yes")
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if expected is float:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected a number of seconds, got {value!r}")
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected a number of seconds, got {value!r}") from None
        if not math.isfinite(number) or number <= 0:
            raise ConfigError(f"{where}: expected a positive number, got {value!r}")
        return number
    if expected is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {type(value).__name__} {value!r}")
        if key in _CHOICES and value not in _CHOICES[key]:
            raise ConfigError(f"{where}: expected one of {', '.join(_CHOICES[key])}, got {value!r}")
        return value
    if not isinstance(value, Mapping):
        raise ConfigError(f"{where}: expected a mapping of vendor settings, got {type(value).__name__}")
    return dict(value)


_TYPES: dict[str, type] = {
    "plugin_dir": str,
    "kubelet_socket": str,
    "state_dir": str,
    "log_format": str,
    "log_level": str,
    "probe_heartbeat_timeout": float,
    "register_backoff_max": float,
    "vendor_call_timeout": float,
    "metrics_address": str,
    "cdi_dir": str,
    "cdi_allocate": bool,
    "nfd_features_dir": str,
    "pod_resources_socket": str,
    "vendor": dict,
}
assert set(_TYPES) == set(_FIELDS), "every Config field needs a type for validation"


def parse_address(address: str) -> tuple[str, int]:
    """``host:port``, ``[v6]:port`` or ``:port`` (all interfaces); ConfigError naming the key."""
    host, sep, port_text = address.rpartition(":")
    if not sep or not port_text.isdigit() or int(port_text) > 65535:
        raise ConfigError(f"key 'metrics_address': expected host:port (e.g. 0.0.0.0:9400), got {address!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if ":" in host and not address.startswith("["):
        raise ConfigError(f"key 'metrics_address': write an IPv6 host in brackets, like [::]:9400; got {address!r}")
    return host or "0.0.0.0", int(port_text)


def read_text(path: str | Path, what: str) -> str:
    """A file's text; ConfigError naming the file and what it was for when it cannot be read."""
    try:
        return Path(path).read_text()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read {what}: {exc.strerror or exc}") from exc


def parse_yaml(text: str, where: str) -> Any:
    """YAML (safe subset); ConfigError naming ``where`` and the line and column of a syntax error."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{where}: not valid YAML{at}: {getattr(exc, 'problem', exc)}") from exc


def load_config(path: str | Path | None = None, environ: Mapping[str, str] | None = None) -> Config:
    """Read ``path`` (if given), then apply ``DPKIT_<KEY>`` overrides from ``environ``."""
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    source = "<defaults>"
    if path is not None:
        source = str(path)
        raw = parse_yaml(read_text(path, "config file"), source) or {}
        if not isinstance(raw, Mapping):
            raise ConfigError(f"{source}: expected a mapping of settings at the top level, got {type(raw).__name__}")
        for key, value in raw.items():
            if key not in _TYPES:
                known = ", ".join(sorted(_TYPES))
                raise ConfigError(f"{source}: unknown key {key!r} (known keys: {known})")
            values[key] = _coerce(source, key, value, _TYPES[key], from_env=False)
    for key, expected in _TYPES.items():
        name = ENV_PREFIX + key.upper()
        if name in environ and expected is not dict:
            values[key] = _coerce(f"environment {name}", key, environ[name], expected, from_env=True)
    if values.get("metrics_address"):
        where = f"environment {ENV_PREFIX}METRICS_ADDRESS" if ENV_PREFIX + "METRICS_ADDRESS" in environ else source
        try:
            parse_address(values["metrics_address"])
        except ConfigError as exc:
            raise ConfigError(f"{where}: {exc}") from None
    return Config(**values, source=source)
