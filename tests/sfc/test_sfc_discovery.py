"""Discovery over a sysfs-shaped temp tree: devices, specs, pools, slots, Onload, health, explain."""

from __future__ import annotations

from typing import Any

from dpkit.core.tools.discovery import explain
from dpkit.core.vendorapi.device import Device, Health, Mount
from dpkit.sfc.vendor import SfcVendor

RESOURCE = "solarflare.com/sfc"


def by_id(devices: tuple[Device, ...]) -> dict[str, Device]:
    return {d.id: d for d in devices}


def test_plain_nics_without_onload(host: Any, make_vendor: Any) -> None:
    host.add_nic("0000:03:00.0", numa="1")
    host.add_nic("0000:03:00.1", numa="1")
    host.add_nic("0000:81:00.0", {"eno1": "up"}, vendor="0x8086", driver="ixgbe")  # not ours
    host.set_module_version("sfc", "5.3.16.1004")
    vendor = make_vendor()
    snapshot = vendor.discover()
    assert list(snapshot) == [RESOURCE]
    devices = by_id(snapshot[RESOURCE])
    assert sorted(devices) == ["0000:03:00.0", "0000:03:00.1"]
    device = devices["0000:03:00.0"]
    assert device.healthy and device.numa_nodes == (1,)
    assert device.spec.env == {"SFC_INTERFACES": "ens3f0", "SFC_PCI_ADDRESSES": "0000:03:00.0",
                               "PCIDEVICE_SOLARFLARE_COM_SFC": "0000:03:00.0"}
    assert device.spec.devices == () and device.spec.mounts == ()
    attrs = device.attributes
    assert attrs["interfaces"] == "ens3f0" and attrs["mac"] == "00:0f:53:00:03:00"
    assert attrs["speed_mbps"] == "25000" and attrs["link"] == "up" and attrs["nic"] == "0000:03:00"
    assert attrs["driver_version"] == "5.3.16.1004" and attrs["onload"] == "no"
    onload = [f for f in vendor.explain() if f.subject == "onload"]
    assert not onload[0].advertised and "serving plain NICs" in onload[0].reason
    assert "/dev/onload" in onload[0].reason or "onload" in onload[0].reason


def test_onload_spec(host: Any, make_vendor: Any) -> None:
    host.add_nic("0000:03:00.0")
    host.add_nic("0000:03:00.1")
    host.install_onload()
    (host.dev / "sfc_char").unlink()  # only the nodes that exist are given
    vendor = make_vendor(onload={"preload": True, "env": {"EF_POLL_USEC": 100000, "EF_X": "1,1"},
                                 "container_library_path": "/opt/onload/usr/lib64"})
    device, other = vendor.discover()[RESOURCE]
    spec = device.spec
    assert [(n.host_path, n.container_path, n.permissions) for n in spec.devices] == [
        (f"{host.dev}/onload", "/dev/onload", "rw"), (f"{host.dev}/onload_epoll", "/dev/onload_epoll", "rw")]
    assert spec.mounts == (
        Mount(f"{host.lib}/libonload.so", "/opt/onload/usr/lib64/libonload.so"),
        Mount(f"{host.lib}/libonload.so.1", "/opt/onload/usr/lib64/libonload.so.1"),
        Mount(f"{host.lib}/libonload_ext.so.2", "/opt/onload/usr/lib64/libonload_ext.so.2"),
    )
    assert all(m.read_only for m in spec.mounts)
    assert spec.env["LD_PRELOAD"] == "/opt/onload/usr/lib64/libonload.so"
    assert device.attributes["onload"] == "yes" and device.attributes["onload_version"] == "8.1.2.26"
    # EF_ values stay verbatim in the device spec and the merged one (plain merging collapses "1,1")
    assert spec.env["EF_X"] == "1,1"
    merged = vendor.container_spec(RESOURCE, [device, other])
    assert merged.env["EF_X"] == "1,1" and merged.env["EF_POLL_USEC"] == "100000"
    assert merged.env["SFC_INTERFACES"] == "ens3f0,ens3f1" and len(merged.devices) == 2
    onload = next(f for f in vendor.explain() if f.subject == "onload")
    assert onload.advertised and "8.1.2.26" in onload.reason


def test_onload_without_preload_sets_no_ld_preload(host: Any, make_vendor: Any) -> None:
    host.add_nic("0000:03:00.0")
    host.install_onload()
    [device] = make_vendor().discover()[RESOURCE]
    assert "LD_PRELOAD" not in device.spec.env and device.spec.mounts


def test_onload_required_but_missing(host: Any, make_vendor: Any) -> None:
    host.add_nic("0000:03:00.0")
    (host.dev / "onload").write_text("")  # node present, library missing
    [device] = make_vendor(onload={"required": True}).discover()[RESOURCE]
    assert device.health is Health.UNHEALTHY
    assert "libonload.so" in device.reason and "vendor.onload.required" in device.reason
    assert device.spec.devices == ()  # half an Onload is no Onload


