"""``dpkit doctor``: one line per check, each failure with a fix hint.

The core checks what every vendor needs (config, plugin directory, kubelet and pod-resources
sockets, the CDI / NFD / metrics settings, discovery, and that every device node a container
would get exists and is accessible). Vendors add their own through :meth:`Vendor.doctor`,
built from the helpers below (kernel module loaded, IOMMU on, driver bound, library
loadable), which take a ``sys_root`` so they can be tested on a fake sysfs tree.
"""

from __future__ import annotations

import ctypes
import os
import stat
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from dpkit.core.engine.events import connect_error, validate_snapshot
from dpkit.core.engine.vendor_calls import VendorCalls
from dpkit.core.support.config import Config
from dpkit.core.tools.registry import load_vendor_class
from dpkit.core.vendorapi.device import Device, DeviceNode
from dpkit.core.vendorapi.errors import ConfigError, DpkitError
from dpkit.core.vendorapi.validation import check_resource_name
from dpkit.core.vendorapi.vendor import Check, Vendor

MAX_LISTED = 5  # problems named in one line; the rest are counted


def _listing(problems: list[str]) -> str:
    more = f" (+{len(problems) - MAX_LISTED} more)" if len(problems) > MAX_LISTED else ""
    return "; ".join(problems[:MAX_LISTED]) + more


# -- helpers for vendor checks ------------------------------------------------------------------
def check_socket(name: str, path: str | Path, hint: str) -> Check:
    """A unix socket that accepts connections."""
    path = Path(path)
    if not path.exists():
        return Check(name, False, f"{path} does not exist", hint)
    error = connect_error(path, timeout=1.0)
    if error:
        return Check(name, False, f"{path}: {error}", hint)
    return Check(name, True, f"{path} accepts connections")


def check_writable_dir(name: str, path: str | Path, hint: str) -> Check:
    """A directory we can create files in (or create, when its parent allows)."""
    path = Path(path)
    probe = path if path.exists() else next((p for p in path.parents if p.exists()), Path("/"))
    ok = probe.is_dir() and os.access(probe, os.W_OK | os.X_OK)
    detail = f"{path} is writable" if ok and probe == path else (
        f"{path} can be created" if ok else f"{probe} is {'not writable' if probe.is_dir() else 'not a directory'}")
    return Check(name, ok, detail, "" if ok else hint)


def check_kernel_module(module: str, *, sys_root: str | Path = "/sys", hint: str = "") -> Check:
    """A kernel module is loaded (``/sys/module/<name>`` exists)."""
    ok = (Path(sys_root) / "module" / module).is_dir()
    return Check(f"kernel module {module} loaded", ok, f"{module} is {'loaded' if ok else 'not loaded'}",
                 "" if ok else hint or f"load it: modprobe {module}")


def check_iommu(*, sys_root: str | Path = "/sys") -> Check:
    """The IOMMU is on: there are IOMMU units or IOMMU groups."""
    root = Path(sys_root)
    units = sorted(p.name for p in (root / "class" / "iommu").glob("*"))
    groups = list((root / "kernel" / "iommu_groups").glob("*"))
    ok = bool(units or groups)
    detail = f"{len(groups)} IOMMU groups, units: {', '.join(units) or '-'}" if ok else "no IOMMU groups"
    return Check("IOMMU enabled", ok, detail, "" if ok else
                 "enable VT-d / AMD-Vi in the firmware and boot with intel_iommu=on (or amd_iommu=on) iommu=pt")


def check_driver_bound(pci_address: str, driver: str, *, sys_root: str | Path = "/sys") -> Check:
    """A PCI function is bound to ``driver`` (``/sys/bus/pci/devices/<addr>/driver``)."""
    name = f"{pci_address} bound to {driver}"
    device = Path(sys_root) / "bus" / "pci" / "devices" / pci_address
    if not device.exists():
        return Check(name, False, f"no PCI device {pci_address}", "check the address with lspci -D")
    link = device / "driver"
    bound = os.path.basename(os.readlink(link)) if link.is_symlink() else ""
    if bound == driver:
        return Check(name, True, f"bound to {driver}")
    return Check(name, False, f"bound to {bound or 'no driver'}",
                 f"echo {driver} > {device}/driver_override; "
                 + (f"echo {pci_address} > {link}/unbind; " if bound else "")
                 + f"echo {pci_address} > /sys/bus/pci/drivers_probe")


