"""The vendor behind a real Manager and the kubelet emulator, over real gRPC on unix sockets."""

from __future__ import annotations

import fcntl
import os
from collections.abc import Callable
from typing import Any

import pytest
from kvm_vfio.fakehost import FakeHost

from dpkit.core.api.v1beta1 import api_pb2
from dpkit.core.engine.manager import Manager
from dpkit.core.tools.kubelet import Kubelet
from dpkit.kvm_vfio.shared import node_problem
from dpkit.kvm_vfio.vendor import KvmVfioVendor

KVM = "devices.kubevirt.io/kvm"
GPU = "nvidia.com/TU104GL_Tesla_T4"
T4 = {"pci_vendor_selector": "10de:1eb8", "resource_name": GPU}
KVM_GET_API_VERSION = 0xAE00  # _IO(KVMIO, 0x00)
KVM_API_VERSION = 12

Run = Callable[..., Manager]


def start(run_manager: Run, kubelet: Kubelet, config: dict[str, Any]) -> Manager:
    manager = run_manager(KvmVfioVendor({"vhost_net_slots": 0, "tun_slots": 0, **config}))
    assert kubelet.wait_for(lambda k: k.registered(KVM), 10)
    return manager


def test_allocated_kvm_node_answers_get_api_version(kubelet: Kubelet, run_manager: Run) -> None:
    problem = node_problem("/dev/kvm")
    if problem:
        pytest.skip(f"no usable /dev/kvm on this machine: {problem}")
    start(run_manager, kubelet, {"kvm_slots": 2, "health_interval": 60})  # the real /dev, read only
    assert kubelet.wait_for(lambda k: k.allocatable(KVM) == 2, 10)
    ids, response = kubelet.allocate(KVM, 1)
    assert ids[0] in ("kvm0", "kvm1")
    (node,) = response.devices
    assert (node.host_path, node.container_path, node.permissions) == ("/dev/kvm", "/dev/kvm", "rw")
    fd = os.open(node.host_path, os.O_RDWR | os.O_CLOEXEC)
    try:
        assert fcntl.ioctl(fd, KVM_GET_API_VERSION) == KVM_API_VERSION
    finally:
        os.close(fd)


def test_kvm_slots_follow_the_node(kubelet: Kubelet, run_manager: Run, host: FakeHost) -> None:
    host.add_node("kvm")
    start(run_manager, kubelet, host.config(kvm_slots=3, health_interval=0.1))
    assert kubelet.wait_for(lambda k: k.allocatable(KVM) == 3, 10)
    host.remove_node("kvm")
    assert kubelet.wait_for(lambda k: k.allocatable(KVM) == 0 and k.capacity(KVM) == 3, 10)
    host.add_node("kvm")
    assert kubelet.wait_for(lambda k: k.allocatable(KVM) == 3, 10)


def test_vfio_allocation_gives_group_nodes_env_and_topology(
    kubelet: Kubelet, run_manager: Run, host: FakeHost
) -> None:
    host.add_node("kvm")
    host.add_pci("0000:3b:00.0", group="7", numa=0)
    host.add_pci("0000:86:00.0", group="11", numa=1)
    host.add_pci("0000:87:00.0", group="12", numa=1)
    host.vfio_nodes("7", "11", "12")
    start(run_manager, kubelet, host.config(kvm_slots=1, health_interval=60, pci_host_devices=[T4]))
    assert kubelet.wait_for(lambda k: k.allocatable(GPU) == 3, 10)
    assert {i: s.numa for i, s in kubelet.devices(GPU).items()} == {
        "0000:3b:00.0": (0,), "0000:86:00.0": (1,), "0000:87:00.0": (1,)}
    ids, response = kubelet.allocate(GPU, 2)  # GetPreferredAllocation: both on NUMA node 1
    assert sorted(ids) == ["0000:86:00.0", "0000:87:00.0"]
    assert sorted(response.envs["PCI_RESOURCE_NVIDIA_COM_TU104GL_TESLA_T4"].split(",")) == sorted(ids)
    assert sorted((d.container_path, d.permissions) for d in response.devices) == [
        ("/dev/vfio/11", "mrw"), ("/dev/vfio/12", "mrw"), ("/dev/vfio/vfio", "mrw")]


