"""Settings: NVIDIA's v1 config file and environment variables, plus dpkit's own vendor keys.

An operator keeps their NVIDIA config file (``version: v1`` with ``flags``, ``resources``,
``sharing.timeSlicing`` / ``sharing.mps``, ``imex``) and their environment (``MIG_STRATEGY``,
``DEVICE_LIST_STRATEGY``...).
Precedence is NVIDIA's: environment over file over defaults. Unlike NVIDIA's loader, an unknown
key or a wrong value is a :class:`ConfigError` naming the key, so a typo cannot silently change
what pods get.

The dpkit ``vendor:`` section holds ``config_file`` (or ``config``, the same document inline)
and the keys in :data:`VENDOR_KEYS`.
"""

from __future__ import annotations

import difflib
import os
import re
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from dpkit.core import ConfigError, ValidationError, check_annotation_key, check_resource_name
from dpkit.nvidia.xids import XidPolicy, policy_from_env

RESOURCE_PREFIX = "nvidia.com"
DEFAULT_GPU_RESOURCE = "nvidia.com/gpu"
SHARED_SUFFIX = ".shared"
MIG_STRATEGIES = ("none", "single", "mixed")
LIST_STRATEGIES = ("envvar", "volume-mounts", "cdi-annotations", "cdi-cri")
ID_STRATEGIES = ("uuid", "index")
ALLOCATION_POLICIES = ("distributed", "packed")
#: MPS: where the control daemon's per-resource pipe/log directories live inside the containers
#: (NVIDIA mounts the host's ``mpsRoot`` there in both the plugin and the daemon container).
MPS_CONTAINER_ROOT = "/mps"
#: ``sharing.timeSlicing.resources[].replicas`` at most: each replica is a device advertised to the
#: kubelet and rebuilt on every poll, so 10^8 would stall the plugin. Far above any real use.
MAX_REPLICAS = 1024

#: dpkit's own keys in the ``vendor:`` section, with their defaults.
VENDOR_KEYS: dict[str, Any] = {
    "config_file": "",  # NVIDIA v1 config file (env CONFIG_FILE works too)
    "config": None,  # the same document inline
    "nvml_library": "",  # explicit libnvidia-ml.so.1 (default: found under nvidiaDriverRoot)
    "sysfs_root": "/sys",  # NUMA nodes come from <sysfs_root>/bus/pci/devices/<bus>/numa_node
    "proc_root": "/proc",  # MIG capability minors from <proc_root>/driver/nvidia-caps/mig-minors
    "cdi_vendor": RESOURCE_PREFIX,  # CDI names are <cdi_vendor>/gpu=<id>
    "poll_interval": 30.0,  # seconds between re-discoveries
    "nvml_timeout": 10.0,  # an NVML call slower than this is 'hung'
    "discovery_timeout": 60.0,  # a discovery subprocess still running after this is killed ('hung')
    "health_interval": 5.0,  # seconds between the health probe's checks of every GPU
    "health_state_file": "/run/dpkit/nvidia-health.json",  # keeps XID marks across probe restarts
    "mps_container_root": MPS_CONTAINER_ROOT,  # the host's mpsRoot as this container sees it
}

#: NVIDIA's variables that dpkit reads but does not act on, with why; each is warned about once.
IGNORED_ENV: dict[str, str] = {
    "KUBELET_SOCKET": "dpkit finds the kubelet through its own plugin_dir setting",
    "USE_NODE_FEATURE_API": "node labels come from dpkit's nfd_features_dir setting",
    "GFD_ONESHOT": "GPU feature discovery settings do not apply to the device plugin",
    "GFD_NO_TIMESTAMP": "GPU feature discovery settings do not apply to the device plugin",
    "GFD_SLEEP_INTERVAL": "GPU feature discovery settings do not apply to the device plugin",
    "GFD_OUTPUT_FILE": "GPU feature discovery settings do not apply to the device plugin",
    "GFD_MACHINE_TYPE_FILE": "GPU feature discovery settings do not apply to the device plugin",
    "GFD_USE_NODE_FEATURE_API": "GPU feature discovery settings do not apply to the device plugin",
    "RESTART_ON_DEVICE_UNHEALTHY": "dpkit reports unhealthy devices to the kubelet instead of restarting",
}


