"""Health bursts (issue 12): does the kubelet's view catch up with the last report of every device, and when?

A real ``dpkit run simbench`` process (see benchvendor.py) serves N devices to an emulated
kubelet (``dpkit.core.tools.kubelet.Kubelet``, in this process). Its watch thread turns side-channel
commands into ``EventSink.health`` reports, the path a vendor's watcher takes. Two cases:

- ``all-unhealthy-then-healthy``: every device of 5k reported Unhealthy as fast as the sink takes
  it, then (``--delay`` s after, 10 s instead of the issue's 60 s) every device Healthy;
- ``flap``: 1,000 reports per second for 10 s, each toggling a random one of 1k devices.

After each burst, against the last report of every device (from the vendor's own record):
time from the burst's end until the kubelet's view equals it and until ``status`` (the control
socket's reply, as ``dpkit status`` asks it) equals it, the devices still wrong 1 s after the
end, and the control socket's answer latency from the burst's start until both caught up (a
poller asks ``status`` every ``--poll`` s, and at once when a burst ends, with the 3 s timeout
``dpkit status`` uses; so the ``status`` catch-up time is only as fine as ``--poll``). Each
case ends with one real ``dpkit status --json`` compared with the last reports.

Run: ``./hatchw run bench:all burst`` or ``python bench/bench_burst.py [--quick]``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness import RESOURCE, DpkitProcess, bench_env, pct
from sidechannel import Client

from dpkit.core.engine.control import query
from dpkit.core.tools.kubelet import Kubelet
from dpkit.core.vendorapi.errors import DpkitError

Expected = dict[str, bool]  # device -> last report was Healthy


def wrong_in(view: dict[str, str], expected: Expected) -> int:
    """Devices whose health in ``view`` is not their last report (a missing device counts as wrong)."""
    return sum(1 for device_id, healthy in expected.items()
               if view.get(device_id) != ("Healthy" if healthy else "Unhealthy"))


def status_view(status: dict[str, Any]) -> dict[str, str]:
    for resource in status.get("resources", []):
        if resource.get("name") == RESOURCE:
            return {d["id"]: d["health"] for d in resource.get("devices", [])}
    return {}


@dataclass
class Answer:
    asked: float
    answered: float
    epoch: int  # which expected state the reply was checked against (0: none yet)
    wrong: int | None  # None: timed out, or asked before any expected state was known


@dataclass
class StatusPoller:
    """Asks the control socket for ``status`` every ``interval`` s and checks each reply."""

    state_dir: Path
    interval: float
    timeout: float = 3.0
    answers: list[Answer] = field(default_factory=list)
    expected: Expected | None = None
    epoch: int = 0
    stop: threading.Event = field(default_factory=threading.Event)
    wake: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None

    def start(self) -> StatusPoller:
        self.thread = threading.Thread(target=self._run, name="status-poller", daemon=True)
        self.thread.start()
        return self

    def _run(self) -> None:
        while not self.stop.is_set():
            expected, epoch = self.expected, self.epoch
            asked = time.monotonic()
            try:
                view = status_view(query(self.state_dir, "status", timeout=self.timeout)["status"])
                wrong: int | None = None if expected is None else wrong_in(view, expected)
            except DpkitError:
                view, wrong = {}, None
            self.answers.append(Answer(asked, time.monotonic(), epoch, wrong))
            self.wake.wait(max(0.0, asked + self.interval - time.monotonic()))
            self.wake.clear()

    def expect(self, expected: Expected) -> None:
        """Check later replies against ``expected``; replies checked against an older one no longer count."""
        self.expected, self.epoch = expected, self.epoch + 1
        self.wake.set()  # ask at once rather than at the next tick

    def _current(self, answer: Answer) -> bool:
        return answer.epoch == self.epoch and answer.wrong is not None

    def first_equal(self, after: float, deadline: float) -> float | None:
        """Wait until a reply answered after ``after`` shows no wrong device; its answer time, or None."""
        seen = 0
        while time.monotonic() < deadline:
            for answer in self.answers[seen:]:
                if answer.answered >= after and self._current(answer) and answer.wrong == 0:
                    return answer.answered
            seen = len(self.answers)
            time.sleep(self.interval / 4)
        return None

    def wrong_at(self, when: float, deadline: float) -> Answer | None:
        """The first reply answered at or after ``when`` (None when none came before ``deadline``)."""
        while time.monotonic() < deadline:
            for answer in self.answers:
                if answer.answered >= when and self._current(answer):
                    return answer
            time.sleep(self.interval / 4)
        return None

    def latencies(self, since: float, until: float) -> tuple[list[float], int]:
        """Answer times (ms) of queries asked in [since, until], and how many timed out."""
        asked = [a for a in self.answers if since <= a.asked <= until]
        timed_out = sum(1 for a in asked if a.answered - a.asked >= self.timeout)
        return [(a.answered - a.asked) * 1000 for a in asked], timed_out

    def close(self) -> None:
        self.stop.set()
        self.wake.set()
        if self.thread is not None:
            self.thread.join(self.timeout + 2)


@dataclass
class Outcome:
    """What one burst left behind, relative to its end."""

    case: str
    devices: int
    events: int
    burst_s: float
    kubelet_s: float | None
    status_s: float | None
    wrong_kubelet_1s: int
    wrong_status_1s: int | None
    latencies_ms: list[float]
    timeouts: int
    waited_s: float


def kubelet_wrong(kubelet: Kubelet, expected: Expected) -> int:
    return wrong_in({i: d.health for i, d in kubelet.devices(RESOURCE).items()}, expected)


def settle(case: str, kubelet: Kubelet, poller: StatusPoller, reply: dict[str, Any], window: float) -> Outcome:
    """Follow the kubelet's view and ``status`` after a burst for up to ``window`` seconds."""
    t0, t1, expected = reply["t0"], reply["t1"], reply["final"]
    poller.expect(expected)
    deadline = t1 + window
    seen: list[float] = []

    def equal(k: Kubelet) -> bool:
        if kubelet_wrong(k, expected) == 0:
            seen.append(time.monotonic())
            return True
        return False

    # the kubelet's view at +1 s: converged by then, or sampled at +1 s
    one_s = t1 + 1.0
    if kubelet.wait_for(equal, max(0.0, one_s - time.monotonic())):
        wrong_1s = 0
    else:
        wrong_1s = kubelet_wrong(kubelet, expected)
        kubelet.wait_for(equal, max(0.0, deadline - time.monotonic()))
    kubelet_at = seen[0] if seen else None
    status_at = poller.first_equal(t1, deadline)
    status_1s = poller.wrong_at(one_s, max(deadline, one_s + poller.timeout + 1))
    until = max(kubelet_at or deadline, status_at or deadline)  # both caught up, or the window ended
    latencies, timeouts = poller.latencies(t0, until)
    return Outcome(case, len(expected), reply["events"], t1 - t0,
                   None if kubelet_at is None else max(0.0, kubelet_at - t1),
                   None if status_at is None else max(0.0, status_at - t1),
                   wrong_1s, None if status_1s is None else status_1s.wrong,
                   latencies, timeouts, window)


