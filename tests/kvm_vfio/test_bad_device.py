"""One bad device never takes the node down (issue 12): it is listed Unhealthy or skipped, and explained."""

from __future__ import annotations

from collections.abc import Callable

from kvm_vfio.fakehost import FakeHost

from dpkit.core.engine.manager import Manager
from dpkit.core.tools.discovery import explain
from dpkit.core.tools.kubelet import Kubelet
from dpkit.kvm_vfio.vendor import KvmVfioVendor

KVM = "devices.kubevirt.io/kvm"
GPU = "nvidia.com/TU104GL_Tesla_T4"
T4 = {"pci_vendor_selector": "10de:1eb8", "resource_name": GPU}


def bad_numa_host(host: FakeHost) -> None:
    host.add_node("kvm")
    host.add_pci("0000:3b:00.0", group="7", numa=0)
    host.add_pci("0000:86:00.0", group="11", numa=2000)  # outside 0..1023: garbage from sysfs
    host.vfio_nodes("7", "11")


def test_out_of_range_numa_node_marks_only_that_device(host: FakeHost) -> None:
    bad_numa_host(host)
    vendor = KvmVfioVendor(host.config(kvm_slots=2, vhost_net_slots=0, tun_slots=0, pci_host_devices=[T4]))
    snapshot = vendor.discover()
    assert [d.healthy for d in snapshot[KVM]] == [True, True]
    devices = {d.id: d for d in snapshot[GPU]}
    assert devices["0000:3b:00.0"].healthy and devices["0000:3b:00.0"].numa_nodes == (0,)
    bad = devices["0000:86:00.0"]
    assert not bad.healthy and bad.numa_nodes == () and bad.spec.devices == ()
    assert "NUMA node 2000 is outside 0..1023" in bad.reason
    notes = [f for f in vendor.explain() if f.subject == "0000:86:00.0"]
    assert notes and "NUMA node 2000" in notes[0].reason and not notes[0].advertised
    assert "the rest of the node is served" in notes[0].hint
    report = explain(vendor)  # what `dpkit discover` prints
    assert report["errors"] == []
    (gpu,) = [r for r in report["resources"] if r["name"] == GPU]
    assert {d["id"]: d["health"] for d in gpu["devices"]} == {"0000:3b:00.0": "Healthy", "0000:86:00.0": "Unhealthy"}


def test_out_of_range_numa_node_still_serves_the_node(
    kubelet: Kubelet, run_manager: Callable[..., Manager], host: FakeHost
) -> None:
    bad_numa_host(host)
    run_manager(KvmVfioVendor(host.config(kvm_slots=2, vhost_net_slots=0, tun_slots=0, health_interval=60,
                                          pci_host_devices=[T4])))
    assert kubelet.wait_for(lambda k: k.allocatable(KVM) == 2 and k.capacity(GPU) == 2 and k.allocatable(GPU) == 1,
                            10)
    ids, _ = kubelet.allocate(GPU, 1)
    assert ids == ["0000:3b:00.0"]
