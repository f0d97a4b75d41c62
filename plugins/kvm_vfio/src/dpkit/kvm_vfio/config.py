"""The ``vendor:`` section for kvm_vfio, validated once so the rest of the package trusts it.

Every error is a :class:`ConfigError` naming the key (``vendor.pci_host_devices[0].resource_name``)
and what was expected. See docs/kubevirt.md for the meaning of each key.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from dpkit.core.errors import ConfigError, ValidationError
from dpkit.core.validation import check_host_path, check_resource_name

#: KubeVirt's virt-handler advertises this many slots of each shared node ("max VMIs per node").
DEFAULT_SLOTS = 1000
MAX_SLOTS = 100_000
_HEX4 = re.compile(r"^(0x)?[0-9a-fA-F]{1,4}$")
_CLASS = re.compile(r"^(0x)?[0-9a-fA-F]{2,6}$")
_PCI_ADDRESS = re.compile(r"^[0-9a-f]{4}:[0-9a-f]{2}:[0-9a-f]{2}\.[0-7]$")
#: the shared-node resources; a selector may not reuse them
SHARED_RESOURCES = ("devices.kubevirt.io/kvm", "devices.kubevirt.io/vhost-net", "devices.kubevirt.io/tun")
_SELECTOR_KEYS = {"pci_vendor_selector", "resource_name", "class", "addresses"}
_TOP_KEYS = {"sys_root", "dev_root", "kvm_slots", "vhost_net_slots", "tun_slots", "pci_host_devices",
             "health_interval", "uevent_source", "pci_ids"}


@dataclass(frozen=True)
class Selector:
    """One ``pci_host_devices`` entry: which PCI functions to pass through, under which name.

    ``vendor``/``device`` are lower-case 4-digit hex; ``pci_class`` a lower-case hex prefix of
    the 6-digit class code (``0302`` matches 3D controllers); ``addresses`` limits the match to
    those functions. An empty ``resource_name`` means "derive it from the device's name".
    """

    vendor: str
    device: str
    resource_name: str = ""
    pci_class: str = ""
    addresses: tuple[str, ...] = ()

    def matches(self, vendor: str, device: str, pci_class: str, address: str) -> bool:
        return (
            vendor == self.vendor
            and device == self.device
            and (not self.pci_class or pci_class.startswith(self.pci_class))
            and (not self.addresses or address in self.addresses)
        )


@dataclass(frozen=True)
class KvmVfioConfig:
    sys_root: str = "/sys"
    dev_root: str = "/dev"
    kvm_slots: int = DEFAULT_SLOTS
    vhost_net_slots: int = DEFAULT_SLOTS
    tun_slots: int = DEFAULT_SLOTS
    selectors: tuple[Selector, ...] = ()
    health_interval: float = 5.0
    uevent_source: str = "udev"
    pci_ids: str = ""  # empty: the first of PCI_IDS_PATHS that exists


def parse_config(raw: Mapping[str, Any]) -> KvmVfioConfig:
    """Validate the ``vendor:`` mapping; raise :class:`ConfigError` naming the first bad key."""
    if not isinstance(raw, Mapping):
        raise ConfigError(f"vendor: expected a mapping of kvm_vfio settings, got {type(raw).__name__}")
    unknown = sorted(set(raw) - _TOP_KEYS)
    if unknown:
        raise ConfigError(f"vendor: unknown key(s) {', '.join(map(str, unknown))} for vendor kvm_vfio "
                          f"(known: {', '.join(sorted(_TOP_KEYS))})")
    defaults = KvmVfioConfig()
    return KvmVfioConfig(
        sys_root=_path(raw, "sys_root", defaults.sys_root),
        dev_root=_path(raw, "dev_root", defaults.dev_root),
        kvm_slots=_slots(raw, "kvm_slots"),
        vhost_net_slots=_slots(raw, "vhost_net_slots"),
        tun_slots=_slots(raw, "tun_slots"),
        selectors=_selectors(raw.get("pci_host_devices", [])),
        health_interval=_seconds(raw, "health_interval", defaults.health_interval),
        uevent_source=_choice(raw, "uevent_source", ("udev", "kernel"), defaults.uevent_source),
        pci_ids=_path(raw, "pci_ids", "") if "pci_ids" in raw else "",
    )


def _path(raw: Mapping[str, Any], key: str, default: str) -> str:
    value = raw.get(key, default)
    try:
        check_host_path(value)
    except ValidationError:
        raise ConfigError(f"vendor.{key}: expected an absolute path without '..', got {value!r}") from None
    return value.rstrip("/") or "/"


def _slots(raw: Mapping[str, Any], key: str) -> int:
    value = raw.get(key, DEFAULT_SLOTS)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_SLOTS:
        raise ConfigError(f"vendor.{key}: expected a whole number of slots from 0 (off) to {MAX_SLOTS}, "
                          f"got {value!r}")
    return value


def _seconds(raw: Mapping[str, Any], key: str, default: float) -> float:
    value = raw.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0.05 <= value <= 3600:
        raise ConfigError(f"vendor.{key}: expected a number of seconds from 0.05 to 3600, got {value!r}")
    return float(value)


def _choice(raw: Mapping[str, Any], key: str, choices: tuple[str, ...], default: str) -> str:
    value = raw.get(key, default)
    if value not in choices:
        raise ConfigError(f"vendor.{key}: expected one of {', '.join(choices)}, got {value!r}")
    return str(value)


def _selectors(raw: Any) -> tuple[Selector, ...]:
    if not isinstance(raw, list):
        raise ConfigError(f"vendor.pci_host_devices: expected a list of selectors, got {type(raw).__name__}")
    return tuple(_selector(entry, f"vendor.pci_host_devices[{i}]") for i, entry in enumerate(raw))


def _selector(entry: Any, where: str) -> Selector:
    if not isinstance(entry, Mapping):
        raise ConfigError(f"{where}: expected a mapping with pci_vendor_selector, got {type(entry).__name__}")
    unknown = sorted(set(entry) - _SELECTOR_KEYS)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(map(str, unknown))} "
                          f"(known: {', '.join(sorted(_SELECTOR_KEYS))})")
    ids = entry.get("pci_vendor_selector")
    parts = ids.split(":") if isinstance(ids, str) else []
    if len(parts) != 2 or not all(_HEX4.match(p) for p in parts):
        raise ConfigError(f"{where}.pci_vendor_selector: expected 'VENDOR:DEVICE' in hex, like '10DE:1EB8', "
                          f"got {ids!r}")
    vendor, device = (_hex(p, 4) for p in parts)
    resource = entry.get("resource_name", "")
    if not isinstance(resource, str):
        raise ConfigError(f"{where}.resource_name: expected a string, got {resource!r}")
    if resource:
        try:
            check_resource_name(resource)
        except ValidationError as exc:
            raise ConfigError(f"{where}.resource_name: {exc}") from None
        if resource in SHARED_RESOURCES:
            raise ConfigError(f"{where}.resource_name: {resource!r} is the shared node resource of that name")
    pci_class = entry.get("class", "")
    if pci_class != "" and not (isinstance(pci_class, str) and _CLASS.match(pci_class)):
        raise ConfigError(f"{where}.class: expected a hex PCI class prefix like '0x0302', got {pci_class!r}")
    pci_class = pci_class.lower().removeprefix("0x") if pci_class else ""
    addresses = entry.get("addresses", [])
    if not isinstance(addresses, list) or not all(isinstance(a, str) for a in addresses):
        raise ConfigError(f"{where}.addresses: expected a list of PCI addresses, got {addresses!r}")
    for address in addresses:
        if not _PCI_ADDRESS.match(address.lower()):
            raise ConfigError(f"{where}.addresses: {address!r} is not a PCI address like '0000:3b:00.0'")
    return Selector(vendor, device, resource, pci_class, tuple(a.lower() for a in addresses))


def _hex(text: str, width: int) -> str:
    return text.lower().removeprefix("0x").rjust(width, "0")
