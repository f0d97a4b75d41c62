"""The ``vendor:`` section for the Solarflare package, validated once at start.

Every error is a :class:`ConfigError` naming the key (``vendor.pools[1].slots``), so an operator
can fix the ConfigMap without reading code. The classes below declare each key's type, range and
default; the core's schema layer converts the section into them, and ``__post_init__`` holds the
rules types cannot say. See docs/sfc.md for the meaning of each key.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Annotated, Any, Literal

from dpkit.core import (
    ConfigError,
    Derived,
    Invalid,
    Meta,
    Section,
    ValidationError,
    check_resource_name,
    force_setattr,
    load_section,
    setting,
)
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
_EF_NAME = re.compile(r"^EF_[A-Z0-9_]+$")
_DPKIT_KEYS = ("resource", "slots", "pools", "onload")
_ONLOAD_PLUGIN_KEYS = ("devicePlugin", "args")

Name = Annotated[str, Meta(min_length=1)]
Slots = Annotated[int, Meta(ge=1, le=MAX_SLOTS, description="a whole number of slots")]
AbsPath = Annotated[str, Meta(pattern=r"^/(?!(?s:.*/)?\.\.(?:/|\Z))[^\x00\n]*\Z",
                              description="an absolute path without '..' or control characters")]
VendorId = Annotated[str, Meta(pattern="^0[xX][0-9a-fA-F]{4}$", description="a PCI vendor ID like '0x1924'")]


def _resource(name: str, key: str) -> None:
    try:
        check_resource_name(name)
    except ValidationError as exc:
        raise Invalid(str(exc), key) from None


def _clean(section: Section, key: str) -> None:
    """An absolute path without its trailing slashes."""
    force_setattr(section, key, getattr(section, key).rstrip("/") or "/")


class Pool(Section, frozen=True):
    """A resource of its own for the interfaces matching a name pattern or a PCI address."""

    resource: str
    interfaces: tuple[Name, ...] = ()  # fnmatch patterns on interface names
    pci_addresses: tuple[Name, ...] = ()  # fnmatch patterns on PCI addresses
    slots: Slots = 1

    def __post_init__(self) -> None:
        _resource(self.resource, "resource")
        force_setattr(self, "pci_addresses", tuple(a.lower() for a in self.pci_addresses))
        if not self.interfaces and not self.pci_addresses:
            raise Invalid("a pool needs 'interfaces' or 'pci_addresses' patterns to match")


class OnloadConfig(Section, frozen=True):
    """Where the host's Onload lives and what an Onload container gets besides the device nodes."""

    required: bool = False
    library_path: AbsPath = DEFAULT_LIBRARY_PATH
    container_library_path: AbsPath = DEFAULT_LIBRARY_PATH
    preload: bool = False
    env: Mapping[str, Any] = {}  # Onload tuning variables; numbers become their text

    def __post_init__(self) -> None:
        _clean(self, "library_path")
        _clean(self, "container_library_path")
        env: dict[str, str] = {}
        for name, value in self.env.items():
            if not _EF_NAME.match(name):
                raise Invalid("only Onload tuning variables (EF_ followed by A-Z, 0-9, _) belong here", f"env.{name}")
            if isinstance(value, bool) or not isinstance(value, str | int | float):
                raise Invalid(f"expected a string or number, got {value!r}", f"env.{name}")
            if "\x00" in str(value) or "\n" in str(value):
                raise Invalid("the value contains a control character", f"env.{name}")
            env[name] = str(value)
        force_setattr(self, "env", env)


class SfcConfig(Section, frozen=True):
    mode: Literal["dpkit", "onload", "solarflare"] = "dpkit"
    resource: str = DEFAULT_RESOURCE
    slots: Slots = 1
    vendor_ids: Annotated[tuple[VendorId, ...], Meta(min_length=1)] = DEFAULT_VENDOR_IDS
    drivers: Annotated[tuple[Name, ...], Meta(min_length=1)] = DEFAULT_DRIVERS
    pools: tuple[Pool, ...] = ()
    onload: OnloadConfig = setting(default_factory=OnloadConfig)
    sys_root: AbsPath = "/sys"
    dev_root: AbsPath = "/dev"
    udev_source: Literal["udev", "kernel"] = "udev"
    resync_interval: Annotated[float, Meta(gt=0, description="a number of seconds")] = 30.0
    device_plugin: Annotated[compat.DevicePluginSpec | None, Meta(  # mode onload: the Onload CR's keys
        description="the Onload CR's spec.devicePlugin mapping")] = setting(default=None, name="devicePlugin")
    args: Annotated[tuple[compat.Arg, ...] | None, Meta(  # mode onload: the Onload plugin's flags
        description="a list of command-line arguments")] = None
    onload_plugin: Annotated[compat.OnloadPluginConfig | None, Derived] = None  # from the two above, mode onload


    def __post_init__(self) -> None:
        _resource(self.resource, "resource")
        _clean(self, "sys_root")
        _clean(self, "dev_root")
        force_setattr(self, "vendor_ids", tuple(v.lower() for v in self.vendor_ids))
        if self.mode == "solarflare" and self.resource != LEGACY_RESOURCE:
            raise Invalid(f"mode solarflare keeps the resource {LEGACY_RESOURCE} of Solarflare's device plugin, got "
                          f"{self.resource!r}; use mode dpkit to rename it", "resource")
        seen: set[str] = set()
        for index, name in enumerate(self.resources):
            if name in seen:
                raise Invalid(f"resource {name!r} is used twice", "resource" if index == 0 else
                              f"pools[{index - 1}].resource")
            seen.add(name)
        if self.mode == "onload":
            force_setattr(self, "onload_plugin", compat.onload_plugin_config(self.device_plugin, self.args))

    @property
    def resources(self) -> tuple[str, ...]:
        """Every resource served, default first."""
        if self.mode == "onload":
            return (compat.RESOURCE,)
        return (self.resource, *(p.resource for p in self.pools))


def parse_config(raw: Mapping[str, Any] | None) -> SfcConfig:
    """Validate the ``vendor:`` section; raises :class:`ConfigError` naming the bad key."""
    raw = raw or {}
    mode = raw.get("mode", "dpkit") if isinstance(raw, Mapping) else None
    wrong = sorted(k for k in (_DPKIT_KEYS if mode == "onload" else _ONLOAD_PLUGIN_KEYS) if k in raw) if mode else []
    if wrong and mode == "onload":
        raise ConfigError(f"vendor: {', '.join(wrong)} belong(s) to mode dpkit; in mode onload the resource is "
                          f"{compat.RESOURCE} and the Onload plugin's own settings go in vendor.devicePlugin "
                          "(the Onload CR's keys) or vendor.args (its flags)")
    if wrong:
        raise ConfigError(f"vendor: {', '.join(wrong)} configure(s) AMD's Onload device plugin; add "
                          "'mode: onload' to serve amd.com/onload as that plugin does")
    return load_section(raw, SfcConfig, root="vendor")
