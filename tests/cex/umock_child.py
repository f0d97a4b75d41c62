"""Run under umockdev-wrapper by test_umockdev.py (not a test module): the cex vendor over a
umockdev AP bus, with real pyudev uevents. Prints nothing; reports one JSON object through umock.
"""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path
from typing import Any

import umock

from cex.aptree import STANDARD_SETS, FakeZcryptKernel, mask, write_sets
from dpkit.cex.vendor import CexVendor
from dpkit.core.vendorapi.device import Health, Snapshot

CCA, EP11 = "cex.s390.ibm.com/cca-blue", "cex.s390.ibm.com/ep11-red"
CARDS = {1: "CEX7C", 2: "CEX7C", 3: "CEX8P", 4: "CEX6A", 5: "CEX5C", 6: "CEX7C"}
FUNCTIONS = {"C": "0x72000000", "P": "0x06000000", "A": "0x6a000000"}


class Sink:
    """Records the watch thread's snapshots; :meth:`wait` blocks (with a timeout) for one that fits."""

    def __init__(self) -> None:
        self.snapshots: list[tuple[float, Snapshot]] = []
        self.cond = threading.Condition()

    def snapshot(self, snapshot: Snapshot) -> None:
        with self.cond:
            self.snapshots.append((time.monotonic(), snapshot))
            self.cond.notify_all()

    def health(self, resource: str, device_id: str, health: Health, reason: str = "") -> None:
        raise AssertionError("the cex vendor reports whole snapshots")

    def mark(self) -> tuple[int, float]:
        with self.cond:
            return len(self.snapshots), time.monotonic()

    def wait(self, predicate: Any, since: tuple[int, float], timeout: float = 10.0) -> float | None:
        """Seconds from ``since`` (a :meth:`mark`) to a later snapshot satisfying ``predicate``; None on timeout."""
        (count, start), deadline = since, time.monotonic() + timeout
        with self.cond:
            while True:
                for at, snap in self.snapshots[count:]:
                    if predicate(snap):
                        return at - start
                if time.monotonic() >= deadline:
                    return None
                self.cond.wait(min(0.25, deadline - time.monotonic()))


def card(tb: Any, number: int) -> str:
    type_ = CARDS[number]
    return umock.add_device(tb, "ap", f"card{number:02x}", attributes={
        "type": type_, "hwtype": str(6 + int(type_[3])), "ap_functions": FUNCTIONS[type_[-1]],
        "online": "1", "config": "1", "chkstop": "0", "request_count": "0", "depth": "8"},
        properties={"DEV_TYPE": "ap_card"})


def queue(tb: Any, parent: str, adapter: int, domain: int, **attrs: str) -> str:
    return umock.add_device(tb, "ap", f"{adapter:02x}.{domain:04x}", parent=parent, attributes={
        "online": "1", "config": "1", "chkstop": "0", "request_count": "0", "mkvps": "AES CUR: valid", **attrs},
        properties={"DEV_TYPE": "ap_queue"})


def health(snapshot: Snapshot, resource: str, prefix: str) -> set[str]:
    return {str(d.health) for d in snapshot.get(resource, ()) if d.id.startswith(prefix)}


def main(workdir: Path) -> None:
    tb = umock.testbed()
    cards = {n: card(tb, n) for n in CARDS}
    queues = {(a, d): queue(tb, cards[a], a, d, request_count="77" if (a, d) == (1, 5) else "0")
              for a, d in ((1, 5), (1, 6), (2, 6), (3, 5), (4, 5), (5, 5), (6, 7))}  # 02.0005 comes later
    umock.write_sys_file("bus/ap/ap_usage_domain_mask", mask((5, 6)) + "\n")
    umock.write_sys_file("class/zcrypt/create", "")
    umock.write_sys_file("class/zcrypt/destroy", "")
    (umock.testbed_dir() / "sys" / "devices" / "virtual" / "zcrypt").mkdir(parents=True)
    config = write_sets(workdir / "cex_resources.json", STANDARD_SETS)
    vendor = CexVendor({"config_file": str(config), "sysfs_root": "/sys", "dev_dir": str(workdir / "dev"),
                        "shadow_dir": str(workdir / "shadow"), "pod_resources_socket": str(workdir / "none.sock"),
                        "poll_interval": 60, "config_check_interval": 600, "reconcile_interval": 600}, environ={})
    result: dict[str, Any] = {}
    snapshot = vendor.discover()
    result["devices"] = {r: [[d.id, str(d.health)] for d in devs] for r, devs in snapshot.items()}
    result["held_back"] = {f.subject: f.reason for f in vendor.explain() if not f.advertised and f.resource}
    result["requests"] = {s.labels["apqn"]: s.value for s in vendor.metric_samples()
                          if s.name == "dpkit_cex_apqn_requests_total"}

    with FakeZcryptKernel(umock.testbed_dir() / "sys", workdir / "dev"):
        ep11 = list(vendor.discover()[EP11][:1])
        spec = vendor.container_spec(EP11, ep11)
        vendor.pre_start(EP11, ep11)
    node = umock.testbed_dir() / "sys" / "devices" / "virtual" / "zcrypt" / "zcrypt-apqn-3-5-0"
    result["node"] = {"host": spec.devices[0].host_path, "container": spec.devices[0].container_path,
                      "apmask": (node / "apmask").read_text().strip(), "aqmask": (node / "aqmask").read_text().strip(),
                      "mounts": [[m.host_path, m.container_path] for m in spec.mounts]}

    sink, stop = Sink(), threading.Event()
    watcher = threading.Thread(target=vendor.watch, args=(sink, stop), daemon=True)
    watcher.start()
    try:
        result["first"] = sink.wait(lambda s: CCA in s, (0, time.monotonic()))
        since = sink.mark()
        tb.set_attribute(queues[(1, 5)], "online", "0")
        umock.uevent(tb, queues[(1, 5)], "change")
        result["offline_after"] = sink.wait(lambda s: health(s, CCA, "apqn-1-5-") == {"Unhealthy"}, since)
        since = sink.mark()
        tb.set_attribute(queues[(1, 5)], "online", "1")
        umock.uevent(tb, queues[(1, 5)], "change")
        result["online_after"] = sink.wait(lambda s: health(s, CCA, "apqn-1-5-") == {"Healthy"}, since)
        since = sink.mark()
        added = queue(tb, cards[2], 2, 5)
        umock.uevent(tb, added, "add")
        result["hotplug_after"] = sink.wait(lambda s: len(s.get(CCA, ())) == 6, since)
        result["snapshots"] = len(sink.snapshots)
    finally:
        stop.set()
        watcher.join(5)
    result["watch_stopped"] = not watcher.is_alive()
    umock.write_result(result)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
