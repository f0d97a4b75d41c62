"""The KubeVirt CR's ``spec.configuration.permittedHostDevices`` block, accepted as-is (camelCase).

Field names, required fields and matching follow KubeVirt's API types and virt-handler's device
manager (kubevirt/kubevirt ``staging/src/kubevirt.io/api/core/v1/types.go`` and
``pkg/virt-handler/device-manager``). Who serves an entry is decided by
``externalResourceProvider``: virt-handler skips entries where it is true and serves the others
itself, so dpkit serves exactly the ``true`` entries and leaves the rest to virt-handler (two
plugins registering one resource replace each other at the kubelet). Entries dpkit does not act on
become :class:`ConfigNote` lines for ``dpkit discover``; shapes KubeVirt's API server refuses
(a missing ``resourceName``, a string where a boolean belongs) are a :class:`ConfigError` naming
the key path.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from dpkit.core import ConfigError
from dpkit.kvm_vfio.selectors import ConfigNote, MdevSelector, Selector, UsbSelector, check_served_name

_KEYS = {"pciHostDevices", "mediatedDevices", "usb"}
_PCI_KEYS = {"pciVendorSelector", "resourceName", "externalResourceProvider"}
_MDEV_KEYS = {"mdevNameSelector", "resourceName", "externalResourceProvider"}
_USB_KEYS = {"resourceName", "selectors", "externalResourceProvider"}
_USB_SELECTOR_KEYS = {"vendor", "product"}
#: spellings of the HyperConverged CR (HCO), which writes the KubeVirt CR from its own
_HCO = {"pciDeviceSelector": "pciVendorSelector", "usbHostDevices": "usb"}
_PCI_ID = re.compile(r"^[0-9a-f]{4}:[0-9a-f]{4}$")
_USB_ID = re.compile(r"^[0-9a-fA-F]{1,8}$")
KUBEVIRT_SERVES = "served by KubeVirt's virt-handler (externalResourceProvider is not true); dpkit leaves it alone"
HANDOVER_HINT = "set externalResourceProvider: true in the KubeVirt CR and here to have dpkit serve it"


@dataclass(frozen=True)
class Permitted:
    """What dpkit serves from the block, plus notes on what it does not."""

    pci: tuple[Selector, ...] = ()
    mdevs: tuple[MdevSelector, ...] = ()
    usbs: tuple[UsbSelector, ...] = ()
    notes: tuple[ConfigNote, ...] = ()


def parse_permitted(raw: Any, where: str) -> Permitted:
    """Validate the block at ``where``; raise :class:`ConfigError` naming the first bad key path."""
    if raw is None:
        return Permitted()
    block = _mapping(raw, where, _KEYS)
    notes: list[ConfigNote] = []
    pci: dict[str, tuple[Selector, str]] = {}
    for key, entry in _entries(block, "pciHostDevices", where):
        fields = _mapping(entry, key, _PCI_KEYS)
        selector, resource, external = (_string(fields, "pciVendorSelector", key), _string(fields, "resourceName", key),
                                        _external(fields, key))
        if not _dpkit_serves(key, resource, external, notes):
            continue
        ids = selector.lower()
        if not _PCI_ID.match(ids):
            notes.append(ConfigNote(key, resource, f"pciVendorSelector {selector!r} never matches: KubeVirt compares "
                                    "it with sysfs IDs as 'vvvv:dddd' in hex", "write it like '10DE:1EB8'"))
            continue
        _replace(pci, ids, (Selector(ids[:4], ids[5:], resource, kubevirt=True), key), notes, "pciVendorSelector")
    mdevs: dict[str, tuple[MdevSelector, str]] = {}
    for key, entry in _entries(block, "mediatedDevices", where):
        fields = _mapping(entry, key, _MDEV_KEYS)
        name, resource, external = (_string(fields, "mdevNameSelector", key), _string(fields, "resourceName", key),
                                    _external(fields, key))
        if not _dpkit_serves(key, resource, external, notes):
            continue
        type_name = name.replace(" ", "_").strip()  # as KubeVirt: "GRID T4-1Q" matches GRID_T4-1Q
        if not type_name:
            notes.append(ConfigNote(key, resource, "an empty mdevNameSelector never matches"))
            continue
        _replace(mdevs, type_name, (MdevSelector(type_name, resource), key), notes, "mdevNameSelector")
    usbs: list[UsbSelector] = []
    for key, entry in _entries(block, "usb", where):
        fields = _mapping(entry, key, _USB_KEYS)
        resource, external = _string(fields, "resourceName", key), _external(fields, key)
        selectors = _usb_selectors(fields.get("selectors"), f"{key}.selectors")
        if not _dpkit_serves(key, resource, external, notes):
            continue
        if not selectors:
            raise ConfigError(f"{key}.selectors: at least one vendor/product selector is needed for dpkit to serve "
                              f"{resource!r} (without one, KubeVirt's handler never finishes matching)")
        parsed = [_usb_id(s) for s in selectors]
        usb_ids = tuple(i for i in parsed if i is not None)
        if len(usb_ids) != len(parsed):
            notes.append(ConfigNote(key, resource, "a vendor or product is not hex: the entry never matches, "
                                    "as in KubeVirt", "write IDs as lsusb shows them, like vendor: '10c4'"))
            usb_ids = ()
        usbs.append(UsbSelector(resource, usb_ids))
    return Permitted(tuple(s for s, _ in pci.values()), tuple(m for m, _ in mdevs.values()), tuple(usbs),
                     tuple(notes))


def _dpkit_serves(key: str, resource: str, external: bool, notes: list[ConfigNote]) -> bool:
    """Whether dpkit serves the entry (externalResourceProvider true; its resourceName is then checked).

    An entry KubeVirt's virt-handler serves itself becomes a note instead.
    """
    if not external:
        notes.append(ConfigNote(key, resource, KUBEVIRT_SERVES, HANDOVER_HINT))
        return False
    check_served_name(resource, f"{key}.resourceName")
    return True


def _mapping(raw: Any, where: str, known: set[str]) -> Mapping[str, Any]:
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where}: expected a mapping, got {type(raw).__name__}")
    unknown = sorted(set(raw) - known, key=str)
    if unknown:
        hints = [f"{k} is the HyperConverged CR's spelling of {_HCO[k]}" for k in unknown if k in _HCO]
        hints += ["disabled is the HyperConverged CR's; leave the entry out instead"] if "disabled" in unknown else []
        raise ConfigError(f"{where}: unknown key(s) {', '.join(map(str, unknown))} (known: {', '.join(sorted(known))})"
                          + (f"; {'; '.join(hints)}" if hints else ""))
    return raw


def _entries(block: Mapping[str, Any], name: str, where: str) -> list[tuple[str, Any]]:
    raw = block.get(name)
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise ConfigError(f"{where}.{name}: expected a list, got {type(raw).__name__}")
    return [(f"{where}.{name}[{i}]", entry) for i, entry in enumerate(raw)]


def _string(fields: Mapping[str, Any], name: str, where: str) -> str:
    value = fields.get(name)
    if value is None:
        raise ConfigError(f"{where}.{name}: required (KubeVirt's API requires it too)")
    if not isinstance(value, str):
        raise ConfigError(f"{where}.{name}: expected a string, got {value!r}")
    return value


def _external(fields: Mapping[str, Any], where: str) -> bool:
    value = fields.get("externalResourceProvider")
    if value is not None and not isinstance(value, bool):
        raise ConfigError(f"{where}.externalResourceProvider: expected true or false, got {value!r}")
    return bool(value)


def _replace(seen: dict[str, Any], key: str, value: tuple[Any, str], notes: list[ConfigNote], field: str) -> None:
    """KubeVirt keeps selectors in a map: a later entry with the same selector replaces the earlier one."""
    if key in seen:
        earlier, where = seen[key]
        notes.append(ConfigNote(where, earlier.resource_name, f"replaced by {value[1]}, which has the same {field} "
                                "(the later entry wins, as in KubeVirt)"))
        del seen[key]
    seen[key] = value


def _usb_selectors(raw: Any, where: str) -> list[Mapping[str, Any]]:
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise ConfigError(f"{where}: expected a list of vendor/product selectors, got {type(raw).__name__}")
    selectors = []
    for i, entry in enumerate(raw):
        fields = _mapping(entry, f"{where}[{i}]", _USB_SELECTOR_KEYS)
        _string(fields, "vendor", f"{where}[{i}]")
        _string(fields, "product", f"{where}[{i}]")
        selectors.append(fields)
    return selectors


def _usb_id(selector: Mapping[str, Any]) -> tuple[str, str] | None:
    """(vendor, product) as 4-digit lower-case hex, or None when KubeVirt could not parse them."""
    parts = [str(selector["vendor"]), str(selector["product"])]
    if not all(_USB_ID.match(p) and int(p, 16) <= 0xFFFF for p in parts):
        return None
    return f"{int(parts[0], 16):04x}", f"{int(parts[1], 16):04x}"
