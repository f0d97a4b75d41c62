"""Real pyudev and sysfs reads over fake device trees (umockdev), driven by testbed uevents."""

from __future__ import annotations

from pathlib import Path

import umock
from kvm_vfio.fakehost import FakeHost

pytestmark = umock.skip_unless_available()
HERE = Path(__file__).parent
GPU = "nvidia.com/TU104GL_Tesla_T4"
UEVENT_TARGET_MS = 100
LIMIT_MS = 1000  # generous so a loaded CI box cannot flake; the measured figure is printed (-s)


def _gpu(address: str, driver: str, numa: int) -> umock.MockDevice:
    return umock.MockDevice(
        f"/devices/pci0000:00/{address}",
        {"SUBSYSTEM": "pci", "PCI_SLOT_NAME": address, "DRIVER": driver, "PCI_ID": "10DE:1EB8"},
        {"vendor": "0x10de", "device": "0x1eb8" if address != "0000:3b:00.1" else "0x10f8",
         "class": "0x030200" if address != "0000:3b:00.1" else "0x040300", "numa_node": str(numa)},
        {"driver": f"../../../bus/pci/drivers/{driver}"},
    )


def test_discovery_reads_the_fake_sysfs(tmp_path: Path) -> None:
    host = FakeHost(tmp_path / "unused-sys", tmp_path / "dev")
    host.add_node("kvm")
    host.vfio_nodes("7", "9")
    devices = [_gpu("0000:3b:00.0", "vfio-pci", 0), _gpu("0000:3b:00.1", "snd_hda_intel", 0),
               _gpu("0000:5e:00.0", "vfio-pci", 1)]
    report = umock.run_device_file(devices, HERE / "umock_discover_child.py", tmp_path, args=[str(host.dev)])
    resources = {r["name"]: r for r in report["resources"]}
    gpus = {d["id"]: d for d in resources["nvidia.com/10DE_1EB8"]["devices"]}
    assert set(gpus) == {"0000:3b:00.0", "0000:5e:00.0"}  # the audio function is not selected
    assert gpus["0000:5e:00.0"]["health"] == "Healthy" and gpus["0000:5e:00.0"]["numa"] == "1"
    assert gpus["0000:3b:00.0"]["health"] == "Unhealthy"
    assert "0000:3b:00.1 (snd_hda_intel)" in gpus["0000:3b:00.0"]["reason"]
    assert resources["devices.kubevirt.io/kvm"]["healthy"] == 2
    assert report["errors"] == []


def test_uevents_change_the_advertised_list_quickly(tmp_path: Path, short_tmp: Path) -> None:
    result = umock.run_wrapped(HERE / "umock_watch_child.py", tmp_path, args=[str(short_tmp)])
    assert result["listening"] and result["initial"]
    assert result["initial_numa"] == [[0]]
    assert result["add_health"] == "Unhealthy"  # appeared before any driver bound it
    assert result["seen_without_uevent"] is False  # the timer is an hour away: only uevents explain changes
    assert result["unbind_reason"] == "not bound to any driver, not vfio-pci"
    assert result["rebind_reason"] is True  # then bound to nvidia: the reason follows
    steps = ("add", "bind", "unbind", "remove", "kvm_gone", "kvm_back")
    latencies = {step: result[step]["ms"] for step in steps}
    print(f"uevent -> kubelet latency (ms, target {UEVENT_TARGET_MS}): {latencies}")
    for step in steps:
        assert result[step]["ok"], f"{step}: the kubelet never saw the change"
        assert result[step]["ms"] < LIMIT_MS, f"{step} took {result[step]['ms']} ms"


def test_mdev_hotplug_follows_uevents(tmp_path: Path, short_tmp: Path) -> None:
    result = umock.run_wrapped(HERE / "umock_mdev_child.py", tmp_path, args=[str(short_tmp)])
    assert result["listening"] and result["registered_empty"] and result["add_rescanned"]
    assert result["seen_without_uevent"] is False  # the timer is an hour away: only the bind uevent explains it
    assert result["bind_ok"] and result["remove_ok"]
    assert result["devices"] == {"20": ["Healthy", [1]]}  # KubeVirt's ID (IOMMU group), the parent's NUMA node
    env = {"MDEV_PCI_RESOURCE_NVIDIA_COM_GRID_T4-1Q": "4b20d080-1b54-4048-85b3-a6a62d165c01"}
    assert result["allocated"] == [["20"], env, ["/dev/vfio/20", "/dev/vfio/vfio"]]
    print(f"mdev uevent -> kubelet latency (ms): bind {result['bind_ms']}, remove {result['remove_ms']}")
    assert result["bind_ms"] < LIMIT_MS and result["remove_ms"] < LIMIT_MS


def test_device_names_come_from_the_udev_database(tmp_path: Path) -> None:
    """Default resource names from udev's ID_MODEL_FROM_DATABASE (umockdev serves it as libudev does)."""
    host = FakeHost(tmp_path / "unused-sys", tmp_path / "dev")
    host.vfio_nodes("7")
    result = umock.run_wrapped(HERE / "umock_names_child.py", tmp_path, args=[str(host.dev)])
    assert result["first"] == {
        GPU: [["0000:3b:00.0", "TU104GL [Tesla T4]"]],
        "devices.kubevirt.io/Virtio_network_device": [["0000:00:04.0", "Virtio network device"]],
        "intel.com/8086_0001": [["0000:00:05.0", ""]],   # udev has no name: the hex IDs, as before
        "nvidia.com/10DE_ABCD": [],                       # no function, so nothing to ask udev about
    }
    assert result["notes"] and "no longer read" in result["notes"][0][1]  # pci_ids: accepted, said so
    assert result["after_unplug"][GPU] == []  # the name outlives the last function (no flip to hex)
    assert "nvidia.com/10DE_1EB8" in result["fresh_after_unplug"]  # a new process has nothing to ask
    assert result["other_root"] == ["devices.kubevirt.io/1AF4_1000", "intel.com/8086_0001",
                                    "nvidia.com/10DE_1EB8", "nvidia.com/10DE_ABCD"]
    print(f"udev name lookup: first {result['lookup_ms']:.1f} ms, then {result['per_lookup_us']:.0f} us each")
