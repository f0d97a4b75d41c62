"""Mediated devices (mdev: vGPU profiles, vfio-ap queues...) for ``mediatedDevices`` entries.

sysfs layout (kernel ``Documentation/driver-api/vfio-mediated-device.rst``)::

    /sys/bus/mdev/devices/<uuid> -> ../../../devices/<parent path>/<parent>/<uuid>
    <uuid>/mdev_type -> ../mdev_supported_types/<type id>   (``name`` inside, when the driver offers one)
    <uuid>/iommu_group -> ../../../../kernel/iommu_groups/<N>

An mdev is matched by its type's ``name`` with spaces as ``_`` (or the type id when there is no
``name``), as KubeVirt matches ``mdevNameSelector``. Each one is reported as KubeVirt reports it:
ID = its IOMMU group (every mdev gets its own), NUMA node = its parent PCI device's, Allocate
gives ``/dev/vfio/vfio`` and ``/dev/vfio/<group>`` and ``MDEV_PCI_RESOURCE_<NAME>=<uuid>``. It is
Healthy while both nodes exist. dpkit never creates or removes mdevs.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path

from dpkit.core import ContainerSpec, Device, DeviceNode, Finding, Health, ValidationError
from dpkit.kvm_vfio.names import MDEV_RESOURCE_PREFIX, resource_env
from dpkit.kvm_vfio.selectors import MdevSelector
from dpkit.kvm_vfio.sysfs import is_group, link_name, listdir, numa_node, read_attr
from dpkit.kvm_vfio.vfio import PERMISSIONS, bad_device, group_device

_UUID = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")
_PCI_ADDRESS = re.compile(r"^[0-9a-f]{4}:[0-9a-f]{2}:[0-9a-f]{2}\.[0-7]$")
_TYPE_ID = re.compile(r"^[A-Za-z0-9_.:\-]{1,64}$")
MDEV_HINT = "create the mdevs (KubeVirt's mediatedDevicesConfiguration, nvidia-vgpu-dm, mdevctl) first"


def type_name(sys_root: str, uuid: str) -> str:
    """The mdev's type name as KubeVirt compares it: ``name`` with spaces as ``_``, else the type id."""
    base = Path(sys_root, "bus/mdev/devices", uuid)
    try:
        raw = read_attr(base / "mdev_type/name")
    except FileNotFoundError:
        raw = link_name(base / "mdev_type")
    return raw.replace(" ", "_").strip()


def scan(selectors: Sequence[MdevSelector], sys_root: str, dev_root: str
         ) -> tuple[dict[str, list[Device]], list[Finding]]:
    """Every mdev some selector picks, as devices per resource, and notes for ``dpkit discover``."""
    resources: dict[str, list[Device]] = {s.resource_name: [] for s in selectors}
    wanted = {s.type_name: s.resource_name for s in selectors}
    findings: list[Finding] = []
    by_group: dict[tuple[str, str], list[Device]] = {}
    seen_types: set[str] = set()
    for uuid in sorted(listdir(Path(sys_root, "bus/mdev/devices"))):
        if not _UUID.match(uuid):
            findings.append(Finding(f"{sys_root}/bus/mdev/devices/{uuid[:40]!r}", False, "ignored: not an mdev UUID"))
            continue
        try:
            name = type_name(sys_root, uuid)
        except OSError:
            continue  # removed while we looked
        seen_types.add(name)
        resource = wanted.get(name)
        if resource is None:
            continue
        group = link_name(Path(sys_root, "bus/mdev/devices", uuid, "iommu_group"))
        if not is_group(group):
            findings.append(Finding(uuid, False, "not advertised: no IOMMU group (is it bound to a VFIO mdev driver?)",
                                    resource, "bind the mdev to vfio_mdev or the vendor's VFIO mdev driver"))
            continue
        device = _device(uuid, name, group, resource, sys_root, dev_root)
        if not device.healthy:
            findings.append(Finding(uuid, False, f"listed Unhealthy: {device.reason}", resource,
                                    "load vfio and check the host's /dev is what dev_root points at"))
        by_group.setdefault((resource, group), []).append(device)
    for (resource, group), members in sorted(by_group.items(), key=lambda item: (item[0][0], int(item[0][1]))):
        resources[resource].append(group_device(group, members, "mdev_uuid"))
    for selector in selectors:
        if selector.type_name not in seen_types:
            findings.append(Finding(f"mdev type {selector.type_name}", False, "no mediated device of this type exists",
                                    selector.resource_name, MDEV_HINT))
    return resources, findings


def _device(uuid: str, name: str, group: str, resource: str, sys_root: str, dev_root: str) -> Device:
    parent = os.path.basename(os.path.dirname(_link(Path(sys_root, "bus/mdev/devices", uuid))))
    numa = numa_node(sys_root, parent) if _PCI_ADDRESS.match(parent) else None
    type_id = link_name(Path(sys_root, "bus/mdev/devices", uuid, "mdev_type"))
    attributes = {"mdev_uuid": uuid, "mdev_type": type_id if _TYPE_ID.match(type_id) else "?", "name": name,
                  "parent": parent if _TYPE_ID.match(parent) else "?", "iommu_group": group}
    nodes = ("vfio/vfio", f"vfio/{group}")
    missing = [os.path.join(dev_root, n) for n in nodes if not os.path.exists(os.path.join(dev_root, n))]
    problem = f"{missing[0]} does not exist" if missing else ""
    try:
        spec = ContainerSpec(
            devices=tuple(DeviceNode(os.path.join(dev_root, n), f"/dev/{n}", PERMISSIONS) for n in nodes),
            env={resource_env(MDEV_RESOURCE_PREFIX, resource): uuid.lower()},
        )
        return Device(uuid.lower(), Health.UNHEALTHY if problem else Health.HEALTHY,
                      () if numa is None else (numa,), spec, problem, attributes)
    except ValidationError as exc:
        return bad_device(uuid.lower(), exc, attributes)


def _link(path: Path) -> str:
    try:
        return os.readlink(path)
    except OSError:
        return ""
