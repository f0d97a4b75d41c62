"""Settings: NVIDIA's v1 config file and environment variables, plus dpkit's own vendor keys.

An operator keeps their NVIDIA config file (``version: v1`` with ``flags``, ``resources``,
``sharing.timeSlicing`` / ``sharing.mps``, ``imex``) and their environment (``MIG_STRATEGY``,
``DEVICE_LIST_STRATEGY``...).
Precedence is NVIDIA's: environment over file over defaults. Unlike NVIDIA's loader, an unknown
key or a wrong value is a :class:`ConfigError` naming the key, so a typo cannot silently change
what pods get.

The dpkit ``vendor:`` section holds ``config_file`` (or ``config``, the same document inline)
and the keys of :class:`VendorSection`. Both the section and NVIDIA's document are declared
(types, choices, ranges, defaults) and converted by the core's schema layer; :class:`Document`'s
``__post_init__`` holds NVIDIA's rules that span keys.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from dpkit.core import (
    ConfigError,
    Invalid,
    Meta,
    Section,
    ValidationError,
    check_annotation_key,
    check_resource_name,
    force_setattr,
    load_section,
    parse_yaml,
    read_text,
    setting,
)
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

Seconds = Annotated[float, Meta(gt=0, description="a number of seconds")]
#: "" is unset (the default applies)
HostRoot = Annotated[str, Meta(pattern=r"^(/(?!(.*/)?\.\.(/|$)).*)?$", description="an absolute path without '..'")]
ListStrategy = Literal["envvar", "volume-mounts", "cdi-annotations", "cdi-cri"]


class OwnKeys(Section, frozen=True):
    """dpkit's own keys in the ``vendor:`` section that :class:`Settings` carries as they are."""

    nvml_library: str = ""  # explicit libnvidia-ml.so.1 (default: found under nvidiaDriverRoot)
    sysfs_root: str = "/sys"  # NUMA nodes come from <sysfs_root>/bus/pci/devices/<bus>/numa_node
    proc_root: str = "/proc"  # MIG capability minors from <proc_root>/driver/nvidia-caps/mig-minors
    cdi_vendor: Annotated[str, Meta(pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$",
                                    description="a DNS name like nvidia.com")] = RESOURCE_PREFIX  # <vendor>/gpu=<id>
    poll_interval: Seconds = 30.0  # seconds between re-discoveries
    nvml_timeout: Seconds = 10.0  # an NVML call slower than this is 'hung'
    discovery_timeout: Seconds = 60.0  # a discovery subprocess still running after this is killed ('hung')
    health_interval: Seconds = 5.0  # seconds between the health probe's checks of every GPU
    health_state_file: str = "/run/dpkit/nvidia-health.json"  # keeps XID marks across probe restarts
    mps_container_root: str = MPS_CONTAINER_ROOT  # the host's mpsRoot as this container sees it


class VendorSection(OwnKeys, frozen=True):
    """The ``vendor:`` section: where NVIDIA's document is, and dpkit's own keys."""

    config_file: str = ""  # NVIDIA v1 config file (env CONFIG_FILE works too)
    config: Any = None  # the same document inline


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


class ResourceRule(Section, frozen=True):
    """``resources.gpus`` / ``resources.mig`` entry: devices whose name matches get ``name``."""

    pattern: str
    name: str

    def __post_init__(self) -> None:
        force_setattr(self, "name", _resource(self.name, "name"))

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


class Settings(OwnKeys, frozen=True, kw_only=True):
    """Everything the vendor acts on, validated: dpkit's own keys plus what NVIDIA's document and variables say."""

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
    imex_channel_ids: tuple[int, ...] = ()
    imex_required: bool = False
    xids: XidPolicy = setting(default_factory=XidPolicy)
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


#: the textual forms Go's uuid.Parse takes, which NVIDIA's selector check uses
_UUID = r"(?:(?:urn:uuid:)?H{8}-(?:H{4}-){3}H{12}|\{H{8}-(?:H{4}-){3}H{12}\}|H{32})".replace("H", "[0-9a-fA-F]")
REFS = "a GPU index, a MIG index (0:1), GPU-<uuid>, MIG-<uuid> or MIG-GPU-<uuid>/<gi>/<ci>"
#: NVIDIA's replica device selector rules; a bare ``GPU-UUID`` or a MIG ID without gi/ci is not one
DeviceRef = Annotated[Annotated[str, Meta(pattern=rf"^(\d+|\d+:\d+|GPU-{_UUID}|MIG-{_UUID}|MIG-GPU-{_UUID}/\d+/\d+)\Z")]
                      | Annotated[int, Meta(ge=0)], Meta(description=REFS)]


