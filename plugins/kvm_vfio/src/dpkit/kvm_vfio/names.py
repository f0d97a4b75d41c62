"""Resource and environment names, as KubeVirt writes them, and PCI device names from udev's hwdb.

A selector without ``resource_name`` gets ``<vendor domain>/<device name>``: the device name with
non-alphanumerics turned into ``_`` (``TU104GL [Tesla T4]`` -> ``nvidia.com/TU104GL_Tesla_T4``, the
name KubeVirt's documentation uses for that card), or the hex IDs when no name is known.

The device name is the host's udev database entry ``ID_MODEL_FROM_DATABASE`` of a function with
those IDs, read through pyudev: udev fills it from its hwdb (built from the pci.ids database) when
the device appears, so the name is the host's, needs no copy of pci.ids in the image, and the
plugin reads it where it already reads uevents (``/run/udev``, mounted read-only).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from typing import Any

#: the udev property udev's hwdb sets to the pci.ids name of the device (with its subsystem's name
#: in parentheses when pci.ids lists that subsystem)
MODEL_PROPERTY = "ID_MODEL_FROM_DATABASE"
PCI_RESOURCE_PREFIX = "PCI_RESOURCE_"
MDEV_RESOURCE_PREFIX = "MDEV_PCI_RESOURCE_"
USB_RESOURCE_PREFIX = "USB_RESOURCE_"
DEFAULT_DOMAIN = "devices.kubevirt.io"
VENDOR_DOMAINS = {
    "10de": "nvidia.com",
    "8086": "intel.com",
    "1002": "amd.com",
    "1022": "amd.com",
    "15b3": "mellanox.com",
    "14e4": "broadcom.com",
    "1924": "solarflare.com",
}


def pci_resource_env(resource: str) -> str:
    """``PCI_RESOURCE_<NAME>``: upper-cased, ``/`` and ``.`` as ``_``, exactly KubeVirt's
    ``ResourceNameToEnvVar``: virt-launcher looks the variable up by that name, so ``-`` stays."""
    return resource_env(PCI_RESOURCE_PREFIX, resource)


def resource_env(prefix: str, resource: str) -> str:
    """``<prefix><NAME>`` as KubeVirt forms it for PCI, mdev (``MDEV_PCI_RESOURCE_``) and USB (``USB_RESOURCE_``)."""
    return prefix + resource.upper().replace("/", "_").replace(".", "_")


def default_resource_name(vendor: str, device: str, name: str = "") -> str:
    """The resource name for a selector that names none, from the device's database name (may be "").

    The result may still fail validation: check it.
    """
    domain = VENDOR_DOMAINS.get(vendor, DEFAULT_DOMAIN)
    short = re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_")[:63].rstrip("_") if name else ""
    return f"{domain}/{short or f'{vendor.upper()}_{device.upper()}'}"


class DeviceNames:
    """PCI device names from the host's udev database, remembered per ``vendor:device`` for the process.

    A name, once found, is kept even when the last function with those IDs goes away: the resource
    name derived from it must not flip back to the hex IDs on a hot-unplug. IDs without a name are
    asked again on the next scan (udev may not have processed a new device yet). libudev reads
    ``/sys`` only, so a ``sys_root`` elsewhere (a test tree) has no names.
    """

    def __init__(self, sys_root: str) -> None:
        self.enabled = os.path.realpath(sys_root) == "/sys"
        self._known: dict[tuple[str, str], str] = {}
        self._context: Any = None

    def learn(self, functions: Iterable[tuple[str, str, str]]) -> None:
        """Look up ``(address, vendor, device)`` functions whose IDs have no name yet (one lookup per IDs)."""
        if not self.enabled:
            return
        asked: set[tuple[str, str]] = set()
        for address, vendor, device in functions:
            ids = (vendor, device)
            if ids in self._known or ids in asked:
                continue
            asked.add(ids)
            name = self._lookup(address)
            if name:
                self._known[ids] = name

    def name(self, vendor: str, device: str) -> str:
        """The database name of ``vendor:device`` (lower-case hex), or "" when none is known."""
        return self._known.get((vendor, device), "")

    def _lookup(self, address: str) -> str:
        try:
            import pyudev  # loads libudev: only where a name is wanted

            if self._context is None:
                self._context = pyudev.Context()
        except (ImportError, OSError):
            return ""  # no libudev here: the hex IDs stand in
        try:
            found = pyudev.Devices.from_sys_path(self._context, f"/sys/bus/pci/devices/{address}")
            return str(found.properties.get(MODEL_PROPERTY, "")).strip()
        except (pyudev.DeviceNotFoundError, OSError, ValueError):
            return ""  # gone meanwhile
