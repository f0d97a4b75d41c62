"""Checks applied to every value before it reaches the kubelet or a container spec.

Nothing read from sysfs, NVML, a config file or a request is trusted: IDs, paths, env names
and resource names are checked here, and a failure raises :class:`ValidationError` naming the
bad value.
"""

from __future__ import annotations

import re

from dpkit.core.vendorapi.errors import ValidationError

MAX_DEVICE_ID = 63
_DEVICE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:\-]*$")
# Kubernetes' IsEnvVarName: what a container spec may carry (KubeVirt's PCI_RESOURCE_* keeps "-")
_ENV_NAME = re.compile(r"^[-._a-zA-Z][-._a-zA-Z0-9]*$")
MAX_NUMA_NODE = 1023
_DNS_LABEL = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?"
_DNS_SUBDOMAIN = re.compile(rf"^{_DNS_LABEL}(\.{_DNS_LABEL})*$")
_QUALIFIED_NAME = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")
_CDI_KIND = re.compile(r"^[a-z0-9][-a-z0-9.]*[a-z0-9]?/[A-Za-z0-9][-A-Za-z0-9_.]*$")
_CDI_DEVICE = re.compile(r"^[A-Za-z0-9][-A-Za-z0-9_.:]*$")
_PERMISSIONS = re.compile(r"^(?!.*(.).*\1)[rwm]{1,3}$")


def check_device_id(device_id: str) -> str:
    """Device IDs are what the kubelet checkpoints: short, printable, no path separators."""
    if not isinstance(device_id, str) or not device_id:
        raise ValidationError(f"device ID must be a non-empty string, got {device_id!r}")
    if len(device_id) > MAX_DEVICE_ID:
        raise ValidationError(f"device ID {device_id!r} is longer than {MAX_DEVICE_ID} characters")
    if not _DEVICE_ID.fullmatch(device_id):
        raise ValidationError(
            f"device ID {device_id!r} may hold only letters, digits, '.', '_', ':' and '-'"
        )
    return device_id


def check_resource_name(name: str) -> str:
    """An extended resource name as the kubelet's registration accepts it.

    ``domain/name`` with a DNS-subdomain domain outside ``kubernetes.io`` and a qualified name
    of at most 63 characters (the kubelet's ``IsExtendedResourceName``).
    """
    if not isinstance(name, str) or "/" not in name:
        raise ValidationError(
            f"resource name {name!r} must be domain-prefixed, like 'example.com/widget'"
        )
    domain, _, short = name.partition("/")
    if "/" in short:
        raise ValidationError(f"resource name {name!r} has more than one '/'")
    if len(domain) > 253 or not _DNS_SUBDOMAIN.fullmatch(domain):
        raise ValidationError(f"resource name {name!r}: {domain!r} is not a DNS subdomain")
    if "kubernetes.io/" in name:  # the kubelet's IsPrefixedNativeResource: a substring test
        raise ValidationError(
            f"resource name {name!r}: the kubernetes.io domain is reserved for native resources"
        )
    if len(domain) > 253 - len("requests."):  # it must still be valid as a quota name
        raise ValidationError(f"resource name {name!r}: domain longer than 244 characters")
    if domain.startswith("requests."):
        raise ValidationError(f"resource name {name!r}: the 'requests.' prefix is reserved for quota")
    if not short or len(short) > 63 or not _QUALIFIED_NAME.fullmatch(short):
        raise ValidationError(
            f"resource name {name!r}: {short!r} must be 1-63 alphanumerics, '-', '_' or '.'"
        )
    return name


def check_env_name(name: str) -> str:
    if not isinstance(name, str) or not _ENV_NAME.fullmatch(name):
        raise ValidationError(
            f"environment variable name {name!r} is not valid (letters, digits, '_', '-', '.'; no leading digit)"
        )
    return name


def check_numa_node(node: int) -> int:
    """NUMA node IDs the kubelet's topology manager can use; sysfs garbage must not reach it."""
    if isinstance(node, bool) or not isinstance(node, int) or not 0 <= node <= MAX_NUMA_NODE:
        raise ValidationError(f"NUMA node {node!r} is outside 0..{MAX_NUMA_NODE}")
    return node


def _check_path(path: str, what: str) -> str:
    if not isinstance(path, str) or not path.startswith("/"):
        raise ValidationError(f"{what} {path!r} must be an absolute path")
    if "\x00" in path or "\n" in path:
        raise ValidationError(f"{what} {path!r} contains a control character")
    if ".." in path and ".." in path.split("/"):
        raise ValidationError(f"{what} {path!r} must not contain '..'")
    return path


def check_host_path(path: str) -> str:
    return _check_path(path, "host path")


def check_container_path(path: str) -> str:
    return _check_path(path, "container path")


def check_permissions(permissions: str) -> str:
    """cgroup device permissions: some of r, w, m, each once."""
    if not isinstance(permissions, str) or not _PERMISSIONS.fullmatch(permissions):
        raise ValidationError(f"device permissions {permissions!r} must be a combination of 'r', 'w', 'm'")
    return permissions


def check_annotation_key(key: str) -> str:
    prefix, _, name = key.rpartition("/")
    if prefix and not _DNS_SUBDOMAIN.fullmatch(prefix):
        raise ValidationError(f"annotation key {key!r}: prefix {prefix!r} is not a DNS subdomain")
    if not name or len(name) > 63 or not _QUALIFIED_NAME.fullmatch(name):
        raise ValidationError(f"annotation key {key!r} is not a qualified name")
    return key


def check_cdi_name(name: str) -> str:
    """A fully qualified CDI device name: ``vendor.com/class=device``."""
    kind, eq, device = name.partition("=")
    if not eq or not _CDI_KIND.fullmatch(kind) or not _CDI_DEVICE.fullmatch(device):
        raise ValidationError(f"CDI device name {name!r} must look like 'vendor.com/class=device'")
    return name


def socket_name_for(resource: str) -> str:
    """The plugin socket file name for a resource: unique and safe as a path component."""
    return "dpkit-" + re.sub(r"[^A-Za-z0-9.-]", "_", resource) + ".sock"