class SharedEntry(Section, frozen=True):
    """One ``sharing.<strategy>.resources`` entry as NVIDIA writes it."""

    name: str
    replicas: Annotated[int, Meta(ge=2, le=MAX_REPLICAS, description="a number of replicas per GPU")]
    rename: str = ""
    devices: Annotated[Literal["all"] | Annotated[int, Meta(gt=0)] | tuple[DeviceRef, ...], Meta(
        description="'all', a count or a list of devices")] = "all"

    def __post_init__(self) -> None:
        force_setattr(self, "name", _resource(self.name, "name"))
        if self.rename:
            force_setattr(self, "rename", _resource(self.rename, "rename"))
        if isinstance(self.devices, tuple):
            force_setattr(self, "devices", tuple(map(str, self.devices)))


class PluginFlags(Section, frozen=True):
    passDeviceSpecs: bool = False
    deviceListStrategy: ListStrategy | list[ListStrategy] = "envvar"
    deviceIDStrategy: Literal["uuid", "index"] = "uuid"
    cdiAnnotationPrefix: str = "cdi.k8s.io/"
    nvidiaCTKPath: str | None = None  # accepted, unused: dpkit does not generate CDI specs
    nvidiaCDIHookPath: str | None = None
    containerDriverRoot: str | None = None
    sharedDevicesAllocationPolicy: Literal["distributed", "packed"] = "distributed"


class GfdFlags(Section, frozen=True):
    """GPU feature discovery's flags: accepted, unused by the device plugin."""

    oneshot: bool = False
    noTimestamp: bool = False
    sleepInterval: Any = None
    outputFile: str = ""
    machineTypeFile: str = ""


class Flags(Section, frozen=True):
    migStrategy: Literal["none", "single", "mixed"] = "none"
    failOnInitError: bool | None = None
    nvidiaDriverRoot: HostRoot = ""
    nvidiaDevRoot: HostRoot = ""
    gdsEnabled: bool = False
    mofedEnabled: bool = False
    gdrcopyEnabled: bool = False
    mpsRoot: HostRoot | None = None
    useNodeFeatureAPI: bool | None = None
    deviceDiscoveryStrategy: Annotated[Literal["auto", "nvml"], Meta(
        description="one of auto, nvml (dpkit discovers GPUs through NVML only)")] = "auto"
    restartOnDeviceUnhealthy: bool | None = None
    plugin: PluginFlags = setting(default_factory=PluginFlags)
    gfd: GfdFlags | None = None


class Replicated(Section, frozen=True):
    renameByDefault: bool = False
    failRequestsGreaterThanOne: bool | None = None
    resources: tuple[SharedEntry, ...] = ()

    def shared(self, path: str) -> tuple[SharedResource, ...]:
        """The resources with NVIDIA's renameByDefault applied."""
        shared: list[SharedResource] = []
        for i, entry in enumerate(self.resources):
            if any(s.name == entry.name for s in shared):
                raise Invalid(f"{entry.name} is listed twice", f"{path}.resources[{i}].name")
            rename = entry.rename or (entry.name + SHARED_SUFFIX if self.renameByDefault else "")
            shared.append(SharedResource(entry.name, entry.replicas, rename, entry.devices))  # type: ignore[arg-type]
        return tuple(shared)


class Sharing(Section, frozen=True):
    timeSlicing: Replicated = setting(default_factory=Replicated)
    mps: Replicated = setting(default_factory=Replicated)


class Resources(Section, frozen=True):
    gpus: tuple[ResourceRule, ...] = ()
    mig: tuple[ResourceRule, ...] = ()


class Imex(Section, frozen=True):
    channelIDs: tuple[int, ...] = ()
    required: bool = False

    def __post_init__(self) -> None:
        if self.channelIDs not in ((), (0,)):
            raise Invalid(f"invalid IMEX channel IDs: channelIDs must be [] or [0]; found {list(self.channelIDs)}",
                          "channelIDs")


