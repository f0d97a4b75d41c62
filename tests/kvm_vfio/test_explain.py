"""``dpkit discover kvm_vfio`` says why things are missing; ``doctor`` and node labels say what is there."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from kvm_vfio.fakehost import FakeHost

from dpkit.core.tools.discovery import explain
from dpkit.kvm_vfio.vendor import KvmVfioVendor

T4 = {"pci_vendor_selector": "10de:1eb8", "resource_name": "nvidia.com/TU104GL_Tesla_T4"}


def reasons(vendor: KvmVfioVendor) -> dict[str, str]:
    return {f["subject"]: f"{f['reason']} | fix: {f['hint']}" for f in explain(vendor)["findings"]}


def test_discover_explains_each_kind_of_miss(host: FakeHost) -> None:
    host.add_pci("0000:3b:00.0", group="7", driver="nvidia")
    host.add_pci("0000:5e:00.0", group="9")
    host.add_pci("0000:5e:00.1", device="10f8", pci_class="040300", driver="snd_hda_intel", group="9")
    host.vfio_nodes("7", "9")
    found = reasons(KvmVfioVendor(host.config(pci_host_devices=[T4, {"pci_vendor_selector": "8086:1572"}])))
    assert found[str(host.dev / "kvm")].startswith(f"all 1000 slots Unhealthy: {host.dev / 'kvm'} does not exist")
    assert "kvm_intel or kvm_amd" in found[str(host.dev / "kvm")]
    assert found["0000:3b:00.0"].startswith("listed Unhealthy: bound to nvidia, not vfio-pci")
    assert "driverctl set-override 0000:3b:00.0 vfio-pci" in found["0000:3b:00.0"]
    assert "IOMMU group 9 is not viable: 0000:5e:00.1 (snd_hda_intel)" in found["0000:5e:00.0"]
    assert found["selector 8086:1572"].startswith("no PCI function matches")


def test_discover_explains_a_disabled_iommu(host: FakeHost) -> None:
    host.add_node("kvm")
    host.add_pci("0000:3b:00.0", group=None)
    host.vfio_nodes()
    found = reasons(KvmVfioVendor(host.config(pci_host_devices=[T4])))
    assert found["IOMMU"].startswith(f"no groups in {host.sys}/kernel/iommu_groups: the IOMMU is disabled")
    assert "intel_iommu=on" in found["IOMMU"]
    assert "has no IOMMU group" in found["0000:3b:00.0"]


def test_discover_explains_an_inaccessible_kvm(short_tmp: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to drop to another user")
    short_tmp.chmod(0o755)
    host = FakeHost(short_tmp / "sys", short_tmp / "dev")
    host.dev.chmod(0o755)
    host.add_node("kvm").chmod(0o600)  # root's, like a node outside the kvm group
    vendor = KvmVfioVendor(host.config())
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child only drops privileges, explains and reports
        try:
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            os.write(write, reasons(vendor)[str(host.dev / "kvm")].encode())
        finally:
            os._exit(0)
    os.close(write)
    os.waitpid(pid, 0)
    with os.fdopen(read) as pipe:
        reason = pipe.read()
    assert reason.startswith(f"all 1000 slots Unhealthy: {host.dev / 'kvm'} is not accessible: Permission denied")
    assert "run the plugin privileged" in reason


def test_dpkit_discover_command_runs_the_vendor(host: FakeHost, tmp_path: Path) -> None:
    host.add_node("kvm")
    host.add_pci("0000:3b:00.0", group="7", numa=1)
    host.vfio_nodes("7")
    config = tmp_path / "dpkit.yaml"
    config.write_text(yaml.safe_dump({"vendor": host.config(kvm_slots=2, pci_host_devices=[T4])}))
    command = [sys.executable, "-m", "dpkit.core.tools.cli", "discover", "kvm_vfio", "--json", "-c", str(config)]
    done = subprocess.run(command,
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert {r["name"]: r["healthy"] for r in report["resources"]} == {
        "devices.kubevirt.io/kvm": 2, "nvidia.com/TU104GL_Tesla_T4": 1}


@pytest.mark.parametrize(("vendor", "where"), [
    ({"kvm_slots": "lots"}, "vendor: kvm_slots: expected a whole number"),
    ({"permittedHostDevices": {"pciHostDevices": [{"pciVendorSelector": "10de:1eb8"}]}},
     "vendor: permittedHostDevices.pciHostDevices[0].resourceName: required"),
])
def test_bad_config_is_a_clear_cli_error(tmp_path: Path, vendor: dict[str, object], where: str) -> None:
    config = tmp_path / "dpkit.yaml"
    config.write_text(yaml.safe_dump({"vendor": vendor}))
    done = subprocess.run([sys.executable, "-m", "dpkit.core.tools.cli", "discover", "kvm_vfio", "-c", str(config)],
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert f"{config}: {where}" in done.stderr  # the core names the file, the vendor the key path


def test_doctor_checks(host: FakeHost) -> None:
    host.add_node("kvm")
    checks = {c.name: c for c in KvmVfioVendor(host.config(pci_host_devices=[T4])).doctor()}
    assert checks["/dev/kvm usable"].ok
    assert not checks["IOMMU enabled"].ok and "intel_iommu=on" in checks["IOMMU enabled"].hint
    assert not checks["vfio-pci driver loaded"].ok and not checks["/dev/vfio/vfio present"].ok
    host.add_pci("0000:3b:00.0", group="7")
    host.vfio_nodes("7")
    checks = {c.name: c for c in KvmVfioVendor(host.config(pci_host_devices=[T4])).doctor()}
    assert all(checks[n].ok for n in ("IOMMU enabled", "vfio-pci driver loaded", "/dev/vfio/vfio present"))
    assert "uevent monitor" in checks


def test_node_labels(host: FakeHost) -> None:
    host.add_node("kvm")
    host.add_pci("0000:3b:00.0", group="7")
    host.vfio_nodes("7")
    vendor = KvmVfioVendor(host.config(kvm_slots=1, pci_host_devices=[T4]))
    assert vendor.node_labels(vendor.discover()) == {
        "dpkit.io/kvm": "true", "dpkit.io/iommu": "true", "dpkit.io/vfio-devices": "1"}
