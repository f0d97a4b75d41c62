"""KubeVirt's ``permittedHostDevices`` block, fed as operators write it, accepted or refused as KubeVirt does.

The documents below were written for this project from the upstream reference, not copied:
- KubeVirt API types, ``staging/src/kubevirt.io/api/core/v1/types.go`` (kubevirt/kubevirt):
  ``PermittedHostDevices{pciHostDevices, mediatedDevices, usb}``, ``PciHostDevice{pciVendorSelector,
  resourceName, externalResourceProvider}``, ``MediatedHostDevice{mdevNameSelector, resourceName,
  externalResourceProvider}``, ``USBHostDevice{resourceName, selectors, externalResourceProvider}``,
  ``USBSelector{vendor, product}``; fields without ``omitempty`` are required by the CRD schema.
- virt-handler's device manager, ``pkg/virt-handler/device-manager/{device_controller,pci_device,
  mediated_device,usb_device}.go``: entries with ``externalResourceProvider: true`` are skipped by
  virt-handler, PCI selectors are lower-cased and kept in a map (a later equal selector wins), mdev
  selectors have spaces turned into ``_``, USB IDs are parsed as hex, device IDs are IOMMU groups.
- KubeVirt user guide, "Host Devices Assignment" (``docs/compute/host-devices.md``): the T4 / QAT /
  GRID T4-1Q example and the USB ``kubevirt.io/storage`` and multi-selector examples.
"""

from __future__ import annotations

import re
from typing import Any

import pytest
import yaml
from kvm_vfio.fakehost import FakeHost

from dpkit.core.vendorapi.errors import ConfigError
from dpkit.kvm_vfio.config import parse_config
from dpkit.kvm_vfio.kubevirt import KUBEVIRT_SERVES
from dpkit.kvm_vfio.vendor import KvmVfioVendor

T4 = "nvidia.com/TU104GL_Tesla_T4"
USER_GUIDE = """
permittedHostDevices:
  pciHostDevices:
  - pciVendorSelector: "10DE:1EB8"
    resourceName: "nvidia.com/TU104GL_Tesla_T4"
    externalResourceProvider: true
  - pciVendorSelector: "8086:6F54"
    resourceName: "intel.com/qat"
  mediatedDevices:
  - mdevNameSelector: "GRID T4-1Q"
    resourceName: "nvidia.com/GRID_T4-1Q"
"""
ALL_EXTERNAL = """
permittedHostDevices:
  pciHostDevices:
  - {pciVendorSelector: "10de:1eb8", resourceName: nvidia.com/TU104GL_Tesla_T4, externalResourceProvider: true}
  mediatedDevices:
  - {mdevNameSelector: "GRID T4-1Q", resourceName: nvidia.com/GRID_T4-1Q, externalResourceProvider: true}
  usb:
  - resourceName: kubevirt.io/storage
    externalResourceProvider: true
    selectors:
    - {vendor: "46f4", product: "0001"}
  - resourceName: kubevirt.io/peripherals
    externalResourceProvider: true
    selectors:
    - {vendor: "045e", product: "07a5"}
    - {vendor: "062a", product: "4102"}
    - {vendor: "072f", product: "b100"}
"""


def load(document: str) -> dict[str, Any]:
    raw = yaml.safe_load(document)
    assert isinstance(raw, dict)
    return raw