class Document(Section, frozen=True):
    """NVIDIA's v1 config file."""

    version: str = "v1"
    flags: Flags = setting(default_factory=Flags)
    resources: Resources = setting(default_factory=Resources)
    sharing: Sharing = setting(default_factory=Sharing)
    imex: Imex = setting(default_factory=Imex)

    def __post_init__(self) -> None:
        if self.version != "v1":
            raise Invalid(f"unknown version {self.version!r}; only v1 is understood", "version")
        if not self.list_strategies:
            raise Invalid("at least one of envvar, volume-mounts, cdi-annotations, cdi-cri is required",
                          "flags.plugin.deviceListStrategy")
        try:
            check_annotation_key(self.flags.plugin.cdiAnnotationPrefix + "nvidia-device-plugin_x")
        except ValidationError as exc:
            raise Invalid(str(exc), "flags.plugin.cdiAnnotationPrefix") from None
        if self.sharing.mps.resources:
            if self.flags.migStrategy == "mixed":
                raise Invalid("using migStrategy mixed is not supported with MPS", "flags.migStrategy")
            if not self.flags.mpsRoot:
                raise Invalid("using MPS requires mpsRoot (MPS_ROOT) to be set, e.g. /run/nvidia/mps", "flags.mpsRoot")
        self.sharing.timeSlicing.shared("sharing.timeSlicing")
        self.sharing.mps.shared("sharing.mps")

    @property
    def list_strategies(self) -> tuple[str, ...]:
        strategies = self.flags.plugin.deviceListStrategy
        return (strategies,) if isinstance(strategies, str) else tuple(dict.fromkeys(strategies))

    @property
    def driver_root(self) -> str:
        return self.flags.nvidiaDriverRoot or "/"

    @property
    def dev_root(self) -> str:
        return self.flags.nvidiaDevRoot or self.driver_root


# NVIDIA's environment variables -> the key path each sets (environment over file, as NVIDIA does)
_ENV: dict[str, str] = {
    "MIG_STRATEGY": "flags.migStrategy",
    "FAIL_ON_INIT_ERROR": "flags.failOnInitError",
    "NVIDIA_DRIVER_ROOT": "flags.nvidiaDriverRoot",
    "NVIDIA_DEV_ROOT": "flags.nvidiaDevRoot",
    "GDS_ENABLED": "flags.gdsEnabled",
    "MOFED_ENABLED": "flags.mofedEnabled",
    "GDRCOPY_ENABLED": "flags.gdrcopyEnabled",
    "MPS_ROOT": "flags.mpsRoot",
    "DEVICE_DISCOVERY_STRATEGY": "flags.deviceDiscoveryStrategy",
    "PASS_DEVICE_SPECS": "flags.plugin.passDeviceSpecs",
    "DEVICE_LIST_STRATEGY": "flags.plugin.deviceListStrategy",
    "DEVICE_ID_STRATEGY": "flags.plugin.deviceIDStrategy",
    "CDI_ANNOTATION_PREFIX": "flags.plugin.cdiAnnotationPrefix",
    "NVIDIA_CTK_PATH": "flags.plugin.nvidiaCTKPath",
    "NVIDIA_CDI_HOOK_PATH": "flags.plugin.nvidiaCDIHookPath",
    "CONTAINER_DRIVER_ROOT": "flags.plugin.containerDriverRoot",
    "SHARED_DEVICES_ALLOCATION_POLICY": "flags.plugin.sharedDevicesAllocationPolicy",
    "IMEX_CHANNEL_IDS": "imex.channelIDs",
    "IMEX_REQUIRED": "imex.required",
}


def _resource(name: str, key: str) -> str:
    try:
        return resource_name(name)
    except ValidationError as exc:
        raise Invalid(str(exc), key) from None


def resource_name(name: str) -> str:
    """NVIDIA's resource naming: ``nvidia.com/`` is added when missing; 63 characters at most."""
    full = name if name.startswith(RESOURCE_PREFIX + "/") else f"{RESOURCE_PREFIX}/{name}"
    if len(full) > 63:
        raise ValidationError(f"fully-qualified resource name must be 63 characters or less: {full}")
    return check_resource_name(full)


def _without_nulls(value: Any) -> Any:
    """NVIDIA's loader reads a key left empty (``null``) as absent; so does this one."""
    if isinstance(value, Mapping):
        return {k: _without_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):  # inside list items too (sharing.*.resources[]); a null item stays an error
        return [_without_nulls(v) for v in value]
    return value


