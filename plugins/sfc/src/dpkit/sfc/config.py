"""The ``vendor:`` section for the Solarflare package, validated once at start.

Every error is a :class:`ConfigError` naming the key (``vendor.pools[1].slots``), so an operator
can fix the ConfigMap without reading code. See docs/sfc.md for the meaning of each key.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from dpkit.core import ConfigError, ValidationError, check_resource_name
from dpkit.sfc import compat

DEFAULT_RESOURCE = "solarflare.com/sfc"
DEFAULT_VENDOR_IDS = ("0x1924",)
DEFAULT_DRIVERS = ("sfc",)
DEFAULT_LIBRARY_PATH = "/opt/onload/usr/lib64"
MAX_SLOTS = 1024
UDEV_SOURCES = ("udev", "kernel")
#: dpkit's own behaviour; AMD's Onload device plugin (compat.py); the older Solarflare plugin's name
MODES = ("dpkit", "onload", "solarflare")
LEGACY_RESOURCE = "solarflare.com/sfc"  # what Solarflare's first device plugin registered
_VENDOR_ID = re.compile(r"^0x[0-9a-f]{4}$")
_EF_NAME = re.compile(r"^EF_[A-Z0-9_]+$")


@dataclass(frozen=True)
class Pool:
    """A resource of its own for the interfaces matching a name pattern or a PCI address."""

    resource: str
    interfaces: tuple[str, ...] = ()  # fnmatch patterns on interface names
    pci_addresses: tuple[str, ...] = ()  # fnmatch patterns on PCI addresses
    slots: int = 1


@dataclass(frozen=True)
class OnloadConfig:
    """Where the host's Onload lives and what an Onload container gets besides the device nodes."""

    required: bool = False
    library_path: str = DEFAULT_LIBRARY_PATH
    container_library_path: str = DEFAULT_LIBRARY_PATH
    preload: bool = False
    env: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class SfcConfig:
    mode: str = "dpkit"
    onload_plugin: compat.OnloadPluginConfig | None = None  # set in "onload" mode only
    resource: str = DEFAULT_RESOURCE
    slots: int = 1
    vendor_ids: tuple[str, ...] = DEFAULT_VENDOR_IDS
    drivers: tuple[str, ...] = DEFAULT_DRIVERS
    pools: tuple[Pool, ...] = ()
    onload: OnloadConfig = field(default_factory=OnloadConfig)
    sys_root: str = "/sys"
    dev_root: str = "/dev"
    udev_source: str = "udev"
    resync_interval: float = 30.0

    @property
    def resources(self) -> tuple[str, ...]:
        """Every resource served, default first."""
        if self.onload_plugin is not None:
            return (compat.RESOURCE,)
        return (self.resource, *(p.resource for p in self.pools))


_COMMON_KEYS = ("mode", "vendor_ids", "drivers", "sys_root", "dev_root", "udev_source", "resync_interval")
_DPKIT_KEYS = ("resource", "slots", "pools", "onload")
_ONLOAD_PLUGIN_KEYS = ("devicePlugin", "args")
_TOP_KEYS = (*_COMMON_KEYS[:1], *_DPKIT_KEYS, *_COMMON_KEYS[1:], *_ONLOAD_PLUGIN_KEYS)
_POOL_KEYS = ("resource", "interfaces", "pci_addresses", "slots")
_ONLOAD_KEYS = ("required", "library_path", "container_library_path", "preload", "env")


def _unknown(raw: Mapping[str, Any], known: tuple[str, ...], where: str) -> None:
    extra = sorted(str(k) for k in raw if k not in known)
    if extra:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(extra)} (known: {', '.join(known)})")


def _mapping(value: Any, where: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__}")
    return value


