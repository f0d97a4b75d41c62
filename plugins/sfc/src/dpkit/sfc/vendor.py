"""The Solarflare NIC vendor: PCI functions bound to ``sfc``, served with what Onload needs.

One device per PCI function (``sfc`` creates one network interface per function), whose ID is
its PCI address, or ``<address>-<n>`` when the function is shared as several slots. A function
once advertised stays listed until the plugin restarts: when its link drops, its driver is
unbound or it is removed, it turns Unhealthy with the reason, and Healthy again on recovery.
"""

from __future__ import annotations

import os
import re
import stat
import threading
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from dpkit.core import (
    Check,
    ContainerSpec,
    Device,
    DeviceNode,
    EventSink,
    Finding,
    Health,
    MetricSample,
    Mount,
    Snapshot,
    UeventWatcher,
    ValidationError,
    Vendor,
    get_logger,
    kv,
    merge_specs,
)
from dpkit.sfc import compat, onload
from dpkit.sfc.allocation import prefer
from dpkit.sfc.config import SfcConfig, parse_config
from dpkit.sfc.pools import assign, slot_ids
from dpkit.sfc.rtnl import open_link_monitor
from dpkit.sfc.sysfs import PciFunction, read_function, read_text, read_version, walk_pci
from dpkit.sfc.udev import SETTLE_DELAY, WATCHED_SUBSYSTEMS, RemovalHints, Udev, relevant

log = get_logger("sfc")
_LABEL_VALUE = re.compile(r"[^A-Za-z0-9_.-]")


@dataclass(frozen=True)
class _Known:
    """What was last advertised for a PCI function, to keep listing it when it goes away."""

    resource: str
    devices: tuple[Device, ...]


def _env_suffix(resource: str) -> str:
    return re.sub(r"[^A-Za-z0-9]", "_", resource).upper()


def _label(value: str) -> str:
    return _LABEL_VALUE.sub("-", value)[:63].strip("-_.")


