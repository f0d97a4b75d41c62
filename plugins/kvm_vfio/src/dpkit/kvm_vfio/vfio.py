"""PCI passthrough through VFIO: selected functions, their IOMMU groups, health and container spec.

Each selected PCI function is one device (ID = its PCI address), carrying its IOMMU group and
NUMA node. Functions picked by a ``permittedHostDevices`` entry are reported as KubeVirt's own
plugin reports them: one device per IOMMU group, ID = the group number, so a kubelet checkpoint
written under KubeVirt stays valid. A function is Healthy only when it is bound to ``vfio-pci``, its group is viable
(every other member bound to a VFIO driver, to one that leaves DMA alone -- ``pci-stub``,
``pcieport`` -- or to none, as the kernel requires), the group node exists and the group serves a
single resource. Everything else is listed Unhealthy with the reason, so ``status`` and
``discover`` say what to fix.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from dpkit.core import (
    ContainerSpec,
    Device,
    DeviceNode,
    Finding,
    Health,
    ValidationError,
    check_resource_name,
    merge_specs,
)
from dpkit.kvm_vfio.config import Selector
from dpkit.kvm_vfio.names import DeviceNames, default_resource_name, pci_resource_env
from dpkit.kvm_vfio.sysfs import PciFunction, driver_of, group_members

VFIO_DRIVER = "vfio-pci"
#: drivers the kernel tolerates on the other members of a group handed to VFIO ("" = unbound):
#: they claim no DMA (``driver_managed_dma``); VFIO variant drivers end in ``vfio_pci``.
VIABLE_DRIVERS = ("vfio-pci", "pci-stub", "pcieport", "")
PERMISSIONS = "mrw"  # what KubeVirt gives VFIO nodes

BIND_HINT = "bind it to vfio-pci (e.g. driverctl set-override {address} vfio-pci)"
IOMMU_HINT = "enable VT-d/AMD-Vi in the firmware and boot with intel_iommu=on (or amd_iommu=on) iommu=pt"


@dataclass
class VfioScan:
    """The outcome of one scan: devices per resource and notes for ``dpkit discover``."""

    resources: dict[str, list[Device]] = field(default_factory=dict)
    findings: list[Finding] = field(default_factory=list)


@dataclass(frozen=True)
class _Candidate:
    function: PciFunction
    resource: str
    kubevirt: bool = False


def scan(
    functions: Sequence[PciFunction], selectors: Sequence[Selector], sys_root: str, dev_root: str,
    device_names: DeviceNames | None = None,
) -> VfioScan:
    """Match ``functions`` against ``selectors`` and build every selected function's device."""
    result = VfioScan()
    device_names = device_names or DeviceNames(sys_root)
    device_names.learn((f.address, f.vendor, f.device) for f in functions)
    names = _resource_names(selectors, device_names, result)
    candidates = _select(functions, selectors, names, result)
    group_resources: dict[str, set[str]] = {}
    for c in candidates:
        if c.function.iommu_group:
            group_resources.setdefault(c.function.iommu_group, set()).add(c.resource)
    by_group: dict[tuple[str, str], list[Device]] = {}
    for c in candidates:
        device = _device(c, sys_root, dev_root, group_resources, device_names)
        if not device.healthy:
            result.findings.append(Finding(c.function.address, False, f"listed Unhealthy: {device.reason}",
                                          c.resource, _hint(device.reason, c.function.address)))
        if not c.kubevirt:
            result.resources[c.resource].append(device)
        elif c.function.iommu_group:
            by_group.setdefault((c.resource, c.function.iommu_group), []).append(device)
        else:
            result.findings.append(Finding(c.function.address, False, "not advertised: no IOMMU group, and "
                                           "KubeVirt's device IDs are IOMMU groups", c.resource, IOMMU_HINT))
    for (resource, group), members in sorted(by_group.items(), key=lambda item: (item[0][0], int(item[0][1]))):
        result.resources[resource].append(group_device(group, members))
    for group, resources in group_resources.items():
        if len(resources) > 1 and group in {g for _, g in by_group}:
            result.findings.append(Finding(f"IOMMU group {group}", True, f"shared by {', '.join(sorted(resources))}: "
                                           "a VM must request them together (the group opens once)"))
    return result


def group_device(group: str, members: Sequence[Device], key: str = "pci_address") -> Device:
    """One device for an IOMMU group, as KubeVirt reports it: ID = group, env = its members' IDs.

    ``members`` are the group's devices with their own IDs (PCI addresses, mdev UUIDs), listed
    under the ``key`` attribute.
    """
    sick = [d for d in members if not d.healthy]
    reason = "" if not sick else sick[0].reason if len(members) == 1 else f"{sick[0].id}: {sick[0].reason}"
    attributes = dict(members[0].attributes)
    attributes[key] = ",".join(d.id for d in members)
    return Device(group, Health.UNHEALTHY if sick else Health.HEALTHY,
                  tuple(sorted({n for d in members for n in d.numa_nodes})),
                  merge_specs(d.spec for d in members), reason, attributes)


def _resource_names(selectors: Sequence[Selector], device_names: DeviceNames, result: VfioScan) -> dict[int, str]:
    """Selector index -> its resource (registered even with no device); invalid ones are skipped."""
    names: dict[int, str] = {}
    for index, selector in enumerate(selectors):
        name = selector.resource_name or default_resource_name(
            selector.vendor, selector.device, device_names.name(selector.vendor, selector.device))
        try:
            check_resource_name(name)
        except ValidationError as exc:
            result.findings.append(Finding(f"selector {selector.vendor}:{selector.device}", False,
                                           f"derived {exc}", "", "set resource_name in the selector"))
            continue
        names[index] = name
        result.resources.setdefault(name, [])
    return names


