"""Mediated and USB devices from ``permittedHostDevices`` over fake sysfs and /dev trees, and behind a
real Manager and the kubelet emulator over real gRPC."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import pytest
from kvm_vfio.fakehost import FakeHost

from dpkit.core.engine.manager import Manager
from dpkit.core.tools.kubelet import Kubelet
from dpkit.core.vendorapi.errors import VendorError
from dpkit.kvm_vfio.usb import unit_id
from dpkit.kvm_vfio.vendor import KvmVfioVendor

VGPU = "nvidia.com/GRID_T4-1Q"
GVT = "intel.com/i915-GVTg_V5_4"
STORAGE = "kubevirt.io/storage"
PERIPHERALS = "kubevirt.io/peripherals"
U1, U2, U3 = ("4b20d080-1b54-4048-85b3-a6a62d165c01", "4b20d080-1b54-4048-85b3-a6a62d165c02",
              "4b20d080-1b54-4048-85b3-a6a62d165c03")


def permitted(**block: Any) -> dict[str, Any]:
    return {"permittedHostDevices": block}


def vendor(host: FakeHost, **config: Any) -> KvmVfioVendor:
    return KvmVfioVendor(host.config(**{"kvm_slots": 0, "vhost_net_slots": 0, "tun_slots": 0, **config}))


def mdev_host(host: FakeHost) -> None:
    host.add_pci("0000:3b:00.0", driver="nvidia", group="7", numa=1)
    host.add_pci("0000:00:02.0", vendor="8086", device="3e92", pci_class="030000", driver="i915", group="1", numa=0)
    host.add_mdev(U1, "0000:3b:00.0", group="20")
    host.add_mdev(U2, "0000:3b:00.0", group="21")
    host.add_mdev(U3, "0000:00:02.0", type_id="i915-GVTg_V5_4", name=None, group="22")  # GVT-g: no name file
    host.vfio_nodes("20", "21", "22")


MDEVS = permitted(mediatedDevices=[
    {"mdevNameSelector": "GRID T4-1Q", "resourceName": VGPU, "externalResourceProvider": True},
    {"mdevNameSelector": "i915-GVTg_V5_4", "resourceName": GVT, "externalResourceProvider": True},
])


# -- mediated devices --------------------------------------------------------------------------
def test_mdevs_are_reported_as_kubevirt_reports_them(host: FakeHost) -> None:
    mdev_host(host)
    snapshot = vendor(host, **MDEVS).discover()
    assert [d.id for d in snapshot[VGPU]] == ["20", "21"]  # KubeVirt's IDs: the mdev's IOMMU group
    first = snapshot[VGPU][0]
    assert first.healthy and first.numa_nodes == (1,)  # the parent GPU's NUMA node
    assert dict(first.spec.env) == {"MDEV_PCI_RESOURCE_NVIDIA_COM_GRID_T4-1Q": U1}
    assert [(n.host_path, n.container_path, n.permissions) for n in first.spec.devices] == [
        (str(host.dev / "vfio/vfio"), "/dev/vfio/vfio", "mrw"), (str(host.dev / "vfio/20"), "/dev/vfio/20", "mrw")]
    assert first.attributes["mdev_uuid"] == U1 and first.attributes["parent"] == "0000:3b:00.0"
    assert first.attributes["mdev_type"] == "nvidia-222"
    (gvt,) = snapshot[GVT]  # matched by the type id, as KubeVirt does when there is no name file
    assert gvt.id == "22" and gvt.numa_nodes == (0,) and dict(gvt.spec.env) == {
        "MDEV_PCI_RESOURCE_INTEL_COM_I915-GVTG_V5_4": U3}


def test_mdev_allocation_joins_uuids_as_kubevirt_does(host: FakeHost) -> None:
    mdev_host(host)
    v = vendor(host, **MDEVS)
    spec = v.container_spec(VGPU, v.discover()[VGPU])
    assert dict(spec.env) == {"MDEV_PCI_RESOURCE_NVIDIA_COM_GRID_T4-1Q": f"{U1},{U2}"}
    assert [n.container_path for n in spec.devices] == ["/dev/vfio/vfio", "/dev/vfio/20", "/dev/vfio/21"]


def test_mdev_without_group_node_is_unhealthy_and_without_group_is_explained(host: FakeHost) -> None:
    mdev_host(host)
    host.remove_node("vfio/21")
    host.add_mdev("4b20d080-1b54-4048-85b3-a6a62d165c04", "0000:3b:00.0", group=None)
    v = vendor(host, **MDEVS)
    devices = {d.id: d for d in v.discover()[VGPU]}
    assert set(devices) == {"20", "21"} and devices["20"].healthy
    assert devices["21"].reason == f"{host.dev / 'vfio/21'} does not exist"
    reasons = {f.subject: f.reason for f in v.explain()}
    assert "no IOMMU group" in reasons["4b20d080-1b54-4048-85b3-a6a62d165c04"]


def test_mdev_with_out_of_range_parent_numa_is_marked_not_fatal(host: FakeHost) -> None:
    mdev_host(host)
    host.write("devices/pci0000:00/0000:00:02.0/numa_node", "2000\n")
    snapshot = vendor(host, **MDEVS).discover()
    assert all(d.healthy for d in snapshot[VGPU])
    (gvt,) = snapshot[GVT]
    assert not gvt.healthy and "NUMA node 2000" in gvt.reason


def test_missing_mdev_type_is_explained(host: FakeHost) -> None:
    mdev_host(host)
    entry = {"mdevNameSelector": "GRID T4-16Q", "resourceName": "nvidia.com/GRID_T4-16Q",
             "externalResourceProvider": True}
    v = vendor(host, **permitted(mediatedDevices=[entry]))
    assert v.discover()["nvidia.com/GRID_T4-16Q"] == ()  # registered, advertising zero
    assert any(f.subject == "mdev type GRID_T4-16Q" and "no mediated device" in f.reason for f in v.explain())


# -- USB -------------------------------------------------------------------------------------------
USBS = permitted(usb=[
    {"resourceName": STORAGE, "selectors": [{"vendor": "46f4", "product": "0001"}], "externalResourceProvider": True},
    {"resourceName": PERIPHERALS, "externalResourceProvider": True, "selectors": [
        {"vendor": "045e", "product": "07a5"}, {"vendor": "062a", "product": "4102"}]},
])


def usb_host(host: FakeHost) -> None:
    host.add_usb("1-1", "46f4", "0001", bus=1, devnum=2)
    host.add_usb("1-2", "46f4", "0001", bus=1, devnum=5)
    host.add_usb("1-3", "045e", "07a5", bus=1, devnum=7)
    host.add_usb("2-1", "062a", "4102", bus=2, devnum=3)
    host.add_usb("2-2", "045e", "07a5", bus=2, devnum=4)  # no partner left: not a unit


def test_usb_units_env_and_nodes_as_kubevirt_forms_them(host: FakeHost) -> None:
    usb_host(host)
    snapshot = vendor(host, **USBS).discover()
    assert [d.id for d in snapshot[STORAGE]] == ["usb-1-1", "usb-1-2"]
    first = snapshot[STORAGE][0]
    assert first.healthy and first.numa_nodes == ()  # KubeVirt reports no topology for USB
    assert dict(first.spec.env) == {"USB_RESOURCE_KUBEVIRT_IO_STORAGE": "1:2"}
    assert [(n.host_path, n.container_path, n.permissions) for n in first.spec.devices] == [
        (str(host.dev / "bus/usb/001/002"), "/dev/bus/usb/001/002", "mrw")]
    (unit,) = snapshot[PERIPHERALS]  # one device per selector makes one unit
    assert unit.id == "usb-1-3_2-1"
    assert dict(unit.spec.env) == {"USB_RESOURCE_KUBEVIRT_IO_PERIPHERALS": "1:7,2:3"}
    assert [n.container_path for n in unit.spec.devices] == ["/dev/bus/usb/001/007", "/dev/bus/usb/002/003"]


def test_usb_unit_with_missing_node_is_unhealthy_and_long_ids_stay_valid(host: FakeHost) -> None:
    host.add_usb("1-1", "46f4", "0001", bus=1, devnum=2, node=False)
    (device,) = vendor(host, **USBS).discover()[STORAGE]
    assert not device.healthy and device.reason == f"{host.dev / 'bus/usb/001/002'} does not exist"
    from dpkit.kvm_vfio.usb import UsbDevice

    many = [UsbDevice(f"1-1.{i}.{i}.{i}", "46f4", "0001", 1, i, f"bus/usb/001/{i:03d}") for i in range(1, 9)]
    assert len(unit_id(many)) <= 63 and unit_id(many) == unit_id(list(many))


def test_usb_uevent_garbage_is_skipped_and_explained(host: FakeHost) -> None:
    usb_host(host)
    (host.sys / "bus/usb/devices/1-2").resolve().joinpath("uevent").write_text("PRODUCT=zz\n")
    v = vendor(host, **USBS)
    assert [d.id for d in v.discover()[STORAGE]] == ["usb-1-1"]
    assert any("ignoring USB device 1-2" in f.reason for f in v.explain())


# -- behind the Manager ------------------------------------------------------------------------
Run = Callable[..., Manager]


def test_mdev_hotplug_reaches_the_kubelet(kubelet: Kubelet, run_manager: Run, host: FakeHost) -> None:
    mdev_host(host)
    run_manager(vendor(host, health_interval=0.05, **MDEVS))
    assert kubelet.wait_for(lambda k: k.allocatable(VGPU) == 2 and k.allocatable(GVT) == 1, 10)
    assert {i: s.numa for i, s in kubelet.devices(VGPU).items()} == {"20": (1,), "21": (1,)}
    host.add_mdev("4b20d080-1b54-4048-85b3-a6a62d165c05", "0000:3b:00.0", group="23")
    host.vfio_nodes("23")
    assert kubelet.wait_for(lambda k: k.allocatable(VGPU) == 3, 10)
    ids, response = kubelet.allocate(VGPU, 1)
    uuid = {"20": U1, "21": U2, "23": "4b20d080-1b54-4048-85b3-a6a62d165c05"}[ids[0]]
    assert response.envs["MDEV_PCI_RESOURCE_NVIDIA_COM_GRID_T4-1Q"] == uuid
    host.remove_mdev(U1)
    assert kubelet.wait_for(lambda k: k.capacity(VGPU) == 2 and "20" not in k.devices(VGPU), 10)


@pytest.mark.skipif(os.geteuid() != 0, reason="handing a node to another user needs root")
def test_usb_allocation_hands_the_node_to_qemu(kubelet: Kubelet, run_manager: Run, host: FakeHost) -> None:
    usb_host(host)
    run_manager(vendor(host, health_interval=60, **USBS))
    assert kubelet.wait_for(lambda k: k.allocatable(STORAGE) == 2 and k.allocatable(PERIPHERALS) == 1, 10)
    ids, response = kubelet.allocate(PERIPHERALS, 1)
    assert ids == ["usb-1-3_2-1"]
    assert response.envs["USB_RESOURCE_KUBEVIRT_IO_PERIPHERALS"] == "1:7,2:3"
    for node in ("bus/usb/001/007", "bus/usb/002/003"):  # PreStartContainer chowned them, as KubeVirt does
        st = os.stat(host.dev / node)
        assert (st.st_uid, st.st_gid) == (107, 107)
    assert os.stat(host.dev / "bus/usb/001/002").st_uid == 0  # not allocated: left alone


def test_usb_owner_null_leaves_nodes_alone(kubelet: Kubelet, run_manager: Run, host: FakeHost) -> None:
    usb_host(host)
    before = os.stat(host.dev / "bus/usb/001/007").st_uid
    run_manager(vendor(host, health_interval=60, usb_owner=None, **USBS))
    assert kubelet.wait_for(lambda k: k.allocatable(PERIPHERALS) == 1, 10)
    kubelet.allocate(PERIPHERALS, 1)
    assert os.stat(host.dev / "bus/usb/001/007").st_uid == before


def test_usb_node_that_cannot_be_handed_over_fails_prestart_with_the_fix(host: FakeHost) -> None:
    usb_host(host)
    v = vendor(host, usb_owner=107, **USBS)
    (unit,) = v.discover()[PERIPHERALS]
    host.remove_node("bus/usb/001/007")  # gone (or a read-only /dev): chown fails
    with pytest.raises(VendorError, match="usb_owner: null"):
        v.pre_start(PERIPHERALS, [unit])
    v.pre_start(STORAGE.replace("storage", "other"), [unit])  # not a USB resource: nothing to do


def test_labels_count_vfio_devices_not_usb_ones(host: FakeHost) -> None:
    mdev_host(host)
    usb_host(host)
    v = vendor(host, permittedHostDevices={**MDEVS["permittedHostDevices"], **USBS["permittedHostDevices"]})
    labels = v.node_labels(v.discover())
    assert labels["dpkit.io/vfio-devices"] == "3"  # two vGPU mdevs and one GVT-g mdev; USB units are not VFIO
    assert {c.name for c in v.doctor()} >= {"IOMMU enabled", "/dev/vfio/vfio present"}