class SfcVendor(Vendor):
    """Solarflare NICs through udev, with live link health and Onload container specs."""

    name = "sfc"
    description = "Solarflare (AMD) NICs for kernel-bypass networking with OpenOnload"

    def __init__(self, config: Mapping[str, Any] | None = None) -> None:
        super().__init__(config)
        self.settings: SfcConfig = parse_config(self.config)
        self.poll_interval = self.settings.resync_interval
        self._lock = threading.Lock()
        self._known: dict[str, _Known] = {}
        self._functions: list[PciFunction] = []
        self._findings: list[Finding] = []
        self._onload: onload.OnloadState | None = None
        self._onload_env: dict[str, str] = {}
        self._udev: Udev | None = None
        self._udev_error = ""
        self._links_error = ""  # why link changes are seen only at resync ("" when rtnetlink works)
        self._logged_problems: set[tuple[str, str]] = set()
        if self.settings.sys_root == "/sys":
            try:
                self._udev = Udev()
            except (ImportError, OSError) as exc:  # no libudev in the image: poll sysfs instead
                self._udev_error = f"libudev unavailable ({exc}); polling sysfs every {self.poll_interval:g} s"
                log.warning(self._udev_error)

    @property
    def source(self) -> str:
        """How devices are found and watched: through udev, or by walking and polling a sysfs tree."""
        return "udev" if self._udev is not None else f"sysfs walk of {self.settings.sys_root}"

    # -- discovery -----------------------------------------------------------------------
    def _scan(self, gone: Collection[str]) -> tuple[list[PciFunction], list[Finding]]:
        """Our vendor's PCI functions, and findings about everything odd on the way.

        ``gone``: sysfs paths a remove uevent announced, skipped even if still present.
        """
        findings: list[Finding] = []
        if self._udev is not None:
            try:
                paths = self._udev.pci_paths()
            except Exception as exc:  # a broken udev must not take discovery down
                log.warning("udev enumeration failed; walking sysfs", extra=kv(error=str(exc)))
                paths = walk_pci(self.settings.sys_root)
        else:
            paths = walk_pci(self.settings.sys_root)
        functions = []
        for path in paths:
            if str(path) in gone:
                continue
            vendor_id = (read_text(path / "vendor") or "").lower()
            if vendor_id not in self.settings.vendor_ids:
                continue
            function = read_function(path, gone)
            if function is None:
                findings.append(Finding(subject=path.name[:80], advertised=False,
                                        reason="not a valid PCI address; ignored"))
                continue
            self._log_problems(function)
            functions.append(function)
        return functions, findings

    def _log_problems(self, function: PciFunction) -> None:
        """Log each odd sysfs value once (discovery repeats; ``dpkit discover`` lists them all)."""
        for problem in function.problems:
            key = (function.address, problem)
            if key not in self._logged_problems and len(self._logged_problems) < 4096:
                self._logged_problems.add(key)
                log.warning("odd sysfs data", extra=kv(pci=function.address, problem=problem))

    def discover(self) -> Snapshot:
        return self._discover(frozenset())

    def _discover(self, gone: Collection[str]) -> Snapshot:
        with self._lock:
            functions, findings = self._scan(gone)
            if self.settings.onload_plugin is not None:
                return self._discover_onload_plugin(self.settings.onload_plugin, functions, findings)
            state = onload.detect(self.settings.onload, self.settings.dev_root, self.settings.sys_root)
            onload_spec, onload_problem = self._onload_spec(state)
            snapshot: dict[str, list[Device]] = {r: [] for r in self.settings.resources}
            seen: set[str] = set()
            for function in functions:
                known = self._known.get(function.address)
                if function.driver not in self.settings.drivers and known is None:
                    findings.append(self._unbound_finding(function))
                    continue
                seen.add(function.address)
                resource, devices = self._devices(function, known, state, onload_spec, onload_problem)
                self._known[function.address] = _Known(resource, devices)
                snapshot.setdefault(resource, []).extend(devices)
                findings.extend(self._function_findings(function, resource, devices))
            for address, known in self._known.items():
                if address not in seen:
                    removed = tuple(d.with_health(Health.UNHEALTHY, "removed from the host") for d in known.devices)
                    snapshot.setdefault(known.resource, []).extend(removed)
                    findings.append(Finding(subject=address, advertised=True, resource=known.resource,
                                            reason="removed from the host; listed Unhealthy until it returns"))
            findings.append(self._onload_finding(state, onload_problem))
            if not functions:
                ids = ", ".join(self.settings.vendor_ids)
                findings.append(Finding(subject="sfc", advertised=False,
                                        reason=f"no PCI function with vendor ID {ids} found",
                                        hint="check lspci -d 1924: and vendor.vendor_ids"))
            if self._udev_error:
                findings.append(Finding(subject="udev", advertised=True, reason=self._udev_error))
            if self._links_error:
                findings.append(Finding(subject="rtnetlink", advertised=True, reason=self._links_error))
            self._functions, self._findings, self._onload = functions, findings, state
            return {r: tuple(devs) for r, devs in snapshot.items()}

    def _discover_onload_plugin(self, settings: compat.OnloadPluginConfig, functions: Sequence[PciFunction],
                                findings: list[Finding]) -> Snapshot:
        """``mode: onload``: AMD's ``maxPods`` interchangeable slots, each with the whole Onload spec.

        As AMD's plugin: NUMA hints name every node with a Solarflare interface, and the spec does
        not depend on the slots allocated. Unlike it, what would make a container fail to start
        (no ``/dev/onload``, no library to preload, no script to mount) or what ``needNic``
        requires turns the slots Unhealthy with the reason, instead of failing at container start
        or exiting.
        """
        for function in functions:
            if function.driver not in self.settings.drivers:
                findings.append(self._unbound_finding(function))
        nics = [f for f in functions if f.driver in self.settings.drivers and f.interfaces]
        names = [i.name for f in nics for i in f.interfaces]
        dev_root = Path(self.settings.dev_root)
        nodes = [dev_root / n for n in compat.DEVICE_NODES if os.path.exists(dev_root / n)]
        try:
            entries = sorted(os.listdir(settings.host_lib_dir))
        except OSError:
            entries = []
        libraries = [n for n in compat.library_files(entries)
                     if not os.path.isdir(os.path.join(settings.host_lib_dir, n))]
        problems = []
        if dev_root / onload.MAIN_NODE not in nodes:
            problems.append(f"device node {dev_root / onload.MAIN_NODE} missing (is the onload kernel module loaded?)")
        if settings.set_preload and onload.MAIN_LIBRARY not in libraries:
            problems.append(f"{onload.MAIN_LIBRARY} not in {settings.host_lib_dir} (hostOnloadPath + /usr/lib64), "
                            "which LD_PRELOAD names (setPreload)")
        if settings.mount_onload and not os.path.isfile(settings.host_script):
            problems.append(f"onload script {settings.host_script} missing (mountOnload)")
        if settings.need_nic and not nics:
            problems.append("no Solarflare interface bound to " + "/".join(self.settings.drivers)
                            + " (needNic is true; -needNic=false serves Onload without one)")
        mounts = [Mount(os.path.join(settings.host_lib_dir, n), os.path.join(settings.container_lib_dir, n))
                  for n in libraries]
        if settings.mount_onload and os.path.isfile(settings.host_script):
            mounts.append(Mount(settings.host_script, settings.container_script))
        env = {"LD_PRELOAD": os.path.join(settings.container_lib_dir, onload.MAIN_LIBRARY)} if settings.set_preload \
            else {}
        version = read_version(Path(self.settings.sys_root) / "module" / "onload" / "version")
        missing = tuple(p for p in problems if "needNic" not in p)
        state = onload.OnloadState(tuple(map(str, nodes)), tuple(libraries), version, missing)
        numa = tuple(sorted({f.numa_node for f in nics if f.numa_node is not None}))
        reason = "; ".join(problems)
        attributes = {"interfaces": ",".join(names), "onload_version": version,
                      "numa": ",".join(map(str, numa))}
        try:
            spec = ContainerSpec(devices=tuple(DeviceNode(str(p), f"/dev/{p.name}", "mrw") for p in nodes),
                                 mounts=tuple(mounts), env=env)
        except ValidationError as exc:
            spec, reason = ContainerSpec(), "; ".join([*problems, f"invalid Onload paths: {exc}"])
        health = Health.UNHEALTHY if reason else Health.HEALTHY
        ids = compat.slot_ids(settings.max_pods)
        devices = tuple(Device(i, health, numa, spec, reason,
                               {**{k: v for k, v in attributes.items() if v}, "slot": f"{n + 1}/{len(ids)}"})
                        for n, i in enumerate(ids))
        findings.append(Finding(subject=compat.RESOURCE, advertised=True, resource=compat.RESOURCE,
                                reason=f"{len(ids)} Onload slot(s) (maxPods), {reason or 'healthy'}; "
                                       f"{len(nodes)} device node(s), {len(mounts)} mount(s), "
                                       f"LD_PRELOAD {'set' if env else 'not set'}; interfaces: "
                                       f"{', '.join(names) or 'none'}",
                                hint="see docs/sfc.md, 'AMD Onload compatibility'" if reason else ""))
        if self._udev_error:
            findings.append(Finding(subject="udev", advertised=True, reason=self._udev_error))
        if self._links_error:
            findings.append(Finding(subject="rtnetlink", advertised=True, reason=self._links_error))
        self._functions, self._findings, self._onload, self._onload_env = list(functions), findings, state, {}
        return {compat.RESOURCE: devices}

    def _onload_spec(self, state: onload.OnloadState) -> tuple[ContainerSpec, str]:
        """The Onload part of every spec, and why Onload is unusable ("" when it is fine)."""
        if not state.available:
            self._onload_env = {}
            return ContainerSpec(), "Onload not usable: missing " + "; ".join(state.missing)
        try:
            spec = onload.container_spec(state, self.settings.onload)
        except ValidationError as exc:
            self._onload_env = {}
            return ContainerSpec(), f"Onload not usable: {exc}"
        self._onload_env = dict(spec.env)
        return spec, ""

    def _devices(self, function: PciFunction, known: _Known | None, state: onload.OnloadState,
                 onload_spec: ContainerSpec, onload_problem: str) -> tuple[str, tuple[Device, ...]]:
        names = [i.name for i in function.interfaces]
        bound = function.driver in self.settings.drivers
        if bound or known is None:
            resource, slots = assign(self.settings, function.address, names)
            ids = slot_ids(function.address, slots)
        else:  # unbound: interfaces are gone, so keep the resource and IDs it had
            resource, ids = known.resource, tuple(d.id for d in known.devices)
        reasons = []
        if not bound:
            reasons.append(f"driver unbound (now {function.driver or 'none'})")
        elif not function.interfaces:
            reasons.append("no network interface (driver still probing, or the netdev was removed)")
        reasons += [f"link down on {i.name} ({i.operstate or 'unknown state'})"
                    for i in function.interfaces if not i.link_up]
        if self.settings.onload.required and onload_problem:
            reasons.append(f"{onload_problem} (vendor.onload.required is true)")
        attributes = self._attributes(function, state, onload_problem)
        numa = () if function.numa_node is None else (function.numa_node,)
        health = Health.UNHEALTHY if reasons else Health.HEALTHY
        reason = "; ".join(reasons)
        try:
            env = {
                "SFC_INTERFACES": ",".join(names),
                "SFC_PCI_ADDRESSES": function.address,
                f"PCIDEVICE_{_env_suffix(resource)}": function.address,
                **onload_spec.env,
            }
            spec = ContainerSpec(devices=onload_spec.devices, mounts=onload_spec.mounts, env=env)
            devices = tuple(Device(i, health, numa, spec, reason, {**attributes, "slot": f"{n + 1}/{len(ids)}"})
                            for n, i in enumerate(ids))
        except ValidationError as exc:
            log.error("invalid data for a NIC; marking it unhealthy",
                      extra=kv(pci=function.address, error=str(exc)))
            devices = tuple(Device(i, Health.UNHEALTHY, numa, ContainerSpec(), f"invalid data: {exc}")
                            for i in ids)
        return resource, devices

    def _attributes(self, function: PciFunction, state: onload.OnloadState, onload_problem: str) -> dict[str, str]:
        first = function.interfaces[0] if function.interfaces else None
        attributes = {
            "pci": function.address,
            "nic": function.nic,
            "vendor_id": function.vendor_id,
            "device_id": function.device_id,
            "driver": function.driver,
            "driver_version": read_version(Path(self.settings.sys_root) / "module" / function.driver / "version")
            if function.driver else "",
            "interfaces": ",".join(i.name for i in function.interfaces),
            "mac": first.mac if first else "",
            "link": ",".join(i.operstate or "unknown" for i in function.interfaces),
            "speed_mbps": str(first.speed_mbps) if first and first.speed_mbps else "",
            "numa": "" if function.numa_node is None else str(function.numa_node),
            "onload": "no" if onload_problem else "yes",
            "onload_version": state.version,
        }
        return {k: v for k, v in attributes.items() if v}

    # -- explain -------------------------------------------------------------------------
    def _unbound_finding(self, function: PciFunction) -> Finding:
        driver = function.driver or "no driver"
        return Finding(subject=function.address, advertised=False,
                       reason=f"bound to {driver}, not {'/'.join(self.settings.drivers)}",
                       hint="load the sfc module (modprobe sfc) or bind the function to it; "
                            "functions passed to VMs through vfio-pci are left alone on purpose")

    def _function_findings(self, function: PciFunction, resource: str, devices: Sequence[Device]) -> list[Finding]:
        names = ",".join(i.name for i in function.interfaces) or "no interface"
        state = devices[0].reason if devices and not devices[0].healthy else "healthy"
        out = [Finding(subject=f"{function.address} ({names})", advertised=True, resource=resource,
                       reason=f"{len(devices)} slot(s), {state}")]
        out += [Finding(subject=function.address, advertised=True, resource=resource, reason=f"sysfs: {p}")
                for p in function.problems]
        return out

    def _onload_finding(self, state: onload.OnloadState, problem: str) -> Finding:
        if not problem:
            version = f" {state.version}" if state.version else ""
            return Finding(subject="onload", advertised=True,
                           reason=f"Onload{version} found: {len(state.nodes)} device node(s), "
                                  f"{len(state.libraries)} librar(ies) mounted into containers")
        if self.settings.onload.required:
            return Finding(subject="onload", advertised=False, reason=f"{problem}; NICs are Unhealthy",
                           hint="install Onload on the host, or set vendor.onload.required to false")
        return Finding(subject="onload", advertised=False, reason=f"{problem}; serving plain NICs without Onload",
                       hint="install Onload on the host and set vendor.onload.library_path to its libraries")

    def explain(self) -> Iterable[Finding]:
        self.discover()
        with self._lock:
            return list(self._findings)

    # -- watch ---------------------------------------------------------------------------
    def watch(self, sink: EventSink, stop: threading.Event) -> None:
        """Re-discover on uevents and rtnetlink link changes, again ``SETTLE_DELAY`` after them, and at resync.

        See :mod:`dpkit.sfc.udev`. Without udev (a test tree, no libudev in the image) this polls
        every ``resync_interval`` seconds instead; without a monitor (netlink refused) the
        watcher's timer does.
        """
        if self._udev is None:
            super().watch(sink, stop)
            return
        links, self._links_error = open_link_monitor()
        UeventWatcher(RemovalHints(self._discover), interval=self.settings.resync_interval,
                      subsystems=WATCHED_SUBSYSTEMS, source=self.settings.udev_source, accept=relevant,
                      sources=[links] if links else [], settle=SETTLE_DELAY, sink=sink).run(stop)

    # -- allocation ----------------------------------------------------------------------
    def container_spec(self, resource: str, devices: Sequence[Device]) -> ContainerSpec:
        """Merged device specs, with the Onload tuning values restored verbatim.

        Merging joins differing env values with commas and drops repeated parts, which would
        mangle an ``EF_*`` value such as ``"1,1"``; these are per-container settings.
        """
        merged = merge_specs(d.spec for d in devices)
        with self._lock:
            exact = {k: v for k, v in self._onload_env.items() if k in merged.env}
        return replace(merged, env={**merged.env, **exact})

    def preferred_allocation(self, resource: str, available: Sequence[Device], must_include: Sequence[Device],
                             size: int) -> Sequence[str] | None:
        if self.settings.onload_plugin is not None:  # interchangeable slots: the core's NUMA packing
            return None
        return prefer(available, must_include, size)

    # -- operations ----------------------------------------------------------------------
    def doctor(self) -> Iterable[Check]:
        sys_root, dev_root = Path(self.settings.sys_root), Path(self.settings.dev_root)
        checks = []
        checks.append(self._driver_check(sys_root))
        self.discover()
        with self._lock:
            functions, state = list(self._functions), self._onload
        bound = [f for f in functions if f.driver in self.settings.drivers]
        optional = self.settings.onload_plugin is not None and not self.settings.onload_plugin.need_nic
        checks.append(Check("Solarflare NICs present", bool(bound) or optional,
                            f"{len(bound)} of {len(functions)} function(s) bound to the driver"
                            + (" (needNic is false: not required)" if optional else ""),
                            "check lspci -d 1924: and the driver binding"))
        for name in onload.DEVICE_NODES:
            path = dev_root / name
            try:
                is_char = stat.S_ISCHR(os.stat(path).st_mode)
                detail = f"{path} is a character device" if is_char else f"{path} exists but is not a character device"
            except OSError:
                is_char, detail = False, f"{path} missing"
            checks.append(Check(f"onload device {name}", is_char, detail,
                                "load the onload kernel module (onload_tool reload)"))
        has_lib = bool(state and onload.MAIN_LIBRARY in state.libraries)
        plugin = self.settings.onload_plugin
        library_dir, key = ((plugin.host_lib_dir, "hostOnloadPath") if plugin is not None
                            else (self.settings.onload.library_path, "vendor.onload.library_path"))
        checks.append(Check("onload libraries", has_lib,
                            f"{onload.MAIN_LIBRARY} {'found' if has_lib else 'missing'} in {library_dir}",
                            f"install Onload user space on the host and set {key}"))
        if plugin is not None and plugin.mount_onload:
            script = os.path.isfile(plugin.host_script)
            checks.append(Check("onload script", script, f"{plugin.host_script} {'found' if script else 'missing'}",
                                "install Onload user space on the host (mountOnload mounts its onload script)"))
        if self.settings.sys_root == "/sys":
            checks.append(Check("udev available", self._udev is not None, self._udev_error or "libudev loaded",
                                "install libudev1 in the plugin image"))
        return checks

    def _driver_check(self, sys_root: Path) -> Check:
        """Whether a driver in ``vendor.drivers`` is loaded: its module or PCI driver directory in sysfs."""
        drivers = self.settings.drivers
        loaded = [d for d in drivers if (sys_root / "module" / d).exists()
                  or (sys_root / "bus" / "pci" / "drivers" / d).exists()]
        if loaded:
            return Check("sfc driver loaded", True, f"loaded: {', '.join(loaded)}")
        if len(drivers) == 1:
            detail = (f"{drivers[0]} is not loaded: neither {sys_root}/module/{drivers[0]} nor "
                      f"{sys_root}/bus/pci/drivers/{drivers[0]} exists")
        else:
            detail = (f"none of {', '.join(drivers)} (vendor.drivers) is loaded: no {sys_root}/module/<name> "
                      f"or {sys_root}/bus/pci/drivers/<name> exists for any of them")
        return Check("sfc driver loaded", False, detail,
                     f"load the in-tree driver with 'modprobe {drivers[0]}' (kernel package 'linux-modules-extra' "
                     "on some distributions) or install AMD's out-of-tree sfc driver; if the NICs use another "
                     "driver, list it in vendor.drivers")

    def node_labels(self, snapshot: Snapshot) -> Mapping[str, str]:
        with self._lock:
            functions, state = list(self._functions), self._onload
        bound = [f for f in functions if f.driver in self.settings.drivers]
        labels = {
            "sfc-nics": str(len({f.nic for f in bound})),
            "sfc-interfaces": str(sum(len(f.interfaces) for f in bound)),
            "sfc-onload": "true" if state and state.available else "false",
        }
        if state and state.version:
            labels["sfc-onload-version"] = _label(state.version)
        versions = {read_version(Path(self.settings.sys_root) / "module" / f.driver / "version") for f in bound}
        versions.discard("")
        if len(versions) == 1:
            labels["sfc-driver-version"] = _label(versions.pop())
        return labels

    def metric_samples(self) -> Iterable[MetricSample]:
        with self._lock:
            functions, state = list(self._functions), self._onload
        samples = [MetricSample("dpkit_sfc_onload_available", "1 when Onload is usable on this node",
                                1.0 if state and state.available else 0.0)]
        for function in functions:
            for interface in function.interfaces:
                labels = {"pci": function.address, "interface": interface.name}
                samples.append(MetricSample("dpkit_sfc_link_up", "1 when the interface's link is up",
                                            1.0 if interface.link_up else 0.0, labels))
                if interface.speed_mbps:
                    samples.append(MetricSample("dpkit_sfc_link_speed_bits_per_second",
                                                "Negotiated link speed in bits per second (sysfs speed, Mb/s, x 1e6)",
                                                interface.speed_mbps * 1e6, labels))
        return samples
