"""Reading one PCI function from sysfs files: good data, and garbage that must not crash."""

from __future__ import annotations

from typing import Any

import pytest

from dpkit.sfc.sysfs import MAX_NUMA_NODE, read_function, read_text, walk_pci


def test_reads_a_function_and_its_interface(host: Any) -> None:
    host.add_nic("0000:03:00.1", {"ens3f1np1": "up"}, numa="1")
    function = read_function(host.function_dir("0000:03:00.1"))
    assert function is not None
    assert (function.address, function.vendor_id, function.device_id) == ("0000:03:00.1", "0x1924", "0x0b03")
    assert (function.driver, function.numa_node, function.nic) == ("sfc", 1, "0000:03:00")
    [interface] = function.interfaces
    assert (interface.name, interface.mac, interface.operstate) == ("ens3f1np1", "00:0f:53:00:03:00", "up")
    assert interface.carrier is True and interface.speed_mbps == 25000 and interface.link_up
    assert function.problems == ()


def test_link_states() -> None:
    from dpkit.sfc.sysfs import NetInterface

    assert not NetInterface("a", "", "down", True, None).link_up
    assert not NetInterface("a", "", "lowerlayerdown", None, None).link_up
    assert NetInterface("a", "", "unknown", True, None).link_up  # drivers without operstate support
    assert not NetInterface("a", "", "unknown", False, None).link_up
    assert not NetInterface("a", "", "", None, None).link_up


def test_unbound_function_without_numa(host: Any) -> None:
    host.add_nic("0000:04:00.0", {}, driver=None, numa="-1")
    function = read_function(host.function_dir("0000:04:00.0"))
    assert function is not None
    assert function.driver == "" and function.numa_node is None and function.interfaces == ()


def test_garbage_is_reported_not_raised(host: Any) -> None:
    path = host.add_nic("0000:05:00.0", {"ens5f0": "up"}, numa="banana", speed="-1")
    iface = path / "net" / "ens5f0"
    (iface / "operstate").write_bytes(b"\xff\xfe\x00garbage")
    (iface / "address").write_text("not-a-mac\n")
    (iface / "carrier").write_text("yes\n")
    (path / "net" / "bad name!").mkdir()
    (path / "vendor").write_bytes(b"\x80\x81")
    function = read_function(path)
    assert function is not None
    assert function.numa_node is None and function.vendor_id == ""
    [interface] = function.interfaces
    assert interface.mac == "" and interface.operstate == "" and interface.carrier is None
    assert interface.speed_mbps is None and not interface.link_up
    problems = " | ".join(function.problems)
    assert "numa_node: not a number" in problems
    assert "MAC address 'not-a-mac' is malformed" in problems
    assert "carrier: not a number" in problems
    assert "'bad name!' is not a valid interface name" in problems


def test_operstate_with_odd_text(host: Any) -> None:
    path = host.add_nic("0000:05:00.1", {"ens5f1": "up"})
    (path / "net" / "ens5f1" / "operstate").write_text("up; rm -rf /\n")
    function = read_function(path)
    assert function is not None
    assert function.interfaces[0].operstate == "" and "operstate" in function.problems[0]


def test_vanished_and_foreign_paths(host: Any) -> None:
    assert read_function(host.sys / "devices" / "pci0000:00" / "0000:09:00.0") is not None  # empty, not a crash
    assert read_function(host.sys / "devices" / "pci0000:00") is None  # not a PCI address
    assert read_function(host.root / "../../etc") is None
    assert read_text(host.root / "missing") is None
    assert read_text(host.sys) is None  # a directory


def test_walk_pci(host: Any, tmp_path: Any) -> None:
    host.add_nic("0000:03:00.1")
    host.add_nic("0000:03:00.0")
    assert [p.name for p in walk_pci(str(host.sys))] == ["0000:03:00.0", "0000:03:00.1"]
    assert walk_pci(str(tmp_path / "nowhere")) == []


@pytest.mark.parametrize("raw", ["99999999999999999999999", "-99999999999999999999999", "1024", "-2",
                                 "0x1", "1_0", "1e3", " ", "\u0661", "7 8", "9" * 5000])
def test_implausible_numa_node_means_no_numa_info(host: Any, raw: str) -> None:
    path = host.add_nic("0000:06:00.0", numa="0")
    (path / "numa_node").write_bytes(raw.encode() + b"\n")
    function = read_function(path)
    assert function is not None and function.numa_node is None
    if raw.strip():  # an empty file is just "unknown"
        assert any(p.startswith("numa_node: ") and "NUMA node unknown" in p for p in function.problems), \
            function.problems


@pytest.mark.parametrize(("raw", "node"), [("0", 0), ("1", 1), (str(MAX_NUMA_NODE), MAX_NUMA_NODE), ("-1", None)])
def test_plausible_numa_nodes(host: Any, raw: str, node: int | None) -> None:
    path = host.add_nic("0000:06:00.1", numa=raw)
    function = read_function(path)
    assert function is not None and function.numa_node == node and function.problems == ()


def test_garbage_numa_node_is_advertised_without_numa(host: Any, make_vendor: Any,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    host.add_nic("0000:07:00.0", numa="99999999999999999999999")
    vendor = make_vendor()
    [device] = vendor.discover()["solarflare.com/sfc"]
    assert device.healthy and device.numa_nodes == () and "numa" not in device.attributes
    vendor.discover()
    logged = [r for r in caplog.records if r.getMessage() == "odd sysfs data"]
    assert len(logged) == 1  # once, not on every discovery
    assert any("not a NUMA node" in f.reason for f in vendor.explain())
