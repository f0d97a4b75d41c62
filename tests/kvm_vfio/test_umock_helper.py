"""The shared umockdev helper (tests/umock.py) does what it documents, in both modes."""

from __future__ import annotations

from pathlib import Path

import umock

pytestmark = umock.skip_unless_available()
CHILD = Path(__file__).with_name("umock_selftest_child.py")


def test_record_format() -> None:
    device = umock.MockDevice("/devices/x", {"SUBSYSTEM": "pci"}, {"vendor": "a\nb"}, {"driver": "../d"})
    assert device.record() == "P: /devices/x\nE: SUBSYSTEM=pci\nA: vendor=a\\nb\nL: driver=../d\n"


def test_device_file_run_sees_fake_sysfs(tmp_path: Path) -> None:
    devices = [umock.MockDevice("/devices/0000:00:04.0", {"SUBSYSTEM": "pci"}, {"vendor": "0x10de"})]
    result = umock.run_device_file(devices, CHILD, tmp_path, args=["file"])
    assert result["pyudev"] == [["0000:00:04.0", "0x10de"]]
    assert result["group_type"] == "DMA"
    assert result["group_devices"] == ["0000:00:04.0"]


def test_wrapped_testbed_delivers_uevents(tmp_path: Path) -> None:
    result = umock.run_wrapped(CHILD, tmp_path, args=["wrapped"])
    # add_device announces the device itself; uevent() adds the second event
    assert result["events"] == [["add", "0000:00:04.0"], ["change", "0000:00:04.0"]]
    assert result["pyudev"] == [["0000:00:04.0", "0x10de"]]
