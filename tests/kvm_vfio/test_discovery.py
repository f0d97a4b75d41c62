"""Discovery over fake sysfs and /dev trees: what is advertised, how healthy, with which spec."""

from __future__ import annotations

from pathlib import Path

import pytest
from kvm_vfio.fakehost import FakeHost

from dpkit.core.vendorapi.device import Device
from dpkit.core.vendorapi.errors import ValidationError
from dpkit.kvm_vfio import vfio
from dpkit.kvm_vfio.names import default_resource_name, pci_resource_env
from dpkit.kvm_vfio.vendor import KvmVfioVendor

KVM, VHOST, TUN = (f"devices.kubevirt.io/{n}" for n in ("kvm", "vhost-net", "tun"))
GPU = "nvidia.com/TU104GL_Tesla_T4"
T4 = {"pci_vendor_selector": "10DE:1EB8", "resource_name": GPU}


def vendor(host: FakeHost, **config: object) -> KvmVfioVendor:
    return KvmVfioVendor(host.config(**{"kvm_slots": 3, "vhost_net_slots": 2, "tun_slots": 2, **config}))


def by_id(devices: tuple[Device, ...]) -> dict[str, Device]:
    return {d.id: d for d in devices}


# -- shared nodes ------------------------------------------------------------------------------
def test_shared_nodes_are_slots_with_kubevirt_names_and_permissions(host: FakeHost) -> None:
    for node in ("kvm", "vhost-net", "net/tun"):
        host.add_node(node)
    snapshot = vendor(host).discover()
    assert [d.id for d in snapshot[KVM]] == ["kvm0", "kvm1", "kvm2"]
    assert [d.id for d in snapshot[VHOST]] == ["vhost-net0", "vhost-net1"]
    assert all(d.healthy for r in (KVM, VHOST, TUN) for d in snapshot[r])
    (kvm_node,) = snapshot[KVM][0].spec.devices
    assert (kvm_node.host_path, kvm_node.container_path, kvm_node.permissions) == (
        str(host.dev / "kvm"), "/dev/kvm", "rw")
    assert snapshot[VHOST][0].spec.devices[0].permissions == "rw"
    (tun_node,) = snapshot[TUN][0].spec.devices
    assert (tun_node.container_path, tun_node.permissions) == ("/dev/net/tun", "rwm")


def test_zero_slots_turns_a_resource_off(host: FakeHost) -> None:
    host.add_node("kvm")
    host.add_node("net/tun")
    assert set(vendor(host, tun_slots=0).discover()) == {KVM}


def test_missing_kvm_is_advertised_unhealthy_and_recovers(host: FakeHost) -> None:
    v = vendor(host)
    snapshot = v.discover()
    assert VHOST not in snapshot and TUN not in snapshot  # only advertised once present
    assert [d.healthy for d in snapshot[KVM]] == [False] * 3
    assert "kvm does not exist" in snapshot[KVM][0].reason
    host.add_node("kvm")
    assert all(d.healthy for d in v.discover()[KVM])


def test_vanished_node_keeps_its_resource_with_every_slot_unhealthy(host: FakeHost) -> None:
    host.add_node("kvm")
    host.add_node("vhost-net")
    v = vendor(host)
    assert all(d.healthy for d in v.discover()[VHOST])
    host.remove_node("vhost-net")
    slots = v.discover()[VHOST]
    assert len(slots) == 2 and not any(d.healthy for d in slots)
    host.add_node("vhost-net")
    assert all(d.healthy for d in v.discover()[VHOST])


def test_unopenable_kvm_marks_every_slot_unhealthy(host: FakeHost) -> None:
    try:
        host.add_dead_node("kvm")
    except PermissionError:
        pytest.skip("creating a device node needs CAP_MKNOD")
    slots = vendor(host).discover()[KVM]
    assert not any(d.healthy for d in slots)
    assert "cannot be opened" in slots[0].reason


# -- VFIO ------------------------------------------------------------------------------------
def test_vfio_device_spec_env_and_topology(host: FakeHost) -> None:
    host.add_pci("0000:3b:00.0", group="7", numa=1)
    host.vfio_nodes("7")
    (device,) = vendor(host, pci_host_devices=[T4]).discover()[GPU]
    assert device.id == "0000:3b:00.0" and device.healthy and device.numa_nodes == (1,)
    assert [(n.host_path, n.container_path, n.permissions) for n in device.spec.devices] == [
        (str(host.dev / "vfio/vfio"), "/dev/vfio/vfio", "mrw"),
        (str(host.dev / "vfio/7"), "/dev/vfio/7", "mrw"),
    ]
    assert dict(device.spec.env) == {"PCI_RESOURCE_NVIDIA_COM_TU104GL_TESLA_T4": "0000:3b:00.0"}
    assert device.attributes["iommu_group"] == "7" and device.attributes["driver"] == "vfio-pci"