def check_library_loadable(library: str, *, hint: str = "") -> Check:
    """A shared library loads (``dlopen``), e.g. ``libnvidia-ml.so.1`` for NVML."""
    try:
        ctypes.CDLL(library)
    except OSError as exc:
        return Check(f"{library} loadable", False, str(exc),
                     hint or f"install the package providing {library} or mount the driver's libraries")
    return Check(f"{library} loadable", True, "loaded")


def check_device_nodes(nodes: Iterable[DeviceNode], name: str = "device nodes present and accessible") -> Check:
    """Each host device node exists, is a char or block device, and allows what its permissions ask."""
    problems: list[str] = []
    seen: set[str] = set()
    for node in nodes:
        if node.host_path in seen:
            continue
        seen.add(node.host_path)
        try:
            mode = os.stat(node.host_path).st_mode
        except OSError as exc:
            problems.append(f"{node.host_path}: {exc.strerror or exc}")
            continue
        if not (stat.S_ISCHR(mode) or stat.S_ISBLK(mode)):
            problems.append(f"{node.host_path}: not a device node")
            continue
        wanted = (os.R_OK if "r" in node.permissions else 0) | (os.W_OK if "w" in node.permissions else 0)
        if wanted and not os.access(node.host_path, wanted):
            problems.append(f"{node.host_path}: no {node.permissions} access")
    if problems:
        return Check(name, False, _listing(problems),
                     "load the driver that creates the nodes, and mount /dev into the plugin pod")
    return Check(name, True, f"{len(seen)} device node(s) ok" if seen else "no device nodes to check")


# -- the core's checks --------------------------------------------------------------------------
def core_checks(config: Config, config_error: str) -> list[Check]:
    """The node-level checks, with hints naming the paths this config uses (not the defaults)."""
    checks = [
        Check("config valid", not config_error, config_error or f"{config.source} loaded",
              "fix the key named above in the ConfigMap or environment" if config_error else ""),
    ]
    plugin_dir = Path(config.plugin_dir)
    writable = plugin_dir.is_dir() and os.access(plugin_dir, os.W_OK)
    checks.append(Check("plugin directory writable", writable,
                        f"{plugin_dir} {'is writable' if writable else 'is missing or not writable'}",
                        f"mount the host's kubelet device-plugin directory read-write at {plugin_dir} "
                        "(or set plugin_dir to where it is)"))
    checks.append(check_socket("kubelet socket reachable", config.kubelet_socket_path,
                               f"is the kubelet running, and is its device-plugin directory mounted at {plugin_dir}? "
                               "(to try dpkit without a cluster: `dpkit kubelet --dir DIR`)"))
    checks.append(check_writable_dir("state directory usable", config.state_dir,
                                     "state_dir must be a writable local directory (an emptyDir is fine)"))
    if config.pod_resources_socket:
        where = Path(config.pod_resources_socket).parent
        checks.append(check_socket("pod-resources socket reachable", config.pod_resources_socket,
                                   f"mount the host's kubelet pod-resources directory at {where} (needed for "
                                   "'HELD BY' in dpkit status), or set pod_resources_socket: '' to skip it"))
    if config.cdi_allocate and not config.cdi_dir:
        checks.append(Check("CDI settings", False, "cdi_allocate is true but cdi_dir is empty",
                            "set cdi_dir: /var/run/cdi, or cdi_allocate: false"))
    if config.cdi_dir:
        checks.append(check_writable_dir("CDI spec directory writable", config.cdi_dir,
                                         f"mount the host's {config.cdi_dir} read-write into the pod"))
    if config.nfd_features_dir:
        checks.append(check_writable_dir("NFD features directory writable", config.nfd_features_dir,
                                         f"mount the host's {config.nfd_features_dir} read-write into the pod"))
    if config.metrics_address:
        from dpkit.core.support.config import parse_address

        try:
            host, port = parse_address(config.metrics_address)
            checks.append(Check("metrics address valid", True, f"{host}:{port}"))
        except DpkitError as exc:
            checks.append(Check("metrics address valid", False, str(exc), "use host:port, e.g. 0.0.0.0:9400"))
    return checks


