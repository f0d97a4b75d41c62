"""The kvm_vfio vendor: what KubeVirt's virt-handler device plugins offer, on the dpkit core.

Resources: ``devices.kubevirt.io/kvm``, ``/vhost-net`` and ``/tun`` as shared slots, one resource
per ``pci_host_devices`` selector for VFIO passthrough (env ``PCI_RESOURCE_<NAME>``), and the
entries of KubeVirt's ``permittedHostDevices`` block that hand their resource to an external
provider: PCI functions, mediated devices (``MDEV_PCI_RESOURCE_<NAME>``) and USB devices
(``USB_RESOURCE_<NAME>``).
Discovery is a full rescan of sysfs and /dev (cheap); :meth:`watch` reruns it on every uevent
burst and on a timer (:class:`dpkit.core.UeventWatcher`). See docs/kubevirt.md.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from dpkit.core import Check, Device, EventSink, Finding, Snapshot, UeventWatcher, Vendor, VendorError, get_logger, kv
from dpkit.kvm_vfio import mdev, usb
from dpkit.kvm_vfio.allocation import prefer_groups
from dpkit.kvm_vfio.config import parse_config
from dpkit.kvm_vfio.names import DeviceNames
from dpkit.kvm_vfio.shared import SHARED_NODES, hint_for, node_problem, slots
from dpkit.kvm_vfio.sysfs import iommu_groups, read_functions
from dpkit.kvm_vfio.vfio import IOMMU_HINT, scan

log = get_logger("kvm_vfio")
_SHARED = {node.resource for node in SHARED_NODES}
#: hotplug, removal and driver re-binds arrive as add/remove/bind/unbind uevents on these
SUBSYSTEMS = ("pci", "vfio", "vfio-dev", "misc", "mdev")


class KvmVfioVendor(Vendor):
    name = "kvm_vfio"
    description = "KubeVirt-compatible /dev/kvm, vhost-net and tun slots, and VFIO PCI passthrough"
    poll_interval = 0.0  # watch() is overridden

    def __init__(self, config: Mapping[str, Any] | None = None) -> None:
        super().__init__(config)
        self.settings = parse_config(self.config)
        self._lock = threading.Lock()
        self._seen: set[str] = set()  # shared nodes present at least once (advertised from then on)
        self._logged: dict[tuple[str, str], str] = {}  # what was last logged per subject
        #: set while watch() listens for uevents (changes from then on are seen at once)
        self.listening = threading.Event()
        self._device_names = DeviceNames(self.settings.sys_root)
        for note in self.settings.notes:
            if note.where == "vendor.pci_ids":
                log.warning(f"{note.where} {note.reason}", extra=kv(hint=note.hint))

    # -- discovery ----------------------------------------------------------------------------
    def discover(self) -> Snapshot:
        return self._scan()[0]

    def _scan(self) -> tuple[dict[str, tuple[Device, ...]], list[Finding]]:
        with self._lock:
            snapshot, findings = self._shared()
            if self.settings.selectors:
                vfio_snapshot, vfio_findings = self._vfio()
                snapshot.update(vfio_snapshot)
                findings += vfio_findings
            if self.settings.mdevs:
                mdevs, mdev_findings = mdev.scan(self.settings.mdevs, self.settings.sys_root, self.settings.dev_root)
                snapshot.update({r: tuple(d) for r, d in mdevs.items()})
                findings += mdev_findings
            if self.settings.usbs:
                usbs, usb_findings = usb.scan(self.settings.usbs, self.settings.sys_root, self.settings.dev_root)
                snapshot.update({r: tuple(d) for r, d in usbs.items()})
                findings += usb_findings
            findings += [Finding(n.where, False, n.reason, n.resource, n.hint) for n in self.settings.notes]
            self._log_unhealthy(snapshot)
            return snapshot, findings

    def _shared(self) -> tuple[dict[str, tuple[Device, ...]], list[Finding]]:
        s = self.settings
        snapshot: dict[str, tuple[Device, ...]] = {}
        findings: list[Finding] = []
        counts = {"kvm": s.kvm_slots, "vhost-net": s.vhost_net_slots, "tun": s.tun_slots}
        for node in SHARED_NODES:
            host_path = os.path.join(s.dev_root, node.path)
            if counts[node.name] == 0:
                continue
            problem = node_problem(host_path)
            if not problem:
                self._seen.add(node.name)
            elif not node.always and node.name not in self._seen:
                findings.append(Finding(host_path, False, f"{problem}; advertised once it appears",
                                        node.resource, hint_for(node, problem)))
                continue
            snapshot[node.resource] = slots(node, counts[node.name], host_path, problem)
            findings.append(Finding(host_path, not problem,
                                    f"all {counts[node.name]} slots Unhealthy: {problem}" if problem
                                    else f"{counts[node.name]} shared slots", node.resource,
                                    hint_for(node, problem)))
        return snapshot, findings

    def _vfio(self) -> tuple[dict[str, tuple[Device, ...]], list[Finding]]:
        s = self.settings
        functions, problems = read_functions(s.sys_root)
        findings = [Finding(f"{s.sys_root}/bus/pci/devices", False, p) for p in problems]
        for problem in problems:
            self._log_once(("sysfs", problem), problem, "sysfs data ignored")
        if not iommu_groups(s.sys_root):
            findings.append(Finding("IOMMU", False,
                                    f"no groups in {s.sys_root}/kernel/iommu_groups: the IOMMU is disabled",
                                    "", IOMMU_HINT))
        result = scan(functions, s.selectors, s.sys_root, s.dev_root, self._device_names)
        return {r: tuple(d) for r, d in result.resources.items()}, findings + result.findings

    def _log_unhealthy(self, snapshot: Mapping[str, Sequence[Device]]) -> None:
        """Log each new reason once (the core logs transitions, not why a new device starts sick)."""
        for resource, devices in snapshot.items():
            if resource in _SHARED:  # one line for all slots
                devices = devices[:1]
            for device in devices:
                self._log_once((resource, device.id), device.reason, "device unhealthy",
                               resource=resource, device=device.id)

    def _log_once(self, key: tuple[str, str], reason: str, message: str, **fields: str) -> None:
        if reason and self._logged.get(key) != reason:
            log.warning(message, extra=kv(reason=reason, **fields))
        self._logged[key] = reason

    # -- optional abilities ---------------------------------------------------------------------
    def watch(self, sink: EventSink, stop: threading.Event) -> None:
        """Rescan on every uevent burst, and every ``health_interval`` for what sends none (permissions).

        Without a monitor (no netlink access) the timer alone keeps the view fresh, and that is logged.
        """
        s = self.settings
        UeventWatcher(lambda reason, events: self.discover(), interval=s.health_interval, subsystems=self._subsystems(),
                      source=s.uevent_source, sink=sink).run(stop, self.listening)

    def _subsystems(self) -> tuple[str, ...]:
        """The uevent subsystems worth a rescan (USB only when USB devices are served: keyboards are chatty)."""
        return SUBSYSTEMS + (("usb",) if self.settings.usbs else ())

    def pre_start(self, resource: str, devices: Sequence[Device]) -> None:
        """Give allocated USB nodes to QEMU's user, as KubeVirt's USB plugin does on Allocate.

        KubeVirt's virt-launcher runs QEMU as an unprivileged user (``usb_owner``, 107) that must
        open ``/dev/bus/usb/BBB/DDD``; other resources need nothing. Links are never followed.
        """
        owner = self.settings.usb_owner
        if owner is None or resource not in self._usb_resources:
            return
        for device in devices:
            for node in device.spec.devices:
                try:
                    os.chown(node.host_path, owner, owner, follow_symlinks=False)
                except OSError as exc:
                    raise VendorError(f"cannot hand {node.host_path} to user {owner} (QEMU's, as KubeVirt does): "
                                      f"{exc.strerror or exc}; mount the host's /dev read-write into the plugin pod, "
                                      "or set usb_owner: null and give the node to QEMU with a udev rule") from exc

    @property
    def _usb_resources(self) -> set[str]:
        return {u.resource_name for u in self.settings.usbs}

    def preferred_allocation(
        self, resource: str, available: Sequence[Device], must_include: Sequence[Device], size: int
    ) -> Sequence[str] | None:
        if resource in _SHARED or resource in self._usb_resources:
            return None  # identical slots, or USB devices without topology: the core's packing will do
        return prefer_groups(available, must_include, size)

    def explain(self) -> Iterable[Finding]:
        return self._scan()[1]

    def doctor(self) -> Iterable[Check]:
        s = self.settings
        kvm = os.path.join(s.dev_root, "kvm")
        problem = node_problem(kvm)
        checks = [Check("/dev/kvm usable", not problem, problem or f"{kvm} opens read-write",
                        hint_for(SHARED_NODES[0], problem))]
        if s.selectors or s.mdevs:
            groups = iommu_groups(s.sys_root)
            checks.append(Check("IOMMU enabled", bool(groups), f"{len(groups)} IOMMU groups", IOMMU_HINT))
            driver = os.path.isdir(os.path.join(s.sys_root, "bus/pci/drivers/vfio-pci"))
            checks.append(Check("vfio-pci driver loaded", driver,
                                "present" if driver else f"{s.sys_root}/bus/pci/drivers/vfio-pci missing",
                                "modprobe vfio-pci"))
            container = os.path.exists(os.path.join(s.dev_root, "vfio/vfio"))
            checks.append(Check("/dev/vfio/vfio present", container, "present" if container else "missing",
                                "modprobe vfio; mount the host's /dev into the plugin pod"))
        problem = UeventWatcher.monitor_problem(s.uevent_source)
        checks.append(Check("uevent monitor", not problem,
                            f"cannot open: {problem}" if problem else f"listening to {s.uevent_source} uevents",
                            "run the plugin pod with hostNetwork: true (uevents are per network namespace)"))
        return checks

    def node_labels(self, snapshot: Snapshot) -> Mapping[str, str]:
        kvm = snapshot.get("devices.kubevirt.io/kvm", ())
        usb_resources = self._usb_resources
        vfio = sum(1 for r, devices in snapshot.items() if r not in _SHARED and r not in usb_resources
                   for d in devices if d.healthy)
        return {
            "dpkit.io/kvm": "true" if any(d.healthy for d in kvm) else "false",
            "dpkit.io/iommu": "true" if iommu_groups(self.settings.sys_root) else "false",
            "dpkit.io/vfio-devices": str(vfio),
        }