def report(o: Outcome) -> list[str]:
    def after(value: float | None) -> str:
        return f"not within {o.waited_s:g} s" if value is None else f"{value * 1000:.0f} ms"

    lat = (f"p50 {pct(o.latencies_ms, 0.5):.0f} ms, p99 {pct(o.latencies_ms, 0.99):.0f} ms, "
           f"max {max(o.latencies_ms):.0f} ms, {o.timeouts} of {len(o.latencies_ms)} timed out (3 s)"
           if o.latencies_ms else "no query asked")
    status_1s = "no answer" if o.wrong_status_1s is None else str(o.wrong_status_1s)
    return [
        f"| {o.case} | burst: {o.events:,} reports in {o.burst_s * 1000:.1f} ms, {o.devices:,} devices | |",
        f"| {o.case} | burst end -> kubelet's view equals the last reports | {after(o.kubelet_s)} | < 1 s |",
        f"| {o.case} | burst end -> `status` equals the last reports | {after(o.status_s)} | < 1 s |",
        f"| {o.case} | devices wrong 1 s after the burst end: kubelet / `status` | {o.wrong_kubelet_1s} / {status_1s}"
        " | 0 / 0 |",
        f"| {o.case} | control socket `status` answer during the burst and catch-up | {lat} | answers |",
    ]


@dataclass
class Node:
    tmp: Path
    kubelet: Kubelet
    dpkit: DpkitProcess
    side: Client
    poller: StatusPoller

    def close(self) -> None:
        self.poller.close()
        self.side.close()
        self.dpkit.stop()
        self.kubelet.stop()
        shutil.rmtree(self.tmp, ignore_errors=True)