# -- accepted ------------------------------------------------------------------------------------
@pytest.mark.parametrize(("document", "pci", "mdevs", "usbs", "notes"), [
    # user guide: dpkit serves only the entry handed to an external provider
    (USER_GUIDE, [("10de", "1eb8", T4)], [], [], ["pciHostDevices[1]", "mediatedDevices[0]"]),
    (ALL_EXTERNAL, [("10de", "1eb8", T4)], [("GRID_T4-1Q", "nvidia.com/GRID_T4-1Q")],
     [("kubevirt.io/storage", (("46f4", "0001"),)),
      ("kubevirt.io/peripherals", (("045e", "07a5"), ("062a", "4102"), ("072f", "b100")))], []),
    ("permittedHostDevices: {}", [], [], [], []),
    ("permittedHostDevices: null", [], [], [], []),
    ("permittedHostDevices: {pciHostDevices: [], mediatedDevices: null, usb: []}", [], [], [], []),
    # explicit false and null are KubeVirt's default: virt-handler serves them; any name is its business
    ("permittedHostDevices: {pciHostDevices: [{pciVendorSelector: '10de:1eb8', resourceName: gpu, "
     "externalResourceProvider: false}], usb: [{resourceName: x, externalResourceProvider: null}]}",
     [], [], [], ["pciHostDevices[0]", "usb[0]"]),
    # the same selector twice: KubeVirt keeps them in a map, the later entry wins
    ("permittedHostDevices: {pciHostDevices: ["
     "{pciVendorSelector: '10DE:1EB8', resourceName: example.com/first, externalResourceProvider: true},"
     "{pciVendorSelector: '10de:1eb8', resourceName: example.com/second, externalResourceProvider: true}]}",
     [("10de", "1eb8", "example.com/second")], [], [], ["pciHostDevices[0]"]),
    # selectors KubeVirt accepts but can never match: accepted, explained
    ("permittedHostDevices: {pciHostDevices: [{pciVendorSelector: '0x10de:0x1eb8', resourceName: example.com/a, "
     "externalResourceProvider: true}]}", [], [], [], ["pciHostDevices[0]"]),
    ("permittedHostDevices: {usb: [{resourceName: example.com/u, externalResourceProvider: true, "
     "selectors: [{vendor: xyz, product: '1'}]}]}", [], [], [("example.com/u", ())], ["usb[0]"]),
    # mdev names: spaces as "_", surrounding whitespace trimmed
    ("permittedHostDevices: {mediatedDevices: [{mdevNameSelector: 'NVIDIA A10-4Q ', resourceName: nvidia.com/A10-4Q, "
     "externalResourceProvider: true}]}", [], [("NVIDIA_A10-4Q_", "nvidia.com/A10-4Q")], [], []),
    # USB IDs as Go's ParseInt reads hex: short forms and upper case
    ("permittedHostDevices: {usb: [{resourceName: example.com/u, externalResourceProvider: true, "
     "selectors: [{vendor: '46F4', product: '1'}]}]}", [], [], [("example.com/u", (("46f4", "0001"),))], []),
])
def test_upstream_documents_are_accepted(
    document: str, pci: list[tuple[str, str, str]], mdevs: list[tuple[str, str]],
    usbs: list[tuple[str, tuple[tuple[str, str], ...]]], notes: list[str],
) -> None:
    config = parse_config(load(document))
    assert [(s.vendor, s.device, s.resource_name) for s in config.selectors] == pci
    assert all(s.kubevirt for s in config.selectors)
    assert [(m.type_name, m.resource_name) for m in config.mdevs] == mdevs
    assert [(u.resource_name, u.ids) for u in config.usbs] == usbs
    assert [n.where.removeprefix("vendor.permittedHostDevices.") for n in config.notes] == notes


def test_dpkit_and_kubevirt_formats_side_by_side() -> None:
    config = parse_config(load(USER_GUIDE) | {"pci_host_devices": [
        {"pci_vendor_selector": "8086:154c", "resource_name": "intel.com/xl710_vf"}]})
    assert [(s.resource_name, s.kubevirt) for s in config.selectors] == [("intel.com/xl710_vf", False), (T4, True)]


def test_entries_kubevirt_serves_are_explained_not_advertised(host: FakeHost) -> None:
    host.add_pci("0000:3b:00.0", group="7")
    host.add_pci("0000:5e:00.0", vendor="8086", device="6f54", pci_class="0b4000", group="9")
    host.vfio_nodes("7", "9")
    vendor = KvmVfioVendor(host.config(kvm_slots=0, vhost_net_slots=0, tun_slots=0, **load(USER_GUIDE)))
    assert set(vendor.discover()) == {T4}  # never intel.com/qat: virt-handler registers it itself
    notes = {f.resource: f for f in vendor.explain() if f.subject.startswith("vendor.permittedHostDevices")}
    assert notes["intel.com/qat"].reason == KUBEVIRT_SERVES and not notes["intel.com/qat"].advertised
    assert "externalResourceProvider: true" in notes["nvidia.com/GRID_T4-1Q"].hint


def test_pci_devices_carry_kubevirts_ids_env_and_nodes(host: FakeHost) -> None:
    """What KubeVirt's PCI plugin reports: ID = IOMMU group, PCI_RESOURCE_<NAME> = the address."""
    host.add_pci("0000:3b:00.0", group="7", numa=0)
    host.add_pci("0000:86:00.0", group="11", numa=1)
    host.add_pci("0000:af:00.0", group=None)  # no IOMMU group: no KubeVirt ID to give it
    host.vfio_nodes("7", "11")
    vendor = KvmVfioVendor(host.config(kvm_slots=0, vhost_net_slots=0, tun_slots=0, **load(ALL_EXTERNAL)))
    devices = {d.id: d for d in vendor.discover()[T4]}
    assert set(devices) == {"7", "11"}
    assert devices["11"].numa_nodes == (1,) and devices["11"].healthy
    assert dict(devices["11"].spec.env) == {"PCI_RESOURCE_NVIDIA_COM_TU104GL_TESLA_T4": "0000:86:00.0"}
    assert [(n.container_path, n.permissions) for n in devices["7"].spec.devices] == [
        ("/dev/vfio/vfio", "mrw"), ("/dev/vfio/7", "mrw")]
    assert devices["7"].attributes["pci_address"] == "0000:3b:00.0"
    assert any(f.subject == "0000:af:00.0" and "no IOMMU group" in f.reason for f in vendor.explain())