def test_iommufd_nodes_are_added_when_the_kernel_offers_them(host: FakeHost) -> None:
    host.add_pci("0000:3b:00.0", group="7", vfio_cdev="vfio3")
    host.vfio_nodes("7")
    host.add_node("iommu")
    host.add_node("vfio/devices/vfio3")
    (device,) = vendor(host, pci_host_devices=[T4]).discover()[GPU]
    assert [n.container_path for n in device.spec.devices] == [
        "/dev/vfio/vfio", "/dev/vfio/7", "/dev/iommu", "/dev/vfio/devices/vfio3"]


def test_no_numa_node_means_no_topology(host: FakeHost) -> None:
    host.add_pci("0000:3b:00.0", group="7", numa=-1)
    host.vfio_nodes("7")
    assert vendor(host, pci_host_devices=[T4]).discover()[GPU][0].numa_nodes == ()


@pytest.mark.parametrize(("driver", "reason"), [
    ("nvidia", "bound to nvidia, not vfio-pci"),
    ("", "not bound to any driver, not vfio-pci"),
])
def test_only_vfio_pci_bound_devices_are_healthy(host: FakeHost, driver: str, reason: str) -> None:
    host.add_pci("0000:3b:00.0", group="7", driver=driver)
    host.vfio_nodes("7")
    (device,) = vendor(host, pci_host_devices=[T4]).discover()[GPU]
    assert not device.healthy and device.reason == reason


def test_group_with_a_device_on_another_driver_is_not_viable(host: FakeHost) -> None:
    host.add_pci("0000:3b:00.0", group="7")
    host.add_pci("0000:3b:00.1", device="10f8", pci_class="040300", driver="snd_hda_intel", group="7")
    host.add_pci("0000:3b:00.2", device="1ad8", pci_class="0c0330", driver="", group="7")  # unbound: fine
    host.add_pci("0000:3b:00.3", device="1ad9", pci_class="0c8000", driver="pci-stub", group="7")  # fine
    host.add_pci("0000:00:01.0", vendor="8086", device="1901", pci_class="060400", driver="pcieport", group="7")
    host.add_pci("0000:3b:00.4", device="1ada", driver="mlx5_vfio_pci", group="7")  # a VFIO variant driver
    host.vfio_nodes("7")
    (device,) = vendor(host, pci_host_devices=[T4]).discover()[GPU]
    assert not device.healthy
    assert device.reason == ("IOMMU group 7 is not viable: 0000:3b:00.1 (snd_hda_intel) is not bound to vfio-pci")
    host.set_driver("0000:3b:00.1", "vfio-pci")
    assert vendor(host, pci_host_devices=[T4]).discover()[GPU][0].healthy


def test_group_split_between_resources_is_unhealthy(host: FakeHost) -> None:
    host.add_pci("0000:3b:00.0", group="7")
    host.add_pci("0000:3b:00.1", device="10f8", pci_class="040300", group="7")
    host.vfio_nodes("7")
    snapshot = vendor(host, pci_host_devices=[
        T4, {"pci_vendor_selector": "10de:10f8", "resource_name": "nvidia.com/audio"}]).discover()
    for resource in (GPU, "nvidia.com/audio"):
        (device,) = snapshot[resource]
        assert not device.healthy and "split between resources" in device.reason


def test_missing_group_node_or_iommu_makes_devices_unhealthy(host: FakeHost) -> None:
    host.add_pci("0000:3b:00.0", group="7")
    host.add_pci("0000:5e:00.0", group=None)  # no IOMMU group: IOMMU off for it
    host.add_node("vfio/vfio")
    devices = by_id(vendor(host, pci_host_devices=[T4]).discover()[GPU])
    assert devices["0000:3b:00.0"].reason == f"{host.dev / 'vfio/7'} does not exist"
    assert "no IOMMU group" in devices["0000:5e:00.0"].reason
    assert devices["0000:5e:00.0"].spec.devices == ()


def test_selectors_filter_by_class_and_address_and_first_match_wins(host: FakeHost) -> None:
    host.add_pci("0000:3b:00.0", group="7")
    host.add_pci("0000:5e:00.0", group="9")
    host.add_pci("0000:86:00.0", pci_class="030000", group="11")
    host.vfio_nodes("7", "9", "11")
    snapshot = vendor(host, pci_host_devices=[
        {"pci_vendor_selector": "10de:1eb8", "addresses": ["0000:5e:00.0"], "resource_name": "example.com/pinned"},
        {"pci_vendor_selector": "10de:1eb8", "class": "0302", "resource_name": "example.com/3d"},
        {"pci_vendor_selector": "8086:0001", "resource_name": "example.com/none"},
    ]).discover()
    assert [d.id for d in snapshot["example.com/pinned"]] == ["0000:5e:00.0"]
    assert [d.id for d in snapshot["example.com/3d"]] == ["0000:3b:00.0"]  # 86:00.0 is class 0300
    assert snapshot["example.com/none"] == ()  # registered, advertising zero


