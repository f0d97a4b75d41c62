"""What the configuration selects: PCI functions, mediated devices and USB devices, by resource.

Plain values shared by the config parsers (dpkit's format and KubeVirt's ``permittedHostDevices``)
and the scanners, so neither imports the other.
"""

from __future__ import annotations

from dataclasses import dataclass

from dpkit.core import ConfigError, ValidationError, check_resource_name

#: the shared-node resources; a selector may not reuse them
SHARED_RESOURCES = ("devices.kubevirt.io/kvm", "devices.kubevirt.io/vhost-net", "devices.kubevirt.io/tun")


def check_served_name(resource: str, field: str) -> None:
    """A resource a selector serves must be one the kubelet accepts and not a shared node resource.

    ``field`` is the key path named in the :class:`ConfigError` (``pci_host_devices[0].resource_name``).
    """
    try:
        check_resource_name(resource)
    except ValidationError as exc:
        raise ConfigError(f"{field}: {exc}") from None
    if resource in SHARED_RESOURCES:
        raise ConfigError(f"{field}: {resource!r} is the shared node resource of that name")

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
    #: from ``permittedHostDevices``: devices are reported as KubeVirt reports them (ID = IOMMU group)
    kubevirt: bool = False

    def matches(self, vendor: str, device: str, pci_class: str, address: str) -> bool:
        return (
            vendor == self.vendor
            and device == self.device
            and (not self.pci_class or pci_class.startswith(self.pci_class))
            and (not self.addresses or address in self.addresses)
        )


@dataclass(frozen=True)
class MdevSelector:
    """One ``mediatedDevices`` entry dpkit serves: mdevs of a type name, as KubeVirt matches them.

    ``type_name`` is the selector with spaces as ``_`` (``GRID T4-1Q`` -> ``GRID_T4-1Q``), compared
    with the mdev type's ``name`` file treated the same way (or the type's directory name when the
    driver offers no ``name``).
    """

    type_name: str
    resource_name: str


@dataclass(frozen=True)
class UsbSelector:
    """One ``usb`` entry dpkit serves: one device per selector makes one allocatable unit.

    ``ids`` are (vendor, product) pairs as lower-case 4-digit hex; an empty tuple never matches
    (the entry had a selector that is not hex, which KubeVirt also skips).
    """

    resource_name: str
    ids: tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class ConfigNote:
    """A config entry dpkit accepted but does not act on, and why (``dpkit discover``)."""

    where: str  # key path, e.g. vendor.permittedHostDevices.pciHostDevices[1]
    resource: str
    reason: str
    hint: str = ""
