"""The ``vendor:`` section for kvm_vfio, validated once so the rest of the package trusts it.

Every error is a :class:`ConfigError` naming the key (``vendor.pci_host_devices[0].resource_name``)
and what was expected. Two formats are accepted side by side: dpkit's own (``pci_host_devices``)
and the KubeVirt CR's ``permittedHostDevices`` block as-is (see :mod:`dpkit.kvm_vfio.kubevirt`).
See docs/kubevirt.md for the meaning of each key.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from dpkit.core import ConfigError, ValidationError, check_host_path
from dpkit.kvm_vfio.kubevirt import Permitted, parse_permitted
from dpkit.kvm_vfio.selectors import (
    SHARED_RESOURCES,
    ConfigNote,
    MdevSelector,
    Selector,
    UsbSelector,
    check_served_name,
)

__all__ = ["SHARED_RESOURCES", "ConfigNote", "KvmVfioConfig", "MdevSelector", "Selector", "UsbSelector", "parse_config"]

#: KubeVirt's virt-handler advertises this many slots of each shared node ("max VMIs per node").
DEFAULT_SLOTS = 1000
MAX_SLOTS = 100_000
_HEX4 = re.compile(r"^(0x)?[0-9a-fA-F]{1,4}$")
_CLASS = re.compile(r"^(0x)?[0-9a-fA-F]{2,6}$")
_PCI_ADDRESS = re.compile(r"^[0-9a-f]{4}:[0-9a-f]{2}:[0-9a-f]{2}\.[0-7]$")
_SELECTOR_KEYS = {"pci_vendor_selector", "resource_name", "class", "addresses"}
_TOP_KEYS = {"sys_root", "dev_root", "kvm_slots", "vhost_net_slots", "tun_slots", "pci_host_devices",
             "health_interval", "uevent_source", "pci_ids", "permittedHostDevices", "usb_owner"}
#: KubeVirt's non-root virt-launcher runs QEMU as this user; KubeVirt hands USB nodes to it
KUBEVIRT_QEMU_UID = 107


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
    pci_ids: str = ""  # accepted as before, no longer read: names come from udev (names.py)
    mdevs: tuple[MdevSelector, ...] = ()
    usbs: tuple[UsbSelector, ...] = ()
    #: what ``permittedHostDevices`` says that dpkit does not serve, for ``dpkit discover``
    notes: tuple[ConfigNote, ...] = ()
    usb_owner: int | None = KUBEVIRT_QEMU_UID


def parse_config(raw: Mapping[str, Any]) -> KvmVfioConfig:
    """Validate the ``vendor:`` mapping; raise :class:`ConfigError` naming the first bad key."""
    if not isinstance(raw, Mapping):
        raise ConfigError(f"vendor: expected a mapping of kvm_vfio settings, got {type(raw).__name__}")
    unknown = sorted(set(raw) - _TOP_KEYS, key=str)
    if unknown:
        raise ConfigError(f"vendor: unknown key(s) {', '.join(map(str, unknown))} for vendor kvm_vfio "
                          f"(known: {', '.join(sorted(_TOP_KEYS))})")
    defaults = KvmVfioConfig()
    selectors = _selectors(raw.get("pci_host_devices", []))
    permitted = parse_permitted(raw.get("permittedHostDevices"), "vendor.permittedHostDevices")
    _check_resource_kinds(selectors, permitted)
    return KvmVfioConfig(
        sys_root=_path(raw, "sys_root", defaults.sys_root),
        dev_root=_path(raw, "dev_root", defaults.dev_root),
        kvm_slots=_slots(raw, "kvm_slots"),
        vhost_net_slots=_slots(raw, "vhost_net_slots"),
        tun_slots=_slots(raw, "tun_slots"),
        selectors=selectors + permitted.pci,
        health_interval=_seconds(raw, "health_interval", defaults.health_interval),
        uevent_source=_choice(raw, "uevent_source", ("udev", "kernel"), defaults.uevent_source),
        pci_ids=_path(raw, "pci_ids", "") if "pci_ids" in raw else "",
        mdevs=permitted.mdevs,
        usbs=permitted.usbs,
        notes=permitted.notes + _pci_ids_note(raw),
        usb_owner=_owner(raw),
    )


def _pci_ids_note(raw: Mapping[str, Any]) -> tuple[ConfigNote, ...]:
    """``pci_ids`` is still accepted (nothing accepted before is refused now) but names come from udev."""
    if "pci_ids" not in raw:
        return ()
    return (ConfigNote("vendor.pci_ids", "", "is no longer read: PCI device names come from the host's udev "
                       "database (ID_MODEL_FROM_DATABASE, /run/udev)",
                       "remove the key; set resource_name in a selector to pin a resource's name"),)


def _owner(raw: Mapping[str, Any]) -> int | None:
    value = raw.get("usb_owner", KUBEVIRT_QEMU_UID)
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**31):
        raise ConfigError(f"vendor.usb_owner: expected a user ID (KubeVirt's QEMU runs as {KUBEVIRT_QEMU_UID}) "
                          f"or null to leave USB nodes alone, got {value!r}")
    return value


def _check_resource_kinds(selectors: tuple[Selector, ...], permitted: Permitted) -> None:
    """One resource, one kind of device: its IDs and its env variable depend on the kind."""
    kinds: dict[str, str] = {}
    named = [(s.resource_name, "vendor.pci_host_devices") for s in selectors if s.resource_name]
    named += [(s.resource_name, "vendor.permittedHostDevices.pciHostDevices") for s in permitted.pci]
    named += [(m.resource_name, "vendor.permittedHostDevices.mediatedDevices") for m in permitted.mdevs]
    named += [(u.resource_name, "vendor.permittedHostDevices.usb") for u in permitted.usbs]
    for resource, where in named:
        first = kinds.setdefault(resource, where)
        if first != where:
            raise ConfigError(f"{where}: resource {resource!r} is also served by {first}; "
                              "give each kind of device its own resource name")


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
        check_served_name(resource, f"{where}.resource_name")
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
