"""The KubeVirt CR's ``spec.configuration.permittedHostDevices`` block, accepted as-is (camelCase).

Field names, required fields and matching follow KubeVirt's API types and virt-handler's device
manager (kubevirt/kubevirt ``staging/src/kubevirt.io/api/core/v1/types.go`` and
``pkg/virt-handler/device-manager``). Who serves an entry is decided by
``externalResourceProvider``: virt-handler skips entries where it is true and serves the others
itself, so dpkit serves exactly the ``true`` entries and leaves the rest to virt-handler (two
plugins registering one resource replace each other at the kubelet). Entries dpkit does not act on
become :class:`ConfigNote` lines for ``dpkit discover``; shapes KubeVirt's API server refuses
(a missing ``resourceName``, a string where a boolean belongs) are a :class:`ConfigError` naming
the key path: the classes below declare them and the core's schema layer converts the block.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Annotated, Any, TypeVar

from dpkit.core import ConfigError, Invalid, Meta, Section, setting
from dpkit.kvm_vfio.selectors import ConfigNote, MdevSelector, Selector, UsbSelector, check_served_name

_PCI_ID = re.compile(r"^[0-9a-f]{4}:[0-9a-f]{4}$")
_USB_ID = re.compile(r"^[0-9a-fA-F]{1,8}$")
KUBEVIRT_SERVES = "served by KubeVirt's virt-handler (externalResourceProvider is not true); dpkit leaves it alone"
HANDOVER_HINT = "set externalResourceProvider: true in the KubeVirt CR and here to have dpkit serve it"

# Keys of the HyperConverged CR (HCO), which writes the KubeVirt CR from its own: declared so that
# the error says what to write instead (a did-you-mean cannot guess usb from usbHostDevices).
HcoSelector = Annotated[None, Meta(description="pciVendorSelector instead (pciDeviceSelector is the "
                                               "HyperConverged CR's spelling of pciVendorSelector)")]
HcoUsb = Annotated[None, Meta(description="usb instead (usbHostDevices is the HyperConverged CR's spelling of usb)")]
HcoDisabled = Annotated[None, Meta(description="the entry left out instead (disabled is the HyperConverged CR's)")]


def served_name(resource: str, key: str) -> None:
    """:func:`check_served_name` as the schema layer's :class:`Invalid` naming ``key``."""
    try:
        check_served_name(resource, "")
    except ConfigError as exc:
        raise Invalid(str(exc).removeprefix(": "), key) from None


class Entry(Section, frozen=True, kw_only=True):
    """What every entry has; ``resourceName`` is checked only where dpkit serves it (else it is KubeVirt's)."""

    resourceName: str
    externalResourceProvider: bool | None = None
    disabled: HcoDisabled = None

    def __post_init__(self) -> None:
        if self.externalResourceProvider:
            served_name(self.resourceName, "resourceName")


class PciEntry(Entry, frozen=True, kw_only=True):
    pciVendorSelector: str
    pciDeviceSelector: HcoSelector = None


class MdevEntry(Entry, frozen=True, kw_only=True):
    mdevNameSelector: str


class UsbId(Section, frozen=True):
    vendor: str
    product: str

    def parsed(self) -> tuple[str, str] | None:
        """(vendor, product) as 4-digit lower-case hex, or None when KubeVirt could not parse them."""
        if not all(_USB_ID.match(p) and int(p, 16) <= 0xFFFF for p in (self.vendor, self.product)):
            return None
        return f"{int(self.vendor, 16):04x}", f"{int(self.product, 16):04x}"


class UsbEntry(Entry, frozen=True, kw_only=True):
    selectors: tuple[UsbId, ...] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.externalResourceProvider and not self.selectors:
            raise Invalid(f"at least one vendor/product selector is needed for dpkit to serve {self.resourceName!r} "
                          "(without one, KubeVirt's handler never finishes matching)", "selectors")


