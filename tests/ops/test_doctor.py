"""`dpkit doctor`: one line per check, a fix hint for each failure, exit 1 when any fails."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import yaml
from scripted_vendor import ScriptedVendor

from dpkit.core.tools import cli
from dpkit.core.tools.doctor import (
    check_device_nodes,
    check_driver_bound,
    check_iommu,
    check_kernel_module,
    check_library_loadable,
    vendor_checks,
)
from dpkit.core.vendorapi.device import DeviceNode
from dpkit.core.vendorapi.vendor import Check


def write_config(path: Path, **settings: Any) -> Path:
    path.write_text(yaml.safe_dump(settings))
    return path


def doctor(config: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, dict[str, str], str]:
    code = cli.main(["doctor", "sim", "-c", str(config)])
    out = capsys.readouterr().out
    lines = {}
    for line in out.splitlines():
        if line.startswith("[ok  ] ") or line.startswith("[FAIL] "):
            name = line[7:].split(":", 1)[0]
            lines[name] = line
    return code, lines, out


def test_healthy_node_passes_every_check(kubelet, plugin_dir, short_tmp, capsys):
    config = write_config(short_tmp / "c.yaml", plugin_dir=str(plugin_dir), state_dir=str(short_tmp / "st"),
                          pod_resources_socket=str(kubelet.pod_resources_socket), cdi_dir=str(short_tmp / "cdi"),
                          cdi_allocate=True, nfd_features_dir=str(short_tmp / "nfd"), metrics_address="127.0.0.1:9400")
    code, lines, out = doctor(config, capsys)
    assert code == 0, out
    assert all(line.startswith("[ok  ]") for line in lines.values())
    for name in ("config valid", "kubelet socket reachable", "pod-resources socket reachable",
                 "CDI spec directory writable", "NFD features directory writable", "metrics address valid",
                 "vendor sim discovery", "container device nodes present and accessible"):
        assert name in lines, out
    assert "fix:" not in out
    assert out.rstrip().endswith(f"{len(lines)} passed, 0 failed")


def test_every_failure_is_named_with_a_fix_and_exits_1(kubelet, plugin_dir, short_tmp, capsys):
    blocker = short_tmp / "a-file"
    blocker.write_text("")
    config = write_config(short_tmp / "c.yaml", plugin_dir=str(plugin_dir), state_dir=str(short_tmp / "st"),
                          pod_resources_socket=str(short_tmp / "gone.sock"), cdi_allocate=True, cdi_dir="",
                          nfd_features_dir=str(blocker / "features.d"),
                          vendor={"device_node": "/dev/dpkit-no-such-node"})
    code, lines, out = doctor(config, capsys)
    assert code == 1
    for name in ("pod-resources socket reachable", "CDI settings", "NFD features directory writable",
                 "container device nodes present and accessible"):
        assert lines[name].startswith("[FAIL]"), out
        following = out.split(lines[name], 1)[1].splitlines()[1]
        assert following.strip().startswith("fix:"), f"{name} has no fix hint"
    assert "/dev/dpkit-no-such-node" in lines["container device nodes present and accessible"]
    assert lines["kubelet socket reachable"].startswith("[ok  ]")


def test_unreadable_config_is_a_failed_check_not_a_crash(short_tmp, capsys):
    config = short_tmp / "c.yaml"
    config.write_text("plugin_dir: [unclosed")
    code, lines, _ = doctor(config, capsys)
    assert code == 1 and lines["config valid"].startswith("[FAIL]")


def test_device_nodes_must_be_device_nodes(short_tmp):
    plain = short_tmp / "plain"
    plain.write_text("")
    check = check_device_nodes([DeviceNode(str(plain)), DeviceNode("/dev/null", "/dev/x", "rw")])
    assert not check.ok and "not a device node" in check.detail and "/dev/null" not in check.detail
    many = check_device_nodes(DeviceNode(f"/dev/dpkit-missing-{i}") for i in range(9))
    assert "(+4 more)" in many.detail
    assert check_device_nodes([DeviceNode("/dev/null")]).ok


class BrokenVendor(ScriptedVendor):
    def doctor(self) -> list[Check]:
        raise RuntimeError("NVML init hung up")


def test_vendor_failures_become_failed_checks():
    vendor = BrokenVendor()
    vendor.discover_error = OSError("sysfs unreadable")
    checks = {c.name: c for c in vendor_checks(vendor)}
    discovery, own = checks["vendor scripted discovery"], checks["vendor scripted checks"]
    assert not discovery.ok and "sysfs unreadable" in discovery.detail
    assert not own.ok and "NVML init hung up" in own.detail


# -- helpers vendors build their checks from, on a fake sysfs tree -------------------------------
@pytest.fixture
def sysfs(tmp_path: Path) -> Path:
    root = tmp_path / "sys"
    (root / "module" / "vfio_pci").mkdir(parents=True)
    (root / "kernel" / "iommu_groups" / "7").mkdir(parents=True)
    (root / "class" / "iommu" / "dmar0").mkdir(parents=True)
    drivers = root / "bus" / "pci" / "drivers"
    (drivers / "vfio-pci").mkdir(parents=True)
    (drivers / "ixgbe").mkdir(parents=True)
    for address, driver in (("0000:3b:00.0", "vfio-pci"), ("0000:3b:00.1", "ixgbe"), ("0000:3b:00.2", None)):
        device = root / "bus" / "pci" / "devices" / address
        device.mkdir(parents=True)
        if driver:
            os.symlink(drivers / driver, device / "driver")
    return root


def test_kernel_module_and_iommu(sysfs, tmp_path):
    assert check_kernel_module("vfio_pci", sys_root=sysfs).ok
    missing = check_kernel_module("nvidia", sys_root=sysfs)
    assert not missing.ok and missing.hint == "load it: modprobe nvidia"
    on = check_iommu(sys_root=sysfs)
    assert on.ok and "1 IOMMU groups" in on.detail and "dmar0" in on.detail
    off = check_iommu(sys_root=tmp_path / "empty")
    assert not off.ok and "intel_iommu=on" in off.hint


def test_driver_bound(sysfs):
    assert check_driver_bound("0000:3b:00.0", "vfio-pci", sys_root=sysfs).ok
    other = check_driver_bound("0000:3b:00.1", "vfio-pci", sys_root=sysfs)
    assert not other.ok and "bound to ixgbe" in other.detail and "unbind" in other.hint
    unbound = check_driver_bound("0000:3b:00.2", "vfio-pci", sys_root=sysfs)
    assert not unbound.ok and "no driver" in unbound.detail and "unbind" not in unbound.hint
    assert "lspci" in check_driver_bound("0000:ff:00.0", "vfio-pci", sys_root=sysfs).hint


def test_library_loadable():
    assert check_library_loadable("libc.so.6").ok
    missing = check_library_loadable("libnvidia-ml-not-here.so.1", hint="install the NVIDIA driver")
    assert not missing.ok and missing.hint == "install the NVIDIA driver"


def test_a_bad_metrics_address_fails_config_validation_naming_the_key(short_tmp, capsys):
    config = write_config(short_tmp / "c.yaml", metrics_address="bogus")
    code, lines, _out = doctor(config, capsys)
    assert code == 1
    assert lines["config valid"].startswith("[FAIL]")
    assert f"{config}: key 'metrics_address': expected host:port" in lines["config valid"]


# -- doctor agrees with `dpkit run` ---------------------------------------------------------------
def test_a_bad_vendor_section_fails_config_valid_itself(short_tmp, capsys):
    """`run` rejects this file, so doctor must not say `[ok] config valid` about it first."""
    config = write_config(short_tmp / "c.yaml", vendor={"scirpt": False})
    code, lines, out = doctor(config, capsys)
    assert code == 1
    assert lines["config valid"].startswith("[FAIL]"), out
    assert f"{config}: vendor: scirpt: unknown key (did you mean 'script'?)" in lines["config valid"]
    assert "[ok  ] config valid" not in out


def test_hints_name_the_configured_paths_not_the_defaults(short_tmp, capsys):
    plugins, pod_resources = short_tmp / "elsewhere" / "dp", short_tmp / "elsewhere" / "pr" / "kubelet.sock"
    config = write_config(short_tmp / "c.yaml", plugin_dir=str(plugins), pod_resources_socket=str(pod_resources),
                          state_dir=str(short_tmp / "st"), cdi_dir="", nfd_features_dir="")
    code, lines, out = doctor(config, capsys)
    assert code == 1
    assert lines["kubelet socket reachable"].startswith("[FAIL]")
    assert "/var/lib/kubelet" not in out, out
    assert f"mounted at {plugins}?" in out and f"pod-resources directory at {pod_resources.parent}" in out


def test_nothing_to_register_is_a_failed_check(kubelet, plugin_dir, short_tmp, capsys):
    devices = short_tmp / "bad.yaml"
    devices.write_text(yaml.safe_dump({"resources": {"Bad Name": [{"id": "a"}]}}))
    config = write_config(short_tmp / "c.yaml", plugin_dir=str(plugin_dir), state_dir=str(short_tmp / "st"),
                          pod_resources_socket=str(kubelet.pod_resources_socket), cdi_dir="", nfd_features_dir="")
    code = cli.main(["doctor", "sim", "-c", str(config), "--devices", str(devices)])
    out = capsys.readouterr().out
    assert code == 1
    assert "[FAIL] vendor data valid: dropped by `dpkit run`: " in out and "Bad Name" in out
    assert "[FAIL] resources to register: none: `dpkit run` would register nothing" in out
    assert "[ok  ] config valid" in out