def test_gpu_and_audio_in_two_resources_are_served_as_kubevirt_serves_them(host: FakeHost) -> None:
    host.add_pci("0000:3b:00.0", group="7")
    host.add_pci("0000:3b:00.1", device="10f8", pci_class="040300", group="7")
    host.vfio_nodes("7")
    block = {"permittedHostDevices": {"pciHostDevices": [
        {"pciVendorSelector": "10DE:1EB8", "resourceName": T4, "externalResourceProvider": True},
        {"pciVendorSelector": "10DE:10F8", "resourceName": "nvidia.com/audio", "externalResourceProvider": True}]}}
    vendor = KvmVfioVendor(host.config(kvm_slots=0, vhost_net_slots=0, tun_slots=0, **block))
    snapshot = vendor.discover()
    assert [(d.id, d.healthy) for d in snapshot[T4]] == [("7", True)]
    assert [(d.id, d.healthy) for d in snapshot["nvidia.com/audio"]] == [("7", True)]
    assert any(f.subject == "IOMMU group 7" and "request them together" in f.reason for f in vendor.explain())


def test_two_functions_of_one_group_in_one_resource_are_one_device(host: FakeHost) -> None:
    host.add_pci("0000:3b:00.0", group="7")
    host.add_pci("0000:3b:00.1", group="7", driver="nvidia")
    host.vfio_nodes("7")
    vendor = KvmVfioVendor(host.config(kvm_slots=0, vhost_net_slots=0, tun_slots=0, **load(ALL_EXTERNAL)))
    (device,) = vendor.discover()[T4]
    assert device.id == "7" and not device.healthy
    assert device.reason == "0000:3b:00.0: IOMMU group 7 is not viable: 0000:3b:00.1 (nvidia) is not bound to vfio-pci"
    assert dict(device.spec.env) == {"PCI_RESOURCE_NVIDIA_COM_TU104GL_TESLA_T4": "0000:3b:00.0,0000:3b:00.1"}


# -- refused, naming the key path ------------------------------------------------------------
P = "vendor.permittedHostDevices"
EXT = "externalResourceProvider: true"