class PermittedHostDevices(Section, frozen=True):
    pciHostDevices: tuple[PciEntry, ...] | None = None
    mediatedDevices: tuple[MdevEntry, ...] | None = None
    usb: tuple[UsbEntry, ...] | None = None
    usbHostDevices: HcoUsb = setting(default=None)


E = TypeVar("E", bound=Entry)


@dataclass(frozen=True)
class Permitted:
    """What dpkit serves from the block, plus notes on what it does not."""

    pci: tuple[Selector, ...] = ()
    mdevs: tuple[MdevSelector, ...] = ()
    usbs: tuple[UsbSelector, ...] = ()
    notes: tuple[ConfigNote, ...] = ()


def permitted(block: PermittedHostDevices | None, where: str) -> Permitted:
    """The selectors dpkit serves from the checked block at ``where``, and notes on every entry it does not."""
    if block is None:
        return Permitted()
    notes: list[ConfigNote] = []
    pci: dict[str, tuple[Selector, str]] = {}
    for key, entry in _served(block.pciHostDevices, f"{where}.pciHostDevices", notes):
        ids = entry.pciVendorSelector.lower()
        if not _PCI_ID.match(ids):
            notes.append(ConfigNote(key, entry.resourceName, f"pciVendorSelector {entry.pciVendorSelector!r} never "
                                    "matches: KubeVirt compares it with sysfs IDs as 'vvvv:dddd' in hex",
                                    "write it like '10DE:1EB8'"))
            continue
        _replace(pci, ids, (Selector(ids[:4], ids[5:], entry.resourceName, kubevirt=True), key), notes,
                 "pciVendorSelector")
    mdevs: dict[str, tuple[MdevSelector, str]] = {}
    for key, mdev in _served(block.mediatedDevices, f"{where}.mediatedDevices", notes):
        type_name = mdev.mdevNameSelector.replace(" ", "_").strip()  # as KubeVirt: "GRID T4-1Q" matches GRID_T4-1Q
        if not type_name:
            notes.append(ConfigNote(key, mdev.resourceName, "an empty mdevNameSelector never matches"))
            continue
        _replace(mdevs, type_name, (MdevSelector(type_name, mdev.resourceName), key), notes, "mdevNameSelector")
    usbs: list[UsbSelector] = []
    for key, usb in _served(block.usb, f"{where}.usb", notes):
        parsed = [s.parsed() for s in usb.selectors or ()]
        usb_ids = tuple(i for i in parsed if i is not None)
        if len(usb_ids) != len(parsed):
            notes.append(ConfigNote(key, usb.resourceName, "a vendor or product is not hex: the entry never matches, "
                                    "as in KubeVirt", "write IDs as lsusb shows them, like vendor: '10c4'"))
            usb_ids = ()
        usbs.append(UsbSelector(usb.resourceName, usb_ids))
    return Permitted(tuple(s for s, _ in pci.values()), tuple(m for m, _ in mdevs.values()), tuple(usbs),
                     tuple(notes))


def _served(entries: tuple[E, ...] | None, where: str, notes: list[ConfigNote]) -> list[tuple[str, E]]:
    """The entries dpkit serves (externalResourceProvider true), with their key paths.

    An entry KubeVirt's virt-handler serves itself becomes a note instead.
    """
    served: list[tuple[str, E]] = []
    for index, entry in enumerate(entries or ()):
        key = f"{where}[{index}]"
        if entry.externalResourceProvider:
            served.append((key, entry))
        else:
            notes.append(ConfigNote(key, entry.resourceName, KUBEVIRT_SERVES, HANDOVER_HINT))
    return served


def _replace(seen: dict[str, Any], key: str, value: tuple[Any, str], notes: list[ConfigNote], field: str) -> None:
    """KubeVirt keeps selectors in a map: a later entry with the same selector replaces the earlier one."""
    if key in seen:
        earlier, where = seen[key]
        notes.append(ConfigNote(where, earlier.resource_name, f"replaced by {value[1]}, which has the same {field} "
                                "(the later entry wins, as in KubeVirt)"))
        del seen[key]
    seen[key] = value