def test_pools_and_slots(host: Any, make_vendor: Any) -> None:
    host.add_nic("0000:03:00.0", {"trade0": "up"})
    host.add_nic("0000:03:00.1", {"trade1": "up"})
    host.add_nic("0000:04:00.0", {"ens4f0": "up"})
    host.add_nic("0000:05:00.0", {"ens5f0": "up"})
    vendor = make_vendor(slots=1, pools=[
        {"resource": "solarflare.com/trading", "interfaces": ["trade*"], "slots": 3},
        {"resource": "solarflare.com/mgmt", "pci_addresses": ["0000:05:00.*"]},
    ])
    snapshot = vendor.discover()
    assert set(snapshot) == {RESOURCE, "solarflare.com/trading", "solarflare.com/mgmt"}
    assert [d.id for d in snapshot[RESOURCE]] == ["0000:04:00.0"]
    assert [d.id for d in snapshot["solarflare.com/mgmt"]] == ["0000:05:00.0"]
    trading = by_id(snapshot["solarflare.com/trading"])
    assert sorted(trading) == [f"0000:03:00.{f}-{n}" for f in (0, 1) for n in range(3)]
    assert trading["0000:03:00.1-2"].spec.env["SFC_INTERFACES"] == "trade1"
    assert trading["0000:03:00.1-2"].spec.env["PCIDEVICE_SOLARFLARE_COM_TRADING"] == "0000:03:00.1"
    assert trading["0000:03:00.1-2"].attributes["slot"] == "3/3"
    # two slots of one interface merge into one interface, not a repeated one
    merged = vendor.container_spec("solarflare.com/trading", [trading["0000:03:00.0-0"], trading["0000:03:00.0-1"]])
    assert merged.env["SFC_INTERFACES"] == "trade0"


def test_empty_pool_is_still_served(host: Any, make_vendor: Any) -> None:
    host.add_nic("0000:03:00.0")
    snapshot = make_vendor(pools=[{"resource": "solarflare.com/none", "interfaces": ["nomatch*"]}]).discover()
    assert snapshot["solarflare.com/none"] == () and len(snapshot[RESOURCE]) == 1


def test_function_bound_elsewhere_is_explained_not_advertised(host: Any, make_vendor: Any) -> None:
    host.add_nic("0000:03:00.0", {}, driver="vfio-pci")
    host.add_nic("0000:03:00.1", {}, driver=None)
    vendor = make_vendor()
    assert vendor.discover()[RESOURCE] == ()
    reasons = {f.subject: f for f in vendor.explain()}
    assert reasons["0000:03:00.0"].reason == "bound to vfio-pci, not sfc" and not reasons["0000:03:00.0"].advertised
    assert reasons["0000:03:00.1"].reason == "bound to no driver, not sfc"


def test_no_nics_at_all(host: Any, make_vendor: Any) -> None:
    report = explain(make_vendor())
    assert report["resources"] == [{"name": RESOURCE, "healthy": 0, "devices": []}]
    assert any("no PCI function with vendor ID 0x1924" in f["reason"] for f in report["findings"])
    assert report["errors"] == []


def test_link_down_unbind_removal_and_recovery(host: Any, make_vendor: Any) -> None:
    host.add_nic("0000:03:00.0", {"ens3f0": "up"})
    vendor = make_vendor()
    assert vendor.discover()[RESOURCE][0].healthy

    host.set_link("0000:03:00.0", "ens3f0", "down")
    [device] = vendor.discover()[RESOURCE]
    assert device.health is Health.UNHEALTHY and device.reason == "link down on ens3f0 (down)"
    host.set_link("0000:03:00.0", "ens3f0", "up")
    assert vendor.discover()[RESOURCE][0].healthy

    host.unbind("0000:03:00.0")
    [device] = vendor.discover()[RESOURCE]
    assert device.id == "0000:03:00.0" and device.reason == "driver unbound (now none)"
    host.bind("0000:03:00.0", "sfc")
    [device] = vendor.discover()[RESOURCE]
    assert device.reason.startswith("no network interface")
    host.add_interface("0000:03:00.0", "ens3f0")
    assert vendor.discover()[RESOURCE][0].healthy

    host.remove("0000:03:00.0")
    [device] = vendor.discover()[RESOURCE]
    assert device.health is Health.UNHEALTHY and device.reason == "removed from the host"
    host.add_nic("0000:03:00.0", {"ens3f0": "up"})
    assert vendor.discover()[RESOURCE][0].healthy


def test_unbound_slots_keep_their_ids(host: Any, make_vendor: Any) -> None:
    host.add_nic("0000:03:00.0", {"trade0": "up"})
    vendor = make_vendor(pools=[{"resource": "solarflare.com/trading", "interfaces": ["trade*"], "slots": 2}])
    assert len(vendor.discover()["solarflare.com/trading"]) == 2
    host.unbind("0000:03:00.0")  # interfaces are gone, so the name pattern no longer matches
    snapshot = vendor.discover()
    assert [d.id for d in snapshot["solarflare.com/trading"]] == ["0000:03:00.0-0", "0000:03:00.0-1"]
    assert all(not d.healthy for d in snapshot["solarflare.com/trading"]) and snapshot[RESOURCE] == ()