def _str(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{where}: expected a non-empty string, got {value!r}")
    return value


def _bool(value: Any, where: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    return value


def _abs_path(value: Any, where: str) -> str:
    path = _str(value, where)
    if not path.startswith("/") or ".." in path.split("/"):
        raise ConfigError(f"{where}: expected an absolute path without '..', got {path!r}")
    return path.rstrip("/") or "/"


def _str_list(value: Any, where: str) -> tuple[str, ...]:
    if isinstance(value, str) or not isinstance(value, list | tuple):
        raise ConfigError(f"{where}: expected a list of strings, got {value!r}")
    return tuple(_str(item, f"{where}[{i}]") for i, item in enumerate(value))


def _slots(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_SLOTS:
        raise ConfigError(f"{where}: expected a whole number of slots from 1 to {MAX_SLOTS}, got {value!r}")
    return value


def _resource(value: Any, where: str) -> str:
    try:
        return check_resource_name(_str(value, where))
    except ValidationError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def _vendor_ids(value: Any, where: str) -> tuple[str, ...]:
    ids = tuple(v.lower() for v in _str_list(value, where))
    for i, vid in enumerate(ids):
        if not _VENDOR_ID.match(vid):
            raise ConfigError(f"{where}[{i}]: expected a PCI vendor ID like '0x1924', got {vid!r}")
    if not ids:
        raise ConfigError(f"{where}: expected at least one PCI vendor ID")
    return ids


def _pool(raw: Any, where: str) -> Pool:
    raw = _mapping(raw, where)
    _unknown(raw, _POOL_KEYS, where)
    if "resource" not in raw:
        raise ConfigError(f"{where}.resource: every pool needs a resource name")
    pool = Pool(
        resource=_resource(raw["resource"], f"{where}.resource"),
        interfaces=_str_list(raw.get("interfaces", []), f"{where}.interfaces"),
        pci_addresses=tuple(a.lower() for a in _str_list(raw.get("pci_addresses", []), f"{where}.pci_addresses")),
        slots=_slots(raw.get("slots", 1), f"{where}.slots"),
    )
    if not pool.interfaces and not pool.pci_addresses:
        raise ConfigError(f"{where}: a pool needs 'interfaces' or 'pci_addresses' patterns to match")
    return pool


def _env(raw: Any, where: str) -> dict[str, str]:
    env: dict[str, str] = {}
    for name, value in _mapping(raw, where).items():
        key = f"{where}.{name}"
        if not isinstance(name, str) or not _EF_NAME.match(name):
            raise ConfigError(f"{key}: only Onload tuning variables (EF_ followed by A-Z, 0-9, _) belong here")
        if isinstance(value, bool) or not isinstance(value, str | int | float):
            raise ConfigError(f"{key}: expected a string or number, got {value!r}")
        text = str(value)
        if "\x00" in text or "\n" in text:
            raise ConfigError(f"{key}: the value contains a control character")
        env[name] = text
    return env


def _onload(raw: Any, where: str) -> OnloadConfig:
    raw = _mapping(raw, where)
    _unknown(raw, _ONLOAD_KEYS, where)
    library_path = _abs_path(raw.get("library_path", DEFAULT_LIBRARY_PATH), f"{where}.library_path")
    return OnloadConfig(
        required=_bool(raw.get("required", False), f"{where}.required"),
        library_path=library_path,
        container_library_path=_abs_path(raw.get("container_library_path", DEFAULT_LIBRARY_PATH),
                                         f"{where}.container_library_path"),
        preload=_bool(raw.get("preload", False), f"{where}.preload"),
        env=_env(raw.get("env", {}), f"{where}.env"),
    )


def _mode(raw: Mapping[str, Any]) -> str:
    """``vendor.mode``, after checking that only the keys of that mode are present."""
    mode = _str(raw.get("mode", "dpkit"), "vendor.mode")
    if mode not in MODES:
        raise ConfigError(f"vendor.mode: expected one of {', '.join(MODES)}, got {mode!r}")
    if mode == "onload":
        wrong = sorted(k for k in _DPKIT_KEYS if k in raw)
        if wrong:
            raise ConfigError(f"vendor: {', '.join(wrong)} belong(s) to mode dpkit; in mode onload the resource is "
                              f"{compat.RESOURCE} and the Onload plugin's own settings go in vendor.devicePlugin "
                              "(the Onload CR's keys) or vendor.args (its flags)")
    else:
        wrong = sorted(k for k in _ONLOAD_PLUGIN_KEYS if k in raw)
        if wrong:
            raise ConfigError(f"vendor: {', '.join(wrong)} configure(s) AMD's Onload device plugin; add "
                              "'mode: onload' to serve amd.com/onload as that plugin does")
    return mode


def parse_config(raw: Mapping[str, Any] | None) -> SfcConfig:
    """Validate the ``vendor:`` section; raises :class:`ConfigError` naming the bad key."""
    raw = _mapping(raw or {}, "vendor")
    _unknown(raw, _TOP_KEYS, "vendor")
    mode = _mode(raw)
    pools_raw = raw.get("pools", [])
    if not isinstance(pools_raw, list):
        raise ConfigError(f"vendor.pools: expected a list of pools, got {type(pools_raw).__name__}")
    interval = raw.get("resync_interval", 30.0)
    if isinstance(interval, bool) or not isinstance(interval, int | float) or interval <= 0:
        raise ConfigError(f"vendor.resync_interval: expected a positive number of seconds, got {interval!r}")
    source = _str(raw.get("udev_source", "udev"), "vendor.udev_source")
    if source not in UDEV_SOURCES:
        raise ConfigError(f"vendor.udev_source: expected one of {', '.join(UDEV_SOURCES)}, got {source!r}")
    onload_plugin = None
    if mode == "onload":
        onload_plugin = compat.onload_plugin_config(raw.get("devicePlugin"), raw.get("args"))
    config = SfcConfig(
        mode=mode,
        onload_plugin=onload_plugin,
        resource=_resource(raw.get("resource", DEFAULT_RESOURCE), "vendor.resource"),
        slots=_slots(raw.get("slots", 1), "vendor.slots"),
        vendor_ids=_vendor_ids(raw.get("vendor_ids", list(DEFAULT_VENDOR_IDS)), "vendor.vendor_ids"),
        drivers=_str_list(raw.get("drivers", list(DEFAULT_DRIVERS)), "vendor.drivers"),
        pools=tuple(_pool(p, f"vendor.pools[{i}]") for i, p in enumerate(pools_raw)),
        onload=_onload(raw.get("onload", {}), "vendor.onload"),
        sys_root=_abs_path(raw.get("sys_root", "/sys"), "vendor.sys_root"),
        dev_root=_abs_path(raw.get("dev_root", "/dev"), "vendor.dev_root"),
        udev_source=source,
        resync_interval=float(interval),
    )
    if not config.drivers:
        raise ConfigError("vendor.drivers: expected at least one driver name")
    if mode == "solarflare" and config.resource != LEGACY_RESOURCE:
        raise ConfigError(f"vendor.resource: mode solarflare keeps the resource {LEGACY_RESOURCE} of Solarflare's "
                          f"device plugin, got {config.resource!r}; use mode dpkit to rename it")
    seen: set[str] = set()
    for index, name in enumerate(config.resources):
        if name in seen:
            where = "vendor.resource" if index == 0 else f"vendor.pools[{index - 1}].resource"
            raise ConfigError(f"{where}: resource {name!r} is used twice")
        seen.add(name)
    return config