def vendor_checks(vendor: Vendor | VendorCalls, timeout: float = 10.0) -> list[Check]:
    """Discovery runs, every device node a container would get is usable, then the vendor's own checks.

    Each hook runs under ``timeout`` (the config's ``vendor_call_timeout``): a hang is a failed check.
    """
    calls = VendorCalls(vendor, timeout) if isinstance(vendor, Vendor) else vendor
    checks: list[Check] = []
    try:
        raw = calls.discover()
    except Exception as exc:
        checks.append(Check(f"vendor {calls.name} discovery", False, f"{type(exc).__name__}: {exc}",
                            f"run `dpkit discover {calls.name}` for details"))
        snapshot: dict[str, tuple[Device, ...]] = {}
    else:
        # what `dpkit run` keeps: invalid resource names and entries are dropped there too
        snapshot, problems = validate_snapshot(raw, check_resource_name)
        total = sum(len(d) for d in snapshot.values())
        sick = [f"{d.id} ({d.reason or 'unhealthy'})" for devs in snapshot.values() for d in devs if not d.healthy]
        detail = f"{total} device(s) in {len(snapshot)} resource(s)"
        if sick:
            detail += f"; unhealthy: {_listing(sick)}"
        checks.append(Check(f"vendor {calls.name} discovery", True, detail))
        if problems:
            checks.append(Check("vendor data valid", False, f"dropped by `dpkit run`: {_listing(problems)}",
                                "a vendor bug or a bad resource name in the vendor's config"))
        checks.append(Check("resources to register", bool(snapshot),
                            f"{len(snapshot)}: {_listing(sorted(snapshot))}" if snapshot else
                            "none: `dpkit run` would register nothing and exit 1 after its grace period",
                            "" if snapshot else f"run `dpkit discover {calls.name}` to see why nothing is offered"))
    nodes: list[DeviceNode] = []
    spec_errors: list[str] = []
    for resource, devices in snapshot.items():
        for device in devices:
            try:
                nodes.extend(calls.container_spec(resource, [device]).devices)
            except Exception as exc:
                spec_errors.append(f"{device.id}: {exc}")
    if spec_errors:
        checks.append(Check("container specs valid", False, _listing(spec_errors),
                            "a vendor bug or bad hardware data; see the plugin's log"))
    if snapshot:
        name = "container device nodes present and accessible"
        deferred = 0
        if calls.overrides("pre_start"):
            # a vendor with a pre-start hook may make a container's node only when it starts
            # (CEX's per-container zcrypt nodes): an absent one is not a fault before then
            present = [n for n in nodes if os.path.lexists(n.host_path)]
            deferred, nodes = len(nodes) - len(present), present
        check = check_device_nodes(nodes, name)
        if deferred:
            check = Check(check.name, check.ok,
                          f"{check.detail}; {deferred} more made at container start by the pre-start hook", check.hint)
        checks.append(check)
    try:
        checks.extend(calls.doctor())
    except Exception as exc:
        checks.append(Check(f"vendor {calls.name} checks", False, f"{type(exc).__name__}: {exc}"))
    return checks


def run_checks(vendor_name: str, config: Config, config_error: str = "",
               make: Callable[[Mapping[str, Any]], Vendor] | None = None, load_error: str = "") -> list[Check]:
    """Every check, building the vendor the way `dpkit run` does (``make``: the CLI's vendor factory).

    A config error in the ``vendor:`` section fails "config valid" itself: the file is not valid
    for `dpkit run`, so doctor must not call it valid first.
    """
    vendor: Vendor | None = None
    if not config_error and not load_error:
        try:
            vendor = (make or load_vendor_class(vendor_name))(config.vendor)
        except ConfigError as exc:
            config_error = str(exc)
        except DpkitError as exc:
            load_error = str(exc)
    checks = core_checks(config, config_error)
    if vendor is None:
        if load_error:
            checks.append(Check(f"vendor {vendor_name} loads", False, load_error,
                                "install the vendor package (`dpkit vendors` lists what is installed)"))
        return checks
    checks.append(Check(f"vendor {vendor_name} loads", True, type(vendor).__module__))
    calls = VendorCalls(vendor, config.vendor_call_timeout, config.vendor_scan_timeout)
    try:
        checks.extend(vendor_checks(calls))
    finally:
        calls.close()
    return checks
