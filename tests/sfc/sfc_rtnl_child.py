"""Child process for test_sfc_rtnl.py, started by ``unshare --net`` (not collected by pytest).

It runs in a network namespace of its own, so the link it creates and toggles exists nowhere
else and vanishes with the process; no real interface is touched. It creates ``dpk0`` (a dummy
link, or a veth pair where the dummy module is missing), runs the core's UeventWatcher with the
link monitor the vendor uses, toggles the link up and down from a second thread while the main
thread waits (5 s at most) for the watcher's next rescan, and prints one JSON object: the wake
latencies, or ``skip``.
"""

from __future__ import annotations

import json
import queue
import subprocess
import sys
import threading
import time
from typing import Any

LINK = "dpk0"
TIMEOUT = 5.0
TOGGLES = ("up", "down", "up", "down")


def ip(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=10, check=False)


def report(result: dict[str, Any]) -> None:
    print(json.dumps(result))
    sys.stdout.flush()


def make_link() -> str | None:
    if ip("link", "add", LINK, "type", "dummy").returncode == 0:
        return "dummy"
    if ip("link", "add", LINK, "type", "veth", "peer", "name", "dpk1").returncode == 0:
        return "veth"
    return None


def toggle(state: str, started: list[float], fired: threading.Event) -> None:
    """Change the link once the main thread is waiting; note when (just before ``ip``)."""
    time.sleep(0.2)
    started[0] = time.perf_counter()
    fired.set()
    result = ip("link", "set", LINK, state)
    if result.returncode != 0:
        print(f"ip link set {state}: {result.stderr}", file=sys.stderr)


class Watched:
    """A UeventWatcher on its own thread, as the vendor runs it; each rescan's events go to a queue."""

    def __init__(self, links: Any) -> None:
        from dpkit.core import UeventWatcher
        from dpkit.sfc.udev import WATCHED_SUBSYSTEMS, relevant

        self.batches: queue.Queue[list[list[str]]] = queue.Queue()
        self.stop, listening = threading.Event(), threading.Event()
        watcher = UeventWatcher(self.rescan, interval=3600, subsystems=WATCHED_SUBSYSTEMS, source="kernel",
                                accept=relevant, sources=[links])
        self.thread = threading.Thread(target=watcher.run, args=(self.stop, listening))
        self.thread.start()
        listening.wait(10)

    def rescan(self, reason: str, events: Any) -> None:
        if reason == "uevent":
            self.batches.put([list(e) for e in events])

    def wait(self, timeout: float) -> list[list[str]]:
        try:
            return self.batches.get(timeout=timeout)
        except queue.Empty:
            return []

    def close(self) -> None:
        self.stop.set()
        self.thread.join(10)


def main() -> None:
    kind = make_link()
    if kind is None:
        report({"skip": "cannot create a dummy or veth link in the new network namespace"})
        return
    from dpkit.sfc.rtnl import open_link_monitor

    # the vendor's link monitor ignores software links (pod veths); this one counts the test link
    links, error = open_link_monitor({kind})
    default_links, _ = open_link_monitor()
    if links is None or default_links is None:
        report({"skip": error})
        return
    monitor, default = Watched(links), Watched(default_links)
    latencies, seen = [], []
    for state in TOGGLES:
        for _ in range(10):  # let messages from the last toggle (linkwatch runs later) pass
            if not monitor.wait(0.3):
                break
        fired = threading.Event()
        started = [0.0]
        thread = threading.Thread(target=toggle, args=(state, started, fired))
        called = time.perf_counter()
        thread.start()
        events = monitor.wait(TIMEOUT)
        woke = time.perf_counter()
        thread.join(15)
        seen.append(events)
        latencies.append({"state": state, "woke_after_s": round(woke - called, 4), "fired": fired.is_set(),
                          "latency_ms": round((woke - started[0]) * 1000, 2) if fired.is_set() else None})
    # the same messages, through a monitor as the vendor opens it: software links wake nothing
    ignored = default.wait(0.5)
    monitor.close()
    default.close()
    report({"kind": kind, "timeout_s": TIMEOUT, "latencies": latencies, "events": seen, "default_monitor": ignored})


if __name__ == "__main__":
    main()