def test_garbage_nic_is_served_with_findings(host: Any, make_vendor: Any) -> None:
    path = host.add_nic("0000:03:00.0", {"ens3f0": "up"}, numa="lots")
    (path / "net" / "ens3f0" / "address").write_text("zz\n")
    vendor = make_vendor()
    [device] = vendor.discover()[RESOURCE]
    assert device.healthy and device.numa_nodes == () and "mac" not in device.attributes
    sysfs = [f.reason for f in vendor.explain() if f.reason.startswith("sysfs:")]
    assert any("numa_node" in r for r in sysfs) and any("MAC" in r for r in sysfs)


def test_invalid_library_path_becomes_a_finding(host: Any, make_vendor: Any, monkeypatch: Any) -> None:
    """A spec the core's validation refuses turns into 'Onload not usable', never a crash."""
    from dpkit.core.vendorapi.errors import ValidationError
    from dpkit.sfc import onload

    def refuse(*args: Any) -> Any:
        raise ValidationError("host path 'x' must be an absolute path")

    host.add_nic("0000:03:00.0")
    host.install_onload()
    monkeypatch.setattr(onload, "container_spec", refuse)
    vendor = make_vendor(onload={"required": True})
    [device] = vendor.discover()[RESOURCE]
    assert not device.healthy and "must be an absolute path" in device.reason


def test_node_labels_metrics_and_doctor(host: Any, make_vendor: Any) -> None:
    host.add_nic("0000:03:00.0", numa="0")
    host.add_nic("0000:03:00.1", {"ens3f1": "down"}, numa="0")
    host.set_module_version("sfc", "5.3.16.1004")
    host.install_onload("8.1.2.26")
    vendor = make_vendor()
    snapshot = vendor.discover()
    assert vendor.node_labels(snapshot) == {"sfc-nics": "1", "sfc-interfaces": "2", "sfc-onload": "true",
                                            "sfc-onload-version": "8.1.2.26", "sfc-driver-version": "5.3.16.1004"}
    samples = {(s.name, s.labels.get("interface", "")): s.value for s in vendor.metric_samples()}
    # the project's prefix and base units (Prometheus naming): speed in bits per second
    assert all(name.startswith("dpkit_sfc_") for name, _ in samples)
    assert samples[("dpkit_sfc_link_up", "ens3f0")] == 1.0 and samples[("dpkit_sfc_link_up", "ens3f1")] == 0.0
    assert samples[("dpkit_sfc_onload_available", "")] == 1.0
    assert samples[("dpkit_sfc_link_speed_bits_per_second", "ens3f0")] == 25e9
    checks = {c.name: c for c in vendor.doctor()}
    assert checks["sfc driver loaded"].ok and checks["Solarflare NICs present"].ok
    assert checks["onload libraries"].ok
    # the fake nodes are plain files: doctor says so instead of passing them
    assert not checks["onload device onload"].ok and "not a character device" in checks["onload device onload"].detail
    assert "udev available" not in checks  # a test tree is walked, not enumerated through udev


def test_doctor_on_an_empty_host(host: Any, make_vendor: Any) -> None:
    checks = {c.name: c for c in make_vendor().doctor()}
    driver = checks["sfc driver loaded"]
    # what was looked for, where, and how to fix it (not "none of sfc")
    assert not driver.ok
    assert f"{host.sys}/module/sfc" in driver.detail and f"{host.sys}/bus/pci/drivers/sfc" in driver.detail
    assert driver.detail.startswith("sfc is not loaded")
    assert "modprobe sfc" in driver.hint and "vendor.drivers" in driver.hint
    two = {c.name: c for c in make_vendor(drivers=["sfc", "xilinx_efct"]).doctor()}["sfc driver loaded"]
    assert "none of sfc, xilinx_efct (vendor.drivers) is loaded" in two.detail
    assert not checks["Solarflare NICs present"].ok
    assert "missing" in checks["onload device onload_epoll"].detail
    assert not checks["onload libraries"].ok


def test_vendor_ids_are_configurable(host: Any, make_vendor: Any) -> None:
    host.add_nic("0000:03:00.0", vendor="0x10ee", driver="sfc")
    assert make_vendor().discover()[RESOURCE] == ()
    assert len(make_vendor(vendor_ids=["0x10ee"]).discover()[RESOURCE]) == 1


def test_registered_as_entry_point() -> None:
    from dpkit.core.tools.registry import load_vendor_class

    assert load_vendor_class("sfc") is SfcVendor


def test_odd_entries_under_bus_pci_are_ignored(host: Any, make_vendor: Any) -> None:
    odd = host.sys / "bus" / "pci" / "devices" / "not-an-address"
    odd.mkdir()
    (odd / "vendor").write_text("0x1924\n")
    host.add_nic("0000:03:00.0")
    vendor = make_vendor()
    assert [d.id for d in vendor.discover()[RESOURCE]] == ["0000:03:00.0"]
    assert any(f.subject == "not-an-address" and "not a valid PCI address" in f.reason for f in vendor.explain())