def start_node(count: int, poll: float) -> Node:
    tmp = Path(tempfile.mkdtemp(prefix="dpkb-", dir="/tmp"))
    env = bench_env(tmp)
    kubelet = Kubelet(tmp / "dp", pod_resources_socket=tmp / "pr" / "kubelet.sock").start()
    dpkit = DpkitProcess(tmp, count, env, pod_resources_socket=tmp / "pr" / "kubelet.sock").start()
    try:
        if not kubelet.wait_for(lambda k: k.capacity(RESOURCE) == count, 300):
            raise RuntimeError(f"dpkit never registered {count} devices\n{dpkit.log_tail()}")
        dpkit.wait_control(30)
        side = Client(dpkit.control, timeout=600)
    except BaseException:
        dpkit.stop()
        kubelet.stop()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return Node(tmp, kubelet, dpkit, side, StatusPoller(dpkit.state_dir, poll).start())


def final_status_check(node: Node, expected: Expected) -> str:
    """One real ``dpkit status --json``, as an operator would run it."""
    proc = subprocess.run([sys.executable, "-m", "dpkit.core.tools.cli", "status", "--json", "--state-dir",
                           str(node.dpkit.state_dir)], capture_output=True, text=True, timeout=30, check=False)
    if proc.returncode != 0:
        return f"`dpkit status` failed (exit {proc.returncode}): {proc.stderr.strip()[-200:]}"
    wrong = wrong_in(status_view(json.loads(proc.stdout)), expected)
    return f"{wrong} of {len(expected):,} devices differ from their last report"


def case_all(count: int, delay: float, window: float, poll: float) -> list[str]:
    node = start_node(count, poll)
    try:
        first = node.side.call({"op": "burst", "resource": RESOURCE, "healthy": False})
        lines = report(settle(f"{count:,} all Unhealthy", node.kubelet, node.poller, first, min(window, delay)))
        pause = first["t1"] + delay - time.monotonic()
        if pause > 0:
            time.sleep(pause)  # the "60 s later": the second burst comes at a fixed time, caught up or not
        second = node.side.call({"op": "burst", "resource": RESOURCE, "healthy": True})
        name = f"{count:,} then all Healthy ({delay:g} s later)"
        lines += report(settle(name, node.kubelet, node.poller, second, window))
        lines.append(f"| {name} | final `dpkit status --json` | {final_status_check(node, second['final'])} | 0 |")
        return lines
    finally:
        node.close()


def case_flap(count: int, rate: float, seconds: float, window: float, poll: float) -> list[str]:
    node = start_node(count, poll)
    try:
        reply = node.side.call({"op": "flap", "resource": RESOURCE, "devices": count, "rate": rate,
                                "seconds": seconds, "seed": 12})
        name = f"{count:,} flapping {rate:g}/s for {seconds:g} s"
        lines = report(settle(name, node.kubelet, node.poller, reply, window))
        lines.append(f"| {name} | final `dpkit status --json` | {final_status_check(node, reply['final'])} | 0 |")
        return lines
    finally:
        node.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="300 and 100 devices, short bursts (a smoke run)")
    parser.add_argument("--devices", type=int, help="devices of the all-Unhealthy case (default 5000)")
    parser.add_argument("--delay", type=float, help="seconds between the two bursts (default 10; the issue: 60)")
    parser.add_argument("--flap-devices", type=int, help="devices of the flapping case (default 1000)")
    parser.add_argument("--flap-rate", type=float, help="reports per second (default 1000)")
    parser.add_argument("--flap-seconds", type=float, help="seconds of flapping (default 10)")
    parser.add_argument("--window", type=float, help="seconds to wait for catching up after a burst (default 60)")
    parser.add_argument("--poll", type=float, default=0.1, help="seconds between `status` queries (default 0.1)")
    args = parser.parse_args()
    quick = args.quick
    count = args.devices or (300 if quick else 5000)
    delay = args.delay if args.delay is not None else (1.0 if quick else 10.0)
    window = args.window if args.window is not None else (5.0 if quick else 60.0)
    flap_devices = args.flap_devices or (100 if quick else 1000)
    flap_rate = args.flap_rate or (200.0 if quick else 1000.0)
    flap_seconds = args.flap_seconds or (1.0 if quick else 10.0)
    print("| case | figure | result | target |\n|---|---|---|---|", flush=True)
    for line in case_all(count, delay, window, args.poll):
        print(line, flush=True)
    for line in case_flap(flap_devices, flap_rate, flap_seconds, window, args.poll):
        print(line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