def test_default_resource_name_comes_from_the_database_name(host: FakeHost, tmp_path: Path) -> None:
    """The name udev's hwdb gives (test_umockdev feeds it through a udev database); hex IDs without one."""
    assert default_resource_name("10de", "1eb8", "TU104GL [Tesla T4]") == "nvidia.com/TU104GL_Tesla_T4"
    assert default_resource_name("1af4", "1000", "Virtio network device") == "devices.kubevirt.io/Virtio_network_device"
    assert default_resource_name("10de", "abcd") == "nvidia.com/10DE_ABCD"
    assert default_resource_name("10de", "1eb8", "") == "nvidia.com/10DE_1EB8"
    host.add_pci("0000:3b:00.0", group="7")
    host.vfio_nodes("7")
    ids = tmp_path / "pci.ids"  # still accepted (nothing accepted before is refused), no longer read
    ids.write_text("10de  NVIDIA Corporation\n\t1eb8  TU104GL [Tesla T4]\n")
    made = vendor(host, pci_ids=str(ids), pci_host_devices=[{"pci_vendor_selector": "10de:1eb8"}])
    snapshot = made.discover()
    # a tree outside libudev's /sys has no udev names: the hex IDs stand in
    assert [d.id for d in snapshot["nvidia.com/10DE_1EB8"]] == ["0000:3b:00.0"]
    assert "name" not in snapshot["nvidia.com/10DE_1EB8"][0].attributes
    notes = [f for f in made.explain() if f.subject == "vendor.pci_ids"]
    assert len(notes) == 1 and "udev" in notes[0].reason and "resource_name" in notes[0].hint


def test_env_name_follows_kubevirt() -> None:
    assert pci_resource_env("nvidia.com/TU104GL_Tesla_T4") == "PCI_RESOURCE_NVIDIA_COM_TU104GL_TESLA_T4"
    # KubeVirt replaces only "/" and "."; virt-launcher reads PCI_RESOURCE_INTEL_COM_QAT-VF
    assert pci_resource_env("intel.com/qat-vf") == "PCI_RESOURCE_INTEL_COM_QAT-VF"


# -- bad input ---------------------------------------------------------------------------------
def test_garbage_in_sysfs_is_skipped_and_explained(host: FakeHost) -> None:
    host.add_pci("0000:3b:00.0", group="7")
    host.add_pci("0000:5e:00.0", group="9")
    host.write("devices/pci0000:00/0000:5e:00.0/vendor", "\x00\xffgarbage")
    host.add_pci("0000:86:00.0", group="11")
    host.write("devices/pci0000:00/0000:86:00.0/numa_node", "lots")
    host.add_pci("0000:af:00.0", group="13")
    (host.device_dir("0000:af:00.0") / "iommu_group").unlink()
    (host.device_dir("0000:af:00.0") / "iommu_group").symlink_to("../../../kernel/iommu_groups/x;rm")
    (host.sys / "bus/pci/devices/not-an-address").mkdir()
    (host.sys / "bus/pci/devices/0000:d8:00.0").symlink_to("../../../devices/pci0000:00/vanished")
    host.vfio_nodes("7", "9", "11", "13")
    v = vendor(host, pci_host_devices=[T4])
    devices = by_id(v.discover()[GPU])
    assert set(devices) == {"0000:3b:00.0", "0000:86:00.0", "0000:af:00.0"}
    assert devices["0000:86:00.0"].numa_nodes == () and devices["0000:86:00.0"].healthy
    assert "no IOMMU group" in devices["0000:af:00.0"].reason
    reasons = " | ".join(f.reason for f in v.explain())
    assert "ignoring PCI function 0000:5e:00.0: vendor is" in reasons
    assert "'not-an-address'" in reasons and "0000:d8:00.0" not in reasons  # vanished: silently gone


def test_invalid_spec_becomes_an_unhealthy_device(host: FakeHost, monkeypatch: pytest.MonkeyPatch) -> None:
    host.add_pci("0000:3b:00.0", group="7")
    host.vfio_nodes("7")

    def broken(*args: object) -> None:
        raise ValidationError("host path 'x' must be an absolute path")

    monkeypatch.setattr(vfio, "container_spec", broken)
    (device,) = vendor(host, pci_host_devices=[T4]).discover()[GPU]
    assert not device.healthy and device.reason.startswith("invalid device data: host path")


def test_unhealthy_reasons_are_logged_once(host: FakeHost, caplog: pytest.LogCaptureFixture) -> None:
    host.add_pci("0000:3b:00.0", group="7", driver="nvidia")
    host.vfio_nodes("7")
    v = vendor(host, pci_host_devices=[T4])
    with caplog.at_level("WARNING", logger="dpkit"):
        v.discover()
        v.discover()
    lines = [r for r in caplog.records if r.getMessage() == "device unhealthy"]
    assert [r.fields["device"] for r in lines] == ["kvm0", "0000:3b:00.0"]  # type: ignore[attr-defined]
