"""dpkit.core: the device-plugin engine, and the one module a vendor package imports from.

Vendors write ``from dpkit.core import Vendor, Device, ContainerSpec, ...``; the subpackages
(``engine``, ``integrations``, ``tools``, ``support``, ``vendorapi``) are the core's own layout
and may change. Names load on first use (PEP 562), so a probe process or ``dpkit --help`` that
imports ``dpkit.core`` pays only for what it touches.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from dpkit.core.integrations.podresources import Holder, PodResourcesClient, PodResourcesError
    from dpkit.core.support.config import DEFAULT_POD_RESOURCES_SOCKET, load_config, parse_yaml, read_text
    from dpkit.core.support.logs import get_logger, kv, setup_logging
    from dpkit.core.support.schema import Derived, Invalid, Meta, Section, force_setattr, load_section, setting
    from dpkit.core.support.uevents import Uevent, UeventWatcher
    from dpkit.core.vendorapi.device import ContainerSpec, Device, DeviceNode, Health, Mount, Snapshot, merge_specs
    from dpkit.core.vendorapi.errors import AllocationError, ConfigError, DpkitError, ValidationError, VendorError
    from dpkit.core.vendorapi.validation import (
        MAX_DEVICE_ID,
        check_annotation_key,
        check_device_id,
        check_host_path,
        check_resource_name,
    )
    from dpkit.core.vendorapi.vendor import Check, EventSink, Finding, MetricSample, Probe, ProbeContext, Vendor

_EXPORTS: dict[str, str] = {
    **dict.fromkeys(("Vendor", "EventSink", "Probe", "ProbeContext", "Check", "Finding", "MetricSample"),
                    "dpkit.core.vendorapi.vendor"),
    **dict.fromkeys(("Device", "Health", "ContainerSpec", "DeviceNode", "Mount", "Snapshot", "merge_specs"),
                    "dpkit.core.vendorapi.device"),
    **dict.fromkeys(("DpkitError", "ConfigError", "ValidationError", "VendorError", "AllocationError"),
                    "dpkit.core.vendorapi.errors"),
    **dict.fromkeys(("check_resource_name", "check_device_id", "check_host_path", "check_annotation_key",
                     "MAX_DEVICE_ID"), "dpkit.core.vendorapi.validation"),
    **dict.fromkeys(("get_logger", "kv", "setup_logging"), "dpkit.core.support.logs"),
    **dict.fromkeys(("Section", "Meta", "Derived", "Invalid", "load_section", "setting", "force_setattr"),
                    "dpkit.core.support.schema"),
    **dict.fromkeys(("load_config", "DEFAULT_POD_RESOURCES_SOCKET", "parse_yaml", "read_text"),
                    "dpkit.core.support.config"),
    **dict.fromkeys(("Uevent", "UeventWatcher"), "dpkit.core.support.uevents"),
    **dict.fromkeys(("Holder", "PodResourcesClient", "PodResourcesError"), "dpkit.core.integrations.podresources"),
}

__all__ = [
    "DEFAULT_POD_RESOURCES_SOCKET",
    "MAX_DEVICE_ID",
    "AllocationError",
    "Check",
    "ConfigError",
    "ContainerSpec",
    "Derived",
    "Device",
    "DeviceNode",
    "DpkitError",
    "EventSink",
    "Finding",
    "Health",
    "Holder",
    "Invalid",
    "Meta",
    "MetricSample",
    "Mount",
    "PodResourcesClient",
    "PodResourcesError",
    "Probe",
    "ProbeContext",
    "Section",
    "Snapshot",
    "Uevent",
    "UeventWatcher",
    "ValidationError",
    "Vendor",
    "VendorError",
    "check_annotation_key",
    "check_device_id",
    "check_host_path",
    "check_resource_name",
    "force_setattr",
    "get_logger",
    "kv",
    "load_config",
    "load_section",
    "merge_specs",
    "parse_yaml",
    "read_text",
    "setting",
    "setup_logging",
]


def __getattr__(name: str) -> object:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'dpkit.core' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
