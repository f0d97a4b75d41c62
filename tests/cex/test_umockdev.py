"""Real pyudev and sysfs reads over a umockdev AP bus: discovery, uevents, a zcrypt node."""

from __future__ import annotations

from pathlib import Path

import umock

pytestmark = umock.skip_unless_available()

CHILD = Path(__file__).with_name("umock_child.py")
CCA, EP11 = "cex.s390.ibm.com/cca-blue", "cex.s390.ibm.com/ep11-red"


def test_discovery_uevents_and_allocation_over_a_umockdev_ap_bus(tmp_path: Path) -> None:
    result = umock.run_wrapped(CHILD, tmp_path, args=[str(tmp_path)], timeout=90)
    devices = result["devices"]
    assert [i for i, _ in devices[CCA]] == ["apqn-1-5-0", "apqn-1-5-1", "apqn-1-6-0", "apqn-1-6-1"]
    assert devices[EP11] == [["apqn-3-5-0", "Healthy"]]
    held = result["held_back"]
    assert held["APQN 02.0005"] == "not on this node's AP bus"        # until it is hot-plugged below
    assert "needs cex6 or newer" in held["APQN 05.0005"] and "needs ep11" in held["APQN 04.0005"]
    assert "not a usage domain" in held["APQN 06.0007"]
    assert result["requests"]["01.0005"] == 77
    node = result["node"]
    assert node["container"] == "/dev/z90crypt" and node["host"] == str(tmp_path / "dev" / "zcrypt-apqn-3-5-0")
    assert node["apmask"] == "0x10" + "0" * 62 and node["aqmask"] == "0x04" + "0" * 62
    assert node["mounts"][2] == ["/sys/devices/card03/03.0005", "/sys/bus/ap/devices/03.0005"]
    # the poll interval is 60 s: only the uevents can explain changes seen within seconds
    assert result["first"] is not None
    for key in ("offline_after", "online_after", "hotplug_after"):
        assert result[key] is not None and result[key] < 10, (key, result[key])
    assert result["watch_stopped"]