def _read_document(section: VendorSection, environ: Mapping[str, str]) -> tuple[Any, str]:
    path = section.config_file or environ.get("CONFIG_FILE", "")
    if section.config is not None and path:
        raise ConfigError("vendor: set either 'config' (inline) or 'config_file' / CONFIG_FILE, not both")
    if section.config is not None:
        return section.config, "vendor.config"
    if not path:
        return {}, "<defaults>"
    return parse_yaml(read_text(path, "NVIDIA config file"), path) or {}, path


def load_settings(config: Mapping[str, Any] | None = None, environ: Mapping[str, str] | None = None) -> Settings:
    """Validate the vendor section, read the NVIDIA document and apply NVIDIA's env variables."""
    environ = os.environ if environ is None else environ
    section = load_section(config or {}, VendorSection, root="vendor")
    raw, source = _read_document(section, environ)
    doc = load_section(_without_nulls(raw), Document, source=source, environ=environ, env=_ENV)
    origin = {path: name for name, path in _ENV.items() if environ.get(name, "").strip()}
    return _settings(doc, section, environ, source, origin)


def _settings(doc: Document, section: VendorSection, environ: Mapping[str, str], source: str,
              origin: Mapping[str, str]) -> Settings:
    flags, plugin = doc.flags, doc.flags.plugin
    notes: list[str] = []
    warnings: list[str] = []
    for key in ("nvidiaCTKPath", "nvidiaCDIHookPath", "containerDriverRoot"):
        if getattr(plugin, key) is not None:
            (warnings if f"flags.plugin.{key}" in origin else notes).append(
                f"{_said(origin, f'flags.plugin.{key}')} is accepted but unused: dpkit does not generate CDI specs")
    for key in ("gfd", "useNodeFeatureAPI", "restartOnDeviceUnhealthy"):
        if getattr(flags, key) is not None:
            notes.append(f"flags.{key} is accepted but unused by dpkit"
                         + (" (it configures GPU feature discovery)" if key == "gfd" else ""))
    if flags.failOnInitError is not None:
        notes.append(f"{_said(origin, 'flags.failOnInitError')}: dpkit never exits on NVML errors; it advertises "
                     "what it can and retries")
    for name, why in IGNORED_ENV.items():
        if name in environ:
            warnings.append(f"environment {name} is set but dpkit does not act on it: {why}")
    mps = doc.sharing.mps.shared("sharing.mps")
    time_slicing = doc.sharing.timeSlicing.shared("sharing.timeSlicing")
    strategy = "mps" if mps else "time-slicing" if time_slicing else "none"
    active = doc.sharing.mps if strategy == "mps" else doc.sharing.timeSlicing
    if strategy == "mps" and time_slicing:
        warnings.append("sharing.timeSlicing is ignored: sharing.mps is set too and wins, as in NVIDIA's plugin")
    if flags.mpsRoot is not None and strategy != "mps":
        notes.append(f"{_said(origin, 'flags.mpsRoot')} is used only with sharing.mps")
    fail_above_one = active.failRequestsGreaterThanOne
    return Settings(
        **{key: getattr(section, key) for key in OwnKeys.__struct_fields__},
        mig_strategy=flags.migStrategy,
        fail_on_init_error=flags.failOnInitError is not False,
        driver_root=doc.driver_root,
        dev_root=doc.dev_root,
        pass_device_specs=plugin.passDeviceSpecs,
        list_strategies=doc.list_strategies,
        id_strategy=plugin.deviceIDStrategy,
        cdi_annotation_prefix=plugin.cdiAnnotationPrefix,
        gds_enabled=flags.gdsEnabled,
        mofed_enabled=flags.mofedEnabled,
        gdrcopy_enabled=flags.gdrcopyEnabled,
        gpu_rules=doc.resources.gpus,
        mig_rules=doc.resources.mig,
        shared=mps or time_slicing,
        sharing_strategy=strategy,
        # NVIDIA's current loader: MPS refuses requests above one replica unless the config says
        # failRequestsGreaterThanOne: false; time-slicing allows them unless it says true.
        fail_requests_greater_than_one=strategy == "mps" if fail_above_one is None else fail_above_one,
        allocation_policy=plugin.sharedDevicesAllocationPolicy,
        mps_root=flags.mpsRoot or "",
        imex_channel_ids=doc.imex.channelIDs,
        imex_required=doc.imex.required,
        xids=policy_from_env(environ),
        source=source,
        notes=tuple(notes),
        warnings=tuple(warnings),
    )


def _said(origin: Mapping[str, str], path: str) -> str:
    """How the operator set ``path``: the variable's name when the environment set it."""
    return f"environment {origin[path]}" if path in origin else path


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