def _select(
    functions: Iterable[PciFunction], selectors: Sequence[Selector], names: dict[int, str], result: VfioScan
) -> list[_Candidate]:
    """The functions some selector picks (the first matching selector wins)."""
    chosen: list[_Candidate] = []
    matched: set[int] = set()
    for function in functions:
        for index, selector in enumerate(selectors):
            if selector.matches(function.vendor, function.device, function.pci_class, function.address):
                if index in names:
                    chosen.append(_Candidate(function, names[index], selector.kubevirt))
                matched.add(index)
                break
    for index, selector in enumerate(selectors):
        if index not in matched:
            what = f"{selector.vendor}:{selector.device}"
            limits = (f" class {selector.pci_class}" if selector.pci_class else "") + (
                f" at {', '.join(selector.addresses)}" if selector.addresses else "")
            result.findings.append(Finding(f"selector {what}{limits}", False, "no PCI function matches",
                                           names.get(index, ""), "check the IDs with lspci -nn"))
    return chosen


def _device(c: _Candidate, sys_root: str, dev_root: str, group_resources: dict[str, set[str]],
            device_names: DeviceNames) -> Device:
    f = c.function
    attributes = {"pci_address": f.address, "vendor": f.vendor, "device": f.device, "class": f.pci_class,
                  "driver": f.driver or "none", "iommu_group": f.iommu_group or "none"}
    name = device_names.name(f.vendor, f.device)
    if name:
        attributes["name"] = name
    numa = () if f.numa_node is None else (f.numa_node,)
    # KubeVirt serves a group split between resources (GPU and its audio function): so do its entries
    problem = _problem(f, sys_root, dev_root, {} if c.kubevirt else group_resources)
    try:
        spec = container_spec(f, c.resource, dev_root) if f.iommu_group else ContainerSpec()
        return Device(f.address, Health.UNHEALTHY if problem else Health.HEALTHY, numa, spec, problem, attributes)
    except ValidationError as exc:
        # sysfs garbage (a NUMA node of 2000, a bad path) spoils this one device, never the scan:
        # list it Unhealthy without the facts that failed, so status and discover say why.
        return bad_device(f.address, exc, attributes)


def bad_device(device_id: str, error: ValidationError, attributes: dict[str, str]) -> Device:
    """An Unhealthy stand-in for a device whose sysfs data failed validation (no topology, no spec)."""
    return Device(device_id, Health.UNHEALTHY, (), ContainerSpec(), f"invalid device data: {error}", attributes)


def _problem(f: PciFunction, sys_root: str, dev_root: str, group_resources: dict[str, set[str]]) -> str:
    """Why this function cannot be handed to a VM ("" when it can)."""
    if f.driver != VFIO_DRIVER:
        bound = f"bound to {f.driver}" if f.driver else "not bound to any driver"
        return f"{bound}, not {VFIO_DRIVER}"
    if not f.iommu_group:
        return "has no IOMMU group (the IOMMU is disabled)"
    others = [(m, driver_of(sys_root, m)) for m in group_members(sys_root, f.iommu_group) if m != f.address]
    blockers = [f"{m} ({d})" for m, d in others if d not in VIABLE_DRIVERS and not d.endswith("vfio_pci")]
    if blockers:
        return (f"IOMMU group {f.iommu_group} is not viable: {', '.join(blockers)} "
                f"{'is' if len(blockers) == 1 else 'are'} not bound to {VFIO_DRIVER}")
    resources = group_resources.get(f.iommu_group, set())
    if len(resources) > 1:
        return (f"IOMMU group {f.iommu_group} is split between resources {', '.join(sorted(resources))}; "
                "a group can only go to one VM")
    for node in ("vfio/vfio", f"vfio/{f.iommu_group}"):
        if not os.path.exists(os.path.join(dev_root, node)):
            return f"{os.path.join(dev_root, node)} does not exist"
    return ""


def container_spec(f: PciFunction, resource: str, dev_root: str) -> ContainerSpec:
    """VFIO nodes for the function's group (plus iommufd nodes when offered) and KubeVirt's env."""
    nodes = ["vfio/vfio", f"vfio/{f.iommu_group}"]
    if f.vfio_cdev and os.path.exists(os.path.join(dev_root, "iommu")) and \
            os.path.exists(os.path.join(dev_root, "vfio/devices", f.vfio_cdev)):
        nodes += ["iommu", f"vfio/devices/{f.vfio_cdev}"]
    return ContainerSpec(
        devices=tuple(DeviceNode(os.path.join(dev_root, n), f"/dev/{n}", PERMISSIONS) for n in nodes),
        env={pci_resource_env(resource): f.address},
    )


def _hint(reason: str, address: str) -> str:
    if reason.startswith("invalid device data"):
        return "sysfs reports values the kernel never writes (firmware tables, a broken driver): fix them; " \
            "the rest of the node is served meanwhile"
    if "IOMMU is disabled" in reason:
        return IOMMU_HINT
    if "not viable" in reason:
        return "bind every device of the group to vfio-pci (or unbind them), or move the card to another slot"
    if reason.startswith(("bound to", "not bound")):
        return BIND_HINT.format(address=address)
    if "does not exist" in reason:
        return "load vfio-pci and check the host's /dev is what dev_root points at"
    return ""
