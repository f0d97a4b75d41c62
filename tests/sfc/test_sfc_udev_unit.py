"""The udev glue without a testbed: event relevance, and the fallback when libudev is missing."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

from dpkit.sfc import vendor as vendor_module
from dpkit.sfc.udev import relevant
from dpkit.sfc.vendor import SfcVendor


@dataclass
class FakeUevent:
    subsystem: str
    sys_path: str


def test_relevance() -> None:
    assert relevant(FakeUevent("pci", "/sys/devices/pci0000:00/0000:03:00.0"))
    assert relevant(FakeUevent("net", "/sys/devices/pci0000:00/0000:03:00.0/net/ens3f0"))
    assert not relevant(FakeUevent("net", "/sys/devices/virtual/net/veth12ab"))  # pod churn
    assert not relevant(FakeUevent("block", "/sys/devices/virtual/block/loop0"))


def test_missing_libudev_falls_back_to_polling(monkeypatch: Any) -> None:
    def no_libudev() -> Any:
        raise ImportError("libudev.so.1: cannot open shared object file")

    monkeypatch.setattr(vendor_module, "Udev", no_libudev)
    vendor = SfcVendor({"resync_interval": 7})
    assert vendor.source == "sysfs walk of /sys" and vendor.poll_interval == 7.0
    assert "libudev unavailable" in vendor._udev_error and "polling sysfs every 7 s" in vendor._udev_error


def test_test_trees_are_walked(host: Any, make_vendor: Any) -> None:
    assert make_vendor().source == f"sysfs walk of {host.sys}"


def test_failing_enumeration_falls_back_to_the_walk(host: Any, make_vendor: Any) -> None:
    class BrokenUdev:
        def pci_paths(self) -> Any:
            raise OSError("udev database unreadable")

    host.add_nic("0000:03:00.0")
    vendor = make_vendor()
    vendor._udev = BrokenUdev()
    assert [d.id for d in vendor.discover()["solarflare.com/sfc"]] == ["0000:03:00.0"]


class RecordingSink:
    def __init__(self) -> None:
        self.snapshots: list[Any] = []
        self.event = threading.Event()

    def snapshot(self, snapshot: Any) -> None:
        self.snapshots.append(snapshot)
        self.event.set()

    def health(self, *args: Any) -> None:
        raise AssertionError("the sfc vendor reports whole snapshots")


def test_monitor_refused_falls_back_to_polling(host: Any, make_vendor: Any, monkeypatch: Any) -> None:
    import pyudev

    class NoUdev:
        def pci_paths(self) -> Any:
            raise OSError("no udev here")

    def refused(*args: Any, **kwargs: Any) -> Any:
        raise PermissionError("netlink socket refused")

    monkeypatch.setattr(pyudev.Monitor, "from_netlink", refused)
    host.add_nic("0000:03:00.0")
    vendor = make_vendor()  # resync_interval 0.05 s
    vendor._udev = NoUdev()
    sink, stop = RecordingSink(), threading.Event()
    thread = threading.Thread(target=vendor.watch, args=(sink, stop), daemon=True)
    thread.start()
    try:
        assert sink.event.wait(5), "no snapshot from the polling fallback"
        assert [d.id for d in sink.snapshots[0]["solarflare.com/sfc"]] == ["0000:03:00.0"]
    finally:
        stop.set()
        thread.join(5)
    assert not thread.is_alive()