@pytest.mark.parametrize(("document", "message"), [
    ("permittedHostDevices: []", f"{P}: expected a mapping"),
    ("permittedHostDevices: {pciHostDevice: []}", f"{P}.pciHostDevice: unknown key (did you mean 'pciHostDevices'?)"),
    ("permittedHostDevices: {usbHostDevices: []}", "usbHostDevices is the HyperConverged CR's spelling of usb"),
    ("permittedHostDevices: {pciHostDevices: {}}", f"{P}.pciHostDevices: expected a list"),
    ("permittedHostDevices: {pciHostDevices: ['10de:1eb8']}", f"{P}.pciHostDevices[0]: expected a mapping"),
    ("permittedHostDevices: {pciHostDevices: [{resourceName: a.com/b}]}",
     f"{P}.pciHostDevices[0].pciVendorSelector: required"),
    ("permittedHostDevices: {pciHostDevices: [{pciVendorSelector: '10de:1eb8'}]}",
     f"{P}.pciHostDevices[0].resourceName: required"),
    ("permittedHostDevices: {pciHostDevices: [{pciVendorSelector: 10, resourceName: a.com/b}]}",
     f"{P}.pciHostDevices[0].pciVendorSelector: expected a string, got int 10"),
    ("permittedHostDevices: {pciHostDevices: [{pciVendorSelector: '10de:1eb8', resourceName: a.com/b, "
     "externalResourceProvidor: true}]}",
     f"{P}.pciHostDevices[0].externalResourceProvidor: unknown key (did you mean 'externalResourceProvider'?)"),
    ("permittedHostDevices: {mediatedDevices: [{mdevNameSelector: [x], resourceName: a.com/b}]}",
     f"{P}.mediatedDevices[0].mdevNameSelector: expected a string, got list ['x']"),
    ("permittedHostDevices: {usb: [{resourceName: a.com/b, selector: []}]}",
     f"{P}.usb[0].selector: unknown key (did you mean 'selectors'?)"),
    ("permittedHostDevices: {pciHostDevices: [{pciVendorSelector: '10de:1eb8', resourceName: a.com/b, "
     "externalResourceProvider: 'true'}]}", f"{P}.pciHostDevices[0].externalResourceProvider: expected true or false"),
    ("permittedHostDevices: {pciHostDevices: [{pciDeviceSelector: '10de:1eb8', resourceName: a.com/b}]}",
     "pciDeviceSelector is the HyperConverged CR's spelling of pciVendorSelector"),
    ("permittedHostDevices: {pciHostDevices: [{pciVendorSelector: '10de:1eb8', resourceName: a.com/b, "
     "disabled: true}]}", "disabled is the HyperConverged CR's"),
    (f"permittedHostDevices: {{pciHostDevices: [{{pciVendorSelector: '10de:1eb8', resourceName: gpu, {EXT}}}]}}",
     f"{P}.pciHostDevices[0].resourceName:"),
    (f"permittedHostDevices: {{pciHostDevices: [{{pciVendorSelector: '10de:1eb8', "
     f"resourceName: devices.kubevirt.io/kvm, {EXT}}}]}}", f"{P}.pciHostDevices[0].resourceName:"),
    ("permittedHostDevices: {mediatedDevices: [{resourceName: a.com/b}]}",
     f"{P}.mediatedDevices[0].mdevNameSelector: required"),
    ("permittedHostDevices: {mediatedDevices: [{mdevNameSelector: x, resourceName: a.com/b, type: y}]}",
     f"{P}.mediatedDevices[0].type: unknown key (known keys: "),
    ("permittedHostDevices: {usb: [{selectors: []}]}", f"{P}.usb[0].resourceName: required"),
    ("permittedHostDevices: {usb: [{resourceName: a.com/b, selectors: {vendor: '1'}}]}",
     f"{P}.usb[0].selectors: expected a list"),
    ("permittedHostDevices: {usb: [{resourceName: a.com/b, selectors: [{vendor: '46f4'}]}]}",
     f"{P}.usb[0].selectors[0].product: required"),
    ("permittedHostDevices: {usb: [{resourceName: a.com/b, selectors: [{vendor: '46f4', product: 1}]}]}",
     f"{P}.usb[0].selectors[0].product: expected a string"),
    ("permittedHostDevices: {usb: [{resourceName: a.com/b, selectors: [{vendor: '1', product: '1', serial: x}]}]}",
     f"{P}.usb[0].selectors[0].serial: unknown key (known keys: vendor, product)"),
    (f"permittedHostDevices: {{usb: [{{resourceName: a.com/b, {EXT}}}]}}", f"{P}.usb[0].selectors: at least one"),
    (f"permittedHostDevices: {{pciHostDevices: [{{pciVendorSelector: '10de:1eb8', resourceName: a.com/b, {EXT}}}], "
     f"mediatedDevices: [{{mdevNameSelector: x, resourceName: a.com/b, {EXT}}}]}}",
     f"{P}.mediatedDevices: resource 'a.com/b' is also served by {P}.pciHostDevices"),
    (f"pci_host_devices: [{{pci_vendor_selector: '10de:1eb8', resource_name: a.com/b}}]\n"
     f"permittedHostDevices: {{pciHostDevices: [{{pciVendorSelector: '10de:1eb8', resourceName: a.com/b, {EXT}}}]}}",
     f"{P}.pciHostDevices: resource 'a.com/b' is also served by vendor.pci_host_devices"),
    ("usb_owner: -1", "vendor.usb_owner"),
    ("usb_owner: root", "vendor.usb_owner"),
])
def test_bad_documents_are_refused_naming_the_key(document: str, message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        KvmVfioVendor(load(document))


def test_nothing_accepted_before_is_refused_now() -> None:
    """Every key and shape of the dpkit format still parses to what it did."""
    config = parse_config({"kvm_slots": 3, "vhost_net_slots": 0, "tun_slots": 2, "health_interval": 1,
                           "uevent_source": "kernel", "sys_root": "/sys", "dev_root": "/dev",
                           "pci_host_devices": [{"pci_vendor_selector": "10DE:1EB8", "class": "0x0302",
                                                 "addresses": ["0000:3B:00.0"], "resource_name": "nvidia.com/T4"},
                                                {"pci_vendor_selector": "8086:154c"}]})
    assert [(s.vendor, s.device, s.resource_name, s.pci_class, s.addresses, s.kubevirt) for s in config.selectors] == [
        ("10de", "1eb8", "nvidia.com/T4", "0302", ("0000:3b:00.0",), False), ("8086", "154c", "", "", (), False)]
    assert (config.mdevs, config.usbs, config.notes, config.usb_owner) == ((), (), (), 107)