@dataclass(frozen=True)
class ResourceRule:
    """``resources.gpus`` / ``resources.mig`` entry: devices whose name matches get ``name``."""

    pattern: str
    name: str

    def matches(self, text: str) -> bool:
        """The whole text matches the wildcard pattern (anchored as NVIDIA's are now: ``1g.24gb`` does not
        match ``1g.24gb-me``; ``*A100*`` matches any product name containing A100)."""
        regex = ".*".join(re.escape(part) for part in self.pattern.split("*"))
        return re.fullmatch(regex, text, flags=re.DOTALL) is not None


@dataclass(frozen=True)
class SharedResource:
    """One ``sharing.timeSlicing.resources`` or ``sharing.mps.resources`` entry."""

    name: str
    replicas: int
    rename: str = ""
    devices: str | int | tuple[str, ...] = "all"  # "all", a count, or indices/UUIDs


@dataclass(frozen=True)
class Settings:
    """Everything the vendor acts on, validated."""

    mig_strategy: str = "none"
    fail_on_init_error: bool = True
    driver_root: str = "/"
    dev_root: str = "/"
    pass_device_specs: bool = False
    list_strategies: tuple[str, ...] = ("envvar",)
    id_strategy: str = "uuid"
    cdi_annotation_prefix: str = "cdi.k8s.io/"
    gds_enabled: bool = False
    mofed_enabled: bool = False
    gdrcopy_enabled: bool = False
    gpu_rules: tuple[ResourceRule, ...] = ()
    mig_rules: tuple[ResourceRule, ...] = ()
    shared: tuple[SharedResource, ...] = ()  # the active sharing strategy's resources
    sharing_strategy: str = "none"  # none | time-slicing | mps (mps wins when both are set, as NVIDIA's)
    fail_requests_greater_than_one: bool = False
    allocation_policy: str = "distributed"  # sharedDevicesAllocationPolicy
    mps_root: str = ""  # flags.mpsRoot: the host directory holding the daemons' pipe/log dirs
    mps_container_root: str = MPS_CONTAINER_ROOT
    imex_channel_ids: tuple[int, ...] = ()
    imex_required: bool = False
    xids: XidPolicy = field(default_factory=XidPolicy)
    nvml_library: str = ""
    sysfs_root: str = "/sys"
    proc_root: str = "/proc"
    cdi_vendor: str = RESOURCE_PREFIX
    poll_interval: float = 30.0
    nvml_timeout: float = 10.0
    discovery_timeout: float = 60.0
    health_interval: float = 5.0
    health_state_file: str = "/run/dpkit/nvidia-health.json"
    source: str = "<defaults>"
    notes: tuple[str, ...] = ()  # accepted keys that dpkit ignores, said once in the log
    warnings: tuple[str, ...] = ()  # NVIDIA variables dpkit does not act on, warned about once

    @property
    def all_cdi(self) -> bool:
        return all(s.startswith("cdi-") for s in self.list_strategies)

    @property
    def cdi_kind(self) -> str:
        return f"{self.cdi_vendor}/gpu"

    @property
    def replicated(self) -> bool:
        return bool(self.shared)

    @property
    def mps(self) -> bool:
        return self.sharing_strategy == "mps"

    def mps_dir(self, root: str, resource: str, part: str) -> str:
        """``<root>/<resource>/<part>`` as NVIDIA lays out an MPS root (``part``: pipe, log, .ready)."""
        return os.path.join(root, resource, part)


# -- a tiny strict schema walker ------------------------------------------------------------


