"""Resource and environment names, as KubeVirt writes them.

A selector without ``resource_name`` gets ``<vendor domain>/<device name>``: the device name from
the pci.ids database with non-alphanumerics turned into ``_`` (``TU104GL [Tesla T4]`` ->
``nvidia.com/TU104GL_Tesla_T4``, the name KubeVirt's documentation uses for that card), or the
hex IDs when the database is absent or does not know the device.
"""

from __future__ import annotations

import functools
import os
import re

PCI_IDS_PATHS = ("/usr/share/misc/pci.ids", "/usr/share/hwdata/pci.ids", "/usr/share/pci.ids")
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


def default_resource_name(vendor: str, device: str, pci_ids: str = "") -> str:
    """The resource name for a selector that names none (may still fail validation: check it)."""
    domain = VENDOR_DOMAINS.get(vendor, DEFAULT_DOMAIN)
    name = device_name(vendor, device, pci_ids)
    short = re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_")[:63].rstrip("_") if name else ""
    return f"{domain}/{short or f'{vendor.upper()}_{device.upper()}'}"


def device_name(vendor: str, device: str, pci_ids: str = "") -> str:
    """The device's name from pci.ids, or "" when unknown."""
    path = pci_ids or next((p for p in PCI_IDS_PATHS if os.path.exists(p)), "")
    return _database(path).get((vendor, device), "") if path else ""


@functools.lru_cache(maxsize=4)
def _database(path: str) -> dict[tuple[str, str], str]:
    """(vendor, device) -> name, from the pci.ids format (vendor lines, tab-indented devices)."""
    names: dict[tuple[str, str], str] = {}
    vendor = ""
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            for line in handle:
                if line.startswith("C "):  # the class section follows the vendors
                    break
                if not line.strip() or line.startswith("#"):
                    continue
                if not line.startswith("\t"):
                    vendor = line[:4].lower()
                elif not line.startswith("\t\t") and vendor:
                    device, _, name = line.strip().partition(" ")
                    names[(vendor, device.lower())] = name.strip()
    except OSError:
        return {}
    return names
