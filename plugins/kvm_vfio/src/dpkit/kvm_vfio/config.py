"""The ``vendor:`` section for kvm_vfio, validated once so the rest of the package trusts it.

Every error is a :class:`ConfigError` naming the key (``vendor.pci_host_devices[0].resource_name``)
and what was expected: the classes below declare each key's type, range and default, and the
core's schema layer converts the section into them. Two formats are accepted side by side:
dpkit's own (``pci_host_devices``) and the KubeVirt CR's ``permittedHostDevices`` block as-is
(see :mod:`dpkit.kvm_vfio.kubevirt`). See docs/kubevirt.md for the meaning of each key.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any, Literal

from dpkit.core import (
    ConfigError,
    Derived,
    Invalid,
    Meta,
    Section,
    ValidationError,
    check_host_path,
    force_setattr,
    load_section,
    setting,
)
from dpkit.kvm_vfio.kubevirt import Permitted, PermittedHostDevices, permitted, served_name
from dpkit.kvm_vfio.selectors import SHARED_RESOURCES, ConfigNote, MdevSelector, Selector, UsbSelector

__all__ = ["SHARED_RESOURCES", "ConfigNote", "KvmVfioConfig", "MdevSelector", "Selector", "UsbSelector", "parse_config"]

#: KubeVirt's virt-handler advertises this many slots of each shared node ("max VMIs per node").
DEFAULT_SLOTS = 1000
MAX_SLOTS = 100_000
#: KubeVirt's non-root virt-launcher runs QEMU as this user; KubeVirt hands USB nodes to it
KUBEVIRT_QEMU_UID = 107

Slots = Annotated[int, Meta(ge=0, le=MAX_SLOTS, description="a whole number of slots (0: off)")]
VendorDevice = Annotated[str, Meta(pattern="^(0x)?[0-9a-fA-F]{1,4}:(0x)?[0-9a-fA-F]{1,4}$",
                                   description="'VENDOR:DEVICE' in hex, like '10DE:1EB8'")]
PciClass = Annotated[str, Meta(pattern="^((0x)?[0-9a-fA-F]{2,6})?$",
                               description="a hex PCI class prefix like '0x0302'")]
PciAddress = Annotated[str, Meta(pattern=r"^[0-9a-fA-F]{4}:[0-9a-fA-F]{2}:[0-9a-fA-F]{2}\.[0-7]$",
                                 description="a PCI address like '0000:3b:00.0'")]
UserId = Annotated[int, Meta(ge=0, le=2**31 - 1,
                             description=f"a user ID (KubeVirt's QEMU runs as {KUBEVIRT_QEMU_UID})")]


class PciHostDevice(Section, frozen=True):
    """One dpkit-format ``pci_host_devices`` entry."""

    pci_vendor_selector: VendorDevice
    resource_name: str = ""
    pci_class: PciClass = setting(default="", name="class")
    addresses: tuple[PciAddress, ...] = ()

    def __post_init__(self) -> None:
        if self.resource_name:
            served_name(self.resource_name, "resource_name")

    def selector(self) -> Selector:
        vendor, device = (p.lower().removeprefix("0x").rjust(4, "0") for p in self.pci_vendor_selector.split(":"))
        return Selector(vendor, device, self.resource_name, self.pci_class.lower().removeprefix("0x"),
                        tuple(a.lower() for a in self.addresses))


class KvmVfioConfig(Section, frozen=True):
    sys_root: str = "/sys"
    dev_root: str = "/dev"
    kvm_slots: Slots = DEFAULT_SLOTS
    vhost_net_slots: Slots = DEFAULT_SLOTS
    tun_slots: Slots = DEFAULT_SLOTS
    pci_host_devices: tuple[PciHostDevice, ...] = ()
    #: KubeVirt's CR block as-is (see :mod:`dpkit.kvm_vfio.kubevirt`)
    permitted_host_devices: PermittedHostDevices | None = setting(default=None, name="permittedHostDevices")
    health_interval: Annotated[float, Meta(ge=0.05, le=3600, description="a number of seconds")] = 5.0
    uevent_source: Literal["udev", "kernel"] = "udev"
    #: accepted as before, no longer read: names come from udev (names.py)
    pci_ids: Annotated[str, Meta(min_length=1, description="an absolute path")] = ""
    usb_owner: UserId | None = KUBEVIRT_QEMU_UID  # None: leave USB nodes alone
    selectors: Annotated[tuple[Selector, ...], Derived] = ()
    mdevs: Annotated[tuple[MdevSelector, ...], Derived] = ()
    usbs: Annotated[tuple[UsbSelector, ...], Derived] = ()
    #: what ``permittedHostDevices`` says that dpkit does not serve, for ``dpkit discover``
    notes: Annotated[tuple[ConfigNote, ...], Derived] = ()

    def __post_init__(self) -> None:
        for key in ("sys_root", "dev_root", "pci_ids"):
            value = getattr(self, key)
            if key != "pci_ids" or value:
                try:
                    check_host_path(value)
                except ValidationError:
                    raise Invalid(f"expected an absolute path without '..', got {value!r}", key) from None
                force_setattr(self, key, value.rstrip("/") or "/")
        own = tuple(entry.selector() for entry in self.pci_host_devices)
        block = permitted(self.permitted_host_devices, "vendor.permittedHostDevices")
        _check_resource_kinds(own, block)
        force_setattr(self, "selectors", own + block.pci)
        force_setattr(self, "mdevs", block.mdevs)
        force_setattr(self, "usbs", block.usbs)
        force_setattr(self, "notes", block.notes + _pci_ids_note(self.pci_ids))


def parse_config(raw: Mapping[str, Any]) -> KvmVfioConfig:
    """Validate the ``vendor:`` mapping; raise :class:`ConfigError` naming the first bad key."""
    return load_section(raw, KvmVfioConfig, root="vendor")


def _pci_ids_note(pci_ids: str) -> tuple[ConfigNote, ...]:
    """``pci_ids`` is still accepted (nothing accepted before is refused now) but names come from udev."""
    if not pci_ids:
        return ()
    return (ConfigNote("vendor.pci_ids", "", "is no longer read: PCI device names come from the host's udev "
                       "database (ID_MODEL_FROM_DATABASE, /run/udev)",
                       "remove the key; set resource_name in a selector to pin a resource's name"),)


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