def test_preferred_allocation_keeps_a_group_whole(kubelet: Kubelet, run_manager: Run, host: FakeHost) -> None:
    host.add_node("kvm")
    host.add_pci("0000:3b:00.0", group="7", numa=0)
    host.add_pci("0000:3b:00.1", group="7", numa=0)
    host.add_pci("0000:5e:00.0", group="9", numa=0)
    host.vfio_nodes("7", "9")
    start(run_manager, kubelet, host.config(kvm_slots=1, health_interval=60, pci_host_devices=[T4]))
    assert kubelet.wait_for(lambda k: k.allocatable(GPU) == 3, 10)
    request = api_pb2.PreferredAllocationRequest(container_requests=[api_pb2.ContainerPreferredAllocationRequest(
        available_deviceIDs=["0000:3b:00.0", "0000:3b:00.1", "0000:5e:00.0"],
        must_include_deviceIDs=["0000:3b:00.1"], allocation_size=2)])
    answer = kubelet.stub(GPU).GetPreferredAllocation(request, timeout=10)
    assert sorted(answer.container_responses[0].deviceIDs) == ["0000:3b:00.0", "0000:3b:00.1"]


def test_device_changes_reach_the_kubelet_without_a_uevent_monitor(
    kubelet: Kubelet, run_manager: Run, host: FakeHost, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    import pyudev

    def no_netlink(*args: object, **kwargs: object) -> None:
        raise OSError(1, "Operation not permitted")

    monkeypatch.setattr(pyudev.Monitor, "from_netlink", no_netlink)
    host.add_node("kvm")
    host.add_pci("0000:3b:00.0", group="7")
    host.vfio_nodes("7")
    with caplog.at_level("WARNING", logger="dpkit"):
        manager = start(run_manager, kubelet, host.config(kvm_slots=1, health_interval=0.1, pci_host_devices=[T4]))
        vendor = manager.vendor
        assert isinstance(vendor, KvmVfioVendor) and vendor.listening.wait(10)
    assert any(r.getMessage().startswith("no uevent monitor") for r in caplog.records)
    assert kubelet.wait_for(lambda k: k.allocatable(GPU) == 1, 10)
    host.set_driver("0000:3b:00.0", "nvidia")
    assert kubelet.wait_for(lambda k: k.allocatable(GPU) == 0 and k.capacity(GPU) == 1, 10)
    host.remove_pci("0000:3b:00.0")
    assert kubelet.wait_for(lambda k: k.capacity(GPU) == 0 and k.registered(GPU), 10)


def test_a_failing_rescan_is_logged_and_the_watch_goes_on(
    host: FakeHost, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import threading

    import pyudev

    vendor = KvmVfioVendor(host.config(kvm_slots=1, health_interval=0.05))
    calls: list[int] = []
    stop = threading.Event()

    def flaky() -> dict[str, Any]:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("sysfs exploded")
        if len(calls) >= 3:
            stop.set()
        return {}

    class Sink:
        def __init__(self) -> None:
            self.snapshots: list[Any] = []

        def snapshot(self, snapshot: Any) -> None:
            self.snapshots.append(snapshot)

        def health(self, *args: Any) -> None:
            raise AssertionError("not used")

    def no_netlink(*args: object, **kwargs: object) -> None:
        raise OSError(1, "Operation not permitted")

    monkeypatch.setattr(vendor, "discover", flaky)
    monkeypatch.setattr(pyudev.Monitor, "from_netlink", no_netlink)  # the timer alone drives the rescans
    sink = Sink()
    with caplog.at_level("ERROR", logger="dpkit"):
        thread = threading.Thread(target=vendor.watch, args=(sink, stop))
        thread.start()
        thread.join(10)
    assert not thread.is_alive() and len(calls) >= 3
    assert sink.snapshots == [{}]  # published once; the identical later view is not re-sent
    assert any(r.getMessage().startswith("rescan failed") for r in caplog.records)


def test_status_shows_why_a_device_is_unhealthy(kubelet: Kubelet, run_manager: Run, host: FakeHost) -> None:
    host.add_node("kvm")
    host.add_pci("0000:3b:00.0", group="7", driver="nvidia")
    host.vfio_nodes("7")
    manager = start(run_manager, kubelet, host.config(kvm_slots=1, health_interval=60, pci_host_devices=[T4]))
    assert kubelet.wait_for(lambda k: k.capacity(GPU) == 1, 10)
    (gpu,) = [r for r in manager.status()["resources"] if r["name"] == GPU]
    assert gpu["devices"][0]["reason"] == "bound to nvidia, not vfio-pci"
    assert gpu["allocatable"] == 0