class _Bad(Exception):
    """A problem at a key path inside the NVIDIA document; turned into a ConfigError with its source."""

    def __init__(self, path: str, message: str) -> None:
        super().__init__(message)
        self.path = path
        self.message = message


Schema = dict[str, Any]  # key -> a type, a nested Schema, or a parser(value, path) -> value
_WHAT = {bool: "true or false", str: "a string", int: "an integer", list: "a list"}


def _expect(value: Any, kind: type | tuple[type, ...], path: str, what: str) -> Any:
    if (kind is not bool and isinstance(value, bool)) or not isinstance(value, kind):
        raise _Bad(path, f"expected {what}, got {type(value).__name__} {value!r}")
    return value


def _join(path: str, key: object) -> str:
    return f"{path}.{key}" if path else str(key)


def _walk(raw: Any, schema: Schema, path: str) -> dict[str, Any]:
    """Check a mapping against ``schema``: unknown keys and wrong types name their path."""
    if raw is None:
        return {}
    _expect(raw, Mapping, path or "<top level>", "a mapping")
    out: dict[str, Any] = {}
    for key, value in raw.items():
        at = _join(path, key)
        if key not in schema:
            close = difflib.get_close_matches(str(key), list(schema), n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"known keys: {', '.join(schema)}"
            raise _Bad(at, f"unknown key ({hint})")
        if value is None:
            continue
        rule = schema[key]
        if isinstance(rule, dict):
            out[key] = _walk(value, rule, at)
        elif isinstance(rule, type):
            out[key] = _expect(value, rule, at, _WHAT.get(rule, rule.__name__))
        else:
            out[key] = rule(value, at)
    return out


def _string_list(value: Any, path: str) -> tuple[str, ...]:
    if isinstance(value, str):
        return (value,)
    _expect(value, list, path, "a string or a list of strings")
    return tuple(_expect(v, str, f"{path}[{i}]", "a string") for i, v in enumerate(value))


def _rules(value: Any, path: str) -> tuple[ResourceRule, ...]:
    _expect(value, list, path, "a list of {pattern, name}")
    rules = []
    for i, item in enumerate(value):
        at = f"{path}[{i}]"
        entry = _walk(item, {"pattern": str, "name": str}, at)
        for key in ("pattern", "name"):
            if key not in entry:
                raise _Bad(at, f"'{key}' is required")
        rules.append(ResourceRule(entry["pattern"], _resource(entry["name"], f"{at}.name")))
    return tuple(rules)


_UINT = re.compile(r"\d+")
#: the textual forms Go's uuid.Parse takes, which NVIDIA's selector check uses
_UUID_FORMS = re.compile(r"(?:urn:uuid:)?[0-9a-fA-F]{8}-(?:[0-9a-fA-F]{4}-){3}[0-9a-fA-F]{12}"
                         r"|\{[0-9a-fA-F]{8}-(?:[0-9a-fA-F]{4}-){3}[0-9a-fA-F]{12}\}|[0-9a-fA-F]{32}")


def _is_uuid(text: str) -> bool:
    if not _UUID_FORMS.fullmatch(text):
        return False
    uuid.UUID(text.removeprefix("urn:uuid:"))  # cannot fail after the regex; documents the intent
    return True


def device_ref_ok(ref: str) -> bool:
    """NVIDIA's replica device selector rules: a GPU index (``0``), a MIG index (``0:1``), ``GPU-<uuid>``,
    ``MIG-<uuid>`` or ``MIG-GPU-<uuid>/<gi>/<ci>``; a bare ``GPU-UUID`` or a MIG ID without gi/ci is not."""
    if _UINT.fullmatch(ref):
        return True
    gpu, sep, mig = ref.partition(":")
    if sep and _UINT.fullmatch(gpu) and _UINT.fullmatch(mig):
        return True
    if ref.startswith("GPU-"):
        return _is_uuid(ref[4:])
    if ref.startswith("MIG-"):
        rest = ref[4:]
        if _is_uuid(rest):
            return True
        parts = rest.split("/")
        return (len(parts) == 3 and parts[0].startswith("GPU-") and _is_uuid(parts[0][4:])
                and all(_UINT.fullmatch(p) for p in parts[1:]))
    return False


def _devices(value: Any, path: str) -> str | int | tuple[str, ...]:
    if value == "all":
        return "all"
    if isinstance(value, str):
        raise _Bad(path, f"expected 'all', a count or a list of devices, got {value!r} "
                         "(the only valid string is 'all')")
    if isinstance(value, int) and not isinstance(value, bool):
        if value <= 0:
            raise _Bad(path, f"a count of devices must be > 0, got {value}")
        return value
    if isinstance(value, list):
        refs = []
        for i, item in enumerate(value):
            if isinstance(item, int) and not isinstance(item, bool) and item >= 0:
                ref: Any = str(item)
            else:
                ref = item
            if not isinstance(ref, str) or not device_ref_ok(ref):
                raise _Bad(f"{path}[{i}]", f"{item!r} is not a GPU index, a MIG index (0:1), GPU-<uuid>, "
                                           "MIG-<uuid> or MIG-GPU-<uuid>/<gi>/<ci>")
            refs.append(ref)
        return tuple(refs)
    raise _Bad(path, f"expected 'all', a count or a list of devices, got {value!r}")


def _shared(value: Any, path: str) -> list[dict[str, Any]]:
    _expect(value, list, path, "a list of resources to replicate")
    entries = []
    for i, item in enumerate(value):
        at = f"{path}[{i}]"
        entry = _walk(item, {"name": str, "rename": str, "devices": _devices, "replicas": int}, at)
        for key in ("name", "replicas"):
            if key not in entry:
                raise _Bad(at, f"'{key}' is required")
        if entry["replicas"] < 2:
            raise _Bad(f"{at}.replicas", f"number of replicas must be >= 2, got {entry['replicas']}")
        if entry["replicas"] > MAX_REPLICAS:
            raise _Bad(f"{at}.replicas",
                       f"number of replicas must be <= {MAX_REPLICAS} per GPU, got {entry['replicas']}")
        entry["name"] = _resource(entry["name"], f"{at}.name")
        if "rename" in entry:
            entry["rename"] = _resource(entry["rename"], f"{at}.rename")
        entries.append(entry)
    return entries


def _anything(value: Any, path: str) -> Any:
    return value


def _channel_ids(value: Any, path: str) -> tuple[int, ...]:
    _expect(value, list, path, "a list of channel IDs")
    return tuple(_expect(v, int, f"{path}[{i}]", "an integer") for i, v in enumerate(value))


_PLUGIN: Schema = {
    "passDeviceSpecs": bool, "deviceListStrategy": _string_list, "deviceIDStrategy": str,
    "cdiAnnotationPrefix": str, "nvidiaCTKPath": str, "nvidiaCDIHookPath": str, "containerDriverRoot": str,
    "sharedDevicesAllocationPolicy": str,
}
_GFD: Schema = {"oneshot": bool, "noTimestamp": bool, "sleepInterval": _anything, "outputFile": str,
                "machineTypeFile": str}
_FLAGS: Schema = {
    "migStrategy": str, "failOnInitError": bool, "nvidiaDriverRoot": str, "nvidiaDevRoot": str,
    "gdsEnabled": bool, "mofedEnabled": bool, "gdrcopyEnabled": bool, "mpsRoot": str,
    "useNodeFeatureAPI": bool, "deviceDiscoveryStrategy": str, "restartOnDeviceUnhealthy": bool,
    "plugin": _PLUGIN, "gfd": _GFD,
}
_REPLICATED: Schema = {"renameByDefault": bool, "failRequestsGreaterThanOne": bool, "resources": _shared}
_SCHEMA: Schema = {
    "version": str,
    "flags": _FLAGS,
    "resources": {"gpus": _rules, "mig": _rules},
    "sharing": {"timeSlicing": _REPLICATED, "mps": _REPLICATED},
    "imex": {"channelIDs": _channel_ids, "required": bool},
}

_BOOL_WORDS = {"1": True, "t": True, "true": True, "0": False, "f": False, "false": False}


def _env_bool(name: str, value: str) -> bool:
    try:
        return _BOOL_WORDS[value.strip().lower()]
    except KeyError:
        raise ConfigError(f"environment {name}: expected true or false, got {value!r}") from None


def _env_list(name: str, value: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in value.split(",") if v.strip())


def _env_ints(name: str, value: str) -> tuple[int, ...]:
    out = []
    for item in _env_list(name, value):
        try:
            out.append(int(item))
        except ValueError:
            raise ConfigError(f"environment {name}: {item!r} is not an integer") from None
    return tuple(out)


# NVIDIA's environment variables -> (key path under flags, parser; None keeps the string)
_ENV: dict[str, tuple[str, Any]] = {
    "MIG_STRATEGY": ("migStrategy", None),
    "FAIL_ON_INIT_ERROR": ("failOnInitError", _env_bool),
    "NVIDIA_DRIVER_ROOT": ("nvidiaDriverRoot", None),
    "NVIDIA_DEV_ROOT": ("nvidiaDevRoot", None),
    "GDS_ENABLED": ("gdsEnabled", _env_bool),
    "MOFED_ENABLED": ("mofedEnabled", _env_bool),
    "GDRCOPY_ENABLED": ("gdrcopyEnabled", _env_bool),
    "MPS_ROOT": ("mpsRoot", None),
    "DEVICE_DISCOVERY_STRATEGY": ("deviceDiscoveryStrategy", None),
    "PASS_DEVICE_SPECS": ("plugin.passDeviceSpecs", _env_bool),
    "DEVICE_LIST_STRATEGY": ("plugin.deviceListStrategy", _env_list),
    "DEVICE_ID_STRATEGY": ("plugin.deviceIDStrategy", None),
    "CDI_ANNOTATION_PREFIX": ("plugin.cdiAnnotationPrefix", None),
    "NVIDIA_CTK_PATH": ("plugin.nvidiaCTKPath", None),
    "NVIDIA_CDI_HOOK_PATH": ("plugin.nvidiaCDIHookPath", None),
    "CONTAINER_DRIVER_ROOT": ("plugin.containerDriverRoot", None),
    "SHARED_DEVICES_ALLOCATION_POLICY": ("plugin.sharedDevicesAllocationPolicy", None),
}
# variables that set keys outside ``flags`` (NVIDIA's IMEX flags)
_TOP_ENV: dict[str, tuple[str, Any]] = {
    "IMEX_CHANNEL_IDS": ("imex.channelIDs", _env_ints),
    "IMEX_REQUIRED": ("imex.required", _env_bool),
}
# as NVIDIA's CLI library does, an empty boolean or list variable counts as unset
_EMPTY_IS_UNSET = {_env_bool, _env_list, _env_ints}


def _resource(name: str, path: str) -> str:
    try:
        return resource_name(name)
    except ValidationError as exc:
        raise _Bad(path, str(exc)) from None


def resource_name(name: str) -> str:
    """NVIDIA's resource naming: ``nvidia.com/`` is added when missing; 63 characters at most."""
    full = name if name.startswith(RESOURCE_PREFIX + "/") else f"{RESOURCE_PREFIX}/{name}"
    if len(full) > 63:
        raise ValidationError(f"fully-qualified resource name must be 63 characters or less: {full}")
    return check_resource_name(full)


def _choice(value: str, choices: Sequence[str], path: str, note: str = "") -> str:
    if value not in choices:
        raise _Bad(path, f"expected one of {', '.join(choices)}, got {value!r}{note}")
    return value


def _number(config: Mapping[str, Any], key: str) -> float:
    value = config.get(key, VENDOR_KEYS[key])
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise ConfigError(f"vendor.{key}: expected a positive number of seconds, got {value!r}")
    return float(value)


def _string(config: Mapping[str, Any], key: str) -> str:
    value = config.get(key, VENDOR_KEYS[key])
    if not isinstance(value, str):
        raise ConfigError(f"vendor.{key}: expected a string, got {type(value).__name__} {value!r}")
    return value


def _read_document(config: Mapping[str, Any], environ: Mapping[str, str]) -> tuple[Any, str]:
    inline = config.get("config")
    path = _string(config, "config_file") or environ.get("CONFIG_FILE", "")
    if inline is not None and path:
        raise ConfigError("vendor: set either 'config' (inline) or 'config_file' / CONFIG_FILE, not both")
    if inline is not None:
        return inline, "vendor.config"
    if not path:
        return {}, "<defaults>"
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read NVIDIA config file: {exc.strerror or exc}") from exc
    try:
        return yaml.safe_load(text) or {}, path
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{path}: not valid YAML{at}: {getattr(exc, 'problem', exc)}") from exc


def _apply_env(doc: dict[str, Any], environ: Mapping[str, str]) -> dict[str, str]:
    """Environment over file, as NVIDIA does; returns key path -> variable, for error messages."""
    origin: dict[str, str] = {}
    wanted = [(name, f"flags.{path}", parse) for name, (path, parse) in _ENV.items()]
    wanted += [(name, path, parse) for name, (path, parse) in _TOP_ENV.items()]
    for name, path, parse in wanted:
        if name not in environ:
            continue
        if parse in _EMPTY_IS_UNSET and not environ[name].strip():
            continue
        *parents, last = path.split(".")
        target = doc
        for key in parents:
            target = target.setdefault(key, {})
        target[last] = parse(name, environ[name]) if parse else environ[name]
        origin[path] = name
    return origin


def load_settings(config: Mapping[str, Any] | None = None, environ: Mapping[str, str] | None = None) -> Settings:
    """Validate the vendor section, read the NVIDIA document and apply NVIDIA's env variables."""
    config = dict(config or {})
    environ = os.environ if environ is None else environ
    unknown = sorted(set(config) - set(VENDOR_KEYS))
    if unknown:
        close = difflib.get_close_matches(unknown[0], list(VENDOR_KEYS), n=1)
        hint = f"did you mean {close[0]!r}?" if close else f"known: {', '.join(VENDOR_KEYS)}"
        raise ConfigError(f"vendor: unknown key {unknown[0]!r} for vendor nvidia ({hint})")
    raw, source = _read_document(config, environ)
    origin: dict[str, str] = {}
    try:
        doc = _walk(raw, _SCHEMA, "")
        doc.setdefault("flags", {})
        origin = _apply_env(doc, environ)
        return _settings(doc, config, environ, source, origin)
    except _Bad as bad:
        if bad.path in origin:
            raise ConfigError(f"environment {origin[bad.path]}: {bad.message}") from None
        raise ConfigError(f"{source}: key {bad.path!r}: {bad.message}") from None


def _settings(doc: dict[str, Any], config: Mapping[str, Any], environ: Mapping[str, str], source: str,
              origin: Mapping[str, str]) -> Settings:
    if doc.get("version", "v1") != "v1":
        raise _Bad("version", f"unknown version {doc['version']!r}; only v1 is understood")
    flags = doc["flags"]
    plugin = flags.get("plugin", {})
    notes: list[str] = []
    mig_strategy = _choice(flags.get("migStrategy", "none"), MIG_STRATEGIES, "flags.migStrategy")
    strategies = plugin.get("deviceListStrategy", ("envvar",))
    if not strategies:
        raise _Bad("flags.plugin.deviceListStrategy", f"at least one of {', '.join(LIST_STRATEGIES)} is required")
    for s in strategies:
        _choice(s, LIST_STRATEGIES, "flags.plugin.deviceListStrategy")
    id_strategy = _choice(plugin.get("deviceIDStrategy", "uuid"), ID_STRATEGIES, "flags.plugin.deviceIDStrategy")
    _choice(flags.get("deviceDiscoveryStrategy", "auto"), ("auto", "nvml"), "flags.deviceDiscoveryStrategy",
            " (dpkit discovers GPUs through NVML only)")
    prefix = plugin.get("cdiAnnotationPrefix", "cdi.k8s.io/")
    try:
        check_annotation_key(prefix + "nvidia-device-plugin_x")
    except ValidationError as exc:
        raise _Bad("flags.plugin.cdiAnnotationPrefix", str(exc)) from None
    driver_root = flags.get("nvidiaDriverRoot") or "/"
    dev_root = flags.get("nvidiaDevRoot") or driver_root
    for key, value in (("nvidiaDriverRoot", driver_root), ("nvidiaDevRoot", dev_root)):
        if not value.startswith("/") or ".." in value.split("/"):
            raise _Bad(f"flags.{key}", f"expected an absolute path without '..', got {value!r}")
    warnings: list[str] = []
    for key in ("nvidiaCTKPath", "nvidiaCDIHookPath", "containerDriverRoot"):
        if key in plugin:
            (warnings if f"flags.plugin.{key}" in origin else notes).append(
                f"{_said(origin, f'flags.plugin.{key}')} is accepted but unused: dpkit does not generate CDI specs")
    for key in ("gfd", "useNodeFeatureAPI", "restartOnDeviceUnhealthy"):
        if key in flags:
            notes.append(f"flags.{key} is accepted but unused by dpkit"
                         + (" (it configures GPU feature discovery)" if key == "gfd" else ""))
    if "failOnInitError" in flags:
        notes.append(f"{_said(origin, 'flags.failOnInitError')}: dpkit never exits on NVML errors; it advertises "
                     "what it can and retries")
    for name, why in IGNORED_ENV.items():
        if name in environ:
            warnings.append(f"environment {name} is set but dpkit does not act on it: {why}")
    policy = _choice(plugin.get("sharedDevicesAllocationPolicy", "distributed"), ALLOCATION_POLICIES,
                     "flags.plugin.sharedDevicesAllocationPolicy")

    sharing = doc.get("sharing", {})
    imex = doc.get("imex", {})
    channel_ids = tuple(imex.get("channelIDs", ()))
    if channel_ids not in ((), (0,)):
        raise _Bad("imex.channelIDs", f"invalid IMEX channel IDs: channelIDs must be [] or [0]; found "
                                      f"{list(channel_ids)}")
    shared_by = {kind: _shared_entries(sharing.get(kind, {}), f"sharing.{kind}") for kind in ("timeSlicing", "mps")}
    strategy = "mps" if shared_by["mps"] else "time-slicing" if shared_by["timeSlicing"] else "none"
    active = sharing.get("mps" if strategy == "mps" else "timeSlicing", {})
    shared = shared_by["mps"] if strategy == "mps" else shared_by["timeSlicing"]
    mps_root = flags.get("mpsRoot", "")
    if strategy == "mps":
        if shared_by["timeSlicing"]:
            warnings.append("sharing.timeSlicing is ignored: sharing.mps is set too and wins, as in NVIDIA's plugin")
        if mig_strategy == "mixed":
            raise _Bad("flags.migStrategy", "using migStrategy mixed is not supported with MPS")
        if not mps_root:
            raise _Bad("flags.mpsRoot", "using MPS requires mpsRoot (MPS_ROOT) to be set, e.g. /run/nvidia/mps")
    if mps_root and (not mps_root.startswith("/") or ".." in mps_root.split("/")):
        raise _Bad("flags.mpsRoot", f"expected an absolute path without '..', got {mps_root!r}")
    if "mpsRoot" in flags and strategy != "mps":
        notes.append(f"{_said(origin, 'flags.mpsRoot')} is used only with sharing.mps")

    resources = doc.get("resources", {})
    strings = {k: _string(config, k) for k in ("nvml_library", "sysfs_root", "proc_root", "cdi_vendor",
                                                "health_state_file")}
    if not re.fullmatch(r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?", strings["cdi_vendor"]):
        raise ConfigError(f"vendor.cdi_vendor: {strings['cdi_vendor']!r} is not a DNS name like nvidia.com")
    return Settings(
        mig_strategy=mig_strategy,
        fail_on_init_error=bool(flags.get("failOnInitError", True)),
        driver_root=driver_root,
        dev_root=dev_root,
        pass_device_specs=bool(plugin.get("passDeviceSpecs", False)),
        list_strategies=tuple(dict.fromkeys(strategies)),
        id_strategy=id_strategy,
        cdi_annotation_prefix=prefix,
        gds_enabled=bool(flags.get("gdsEnabled", False)),
        mofed_enabled=bool(flags.get("mofedEnabled", False)),
        gdrcopy_enabled=bool(flags.get("gdrcopyEnabled", False)),
        gpu_rules=resources.get("gpus", ()),
        mig_rules=resources.get("mig", ()),
        shared=tuple(shared),
        sharing_strategy=strategy,
        # NVIDIA's current loader: MPS refuses requests above one replica unless the config says
        # failRequestsGreaterThanOne: false; time-slicing allows them unless it says true.
        fail_requests_greater_than_one=bool(active.get("failRequestsGreaterThanOne", strategy == "mps")),
        allocation_policy=policy,
        mps_root=mps_root,
        mps_container_root=_string(config, "mps_container_root"),
        imex_channel_ids=channel_ids,
        imex_required=bool(imex.get("required", False)),
        xids=policy_from_env(environ),
        poll_interval=_number(config, "poll_interval"),
        nvml_timeout=_number(config, "nvml_timeout"),
        discovery_timeout=_number(config, "discovery_timeout"),
        health_interval=_number(config, "health_interval"),
        source=source,
        notes=tuple(notes),
        warnings=tuple(warnings),
        **strings,
    )


def _said(origin: Mapping[str, str], path: str) -> str:
    """How the operator set ``path``: the variable's name when the environment set it."""
    return f"environment {origin[path]}" if path in origin else path


def _shared_entries(section: Mapping[str, Any], path: str) -> tuple[SharedResource, ...]:
    """One sharing strategy's resources with NVIDIA's renameByDefault applied."""
    rename_default = bool(section.get("renameByDefault", False))
    shared: list[SharedResource] = []
    for i, entry in enumerate(section.get("resources", [])):
        if any(s.name == entry["name"] for s in shared):
            raise _Bad(f"{path}.resources[{i}].name", f"{entry['name']} is listed twice")
        rename = entry.get("rename") or (entry["name"] + SHARED_SUFFIX if rename_default else "")
        shared.append(SharedResource(entry["name"], entry["replicas"], rename, entry.get("devices", "all")))
    return tuple(shared)


def gpu_rules(settings: Settings) -> tuple[ResourceRule, ...]:
    """The configured GPU rules, or NVIDIA's default: every GPU is ``nvidia.com/gpu``."""
    return settings.gpu_rules or (ResourceRule("*", DEFAULT_GPU_RESOURCE),)


def mig_resource(settings: Settings, profile: str) -> str | None:
    """The resource a MIG device of ``profile`` belongs to (None: no rule matches)."""
    for rule in settings.mig_rules:
        if rule.matches(profile):
            return rule.name
    if settings.mig_rules:
        return None
    if settings.mig_strategy == "single":
        return DEFAULT_GPU_RESOURCE
    return resource_name(f"mig-{profile}")
