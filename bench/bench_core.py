"""Core benchmarks over real gRPC on real unix sockets, with the kubelet emulator.

Run: ``./hatchw run bench:all`` (or ``python bench/bench_core.py [--quick]`` in the env).
Prints one markdown table row per figure; docs/performance.md records a run.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
import yaml
from harness import proc_cpu_seconds, rss_mb

from dpkit.core.api.v1beta1 import api_pb2, api_pb2_grpc
from dpkit.core.engine.manager import Manager
from dpkit.core.support.config import Config
from dpkit.core.tools.kubelet import Kubelet
from dpkit.core.vendorapi.device import ContainerSpec, Device, DeviceNode, Health, Snapshot
from dpkit.core.vendorapi.vendor import EventSink, Vendor

RES = "example.com/bench"
ROWS: list[tuple[str, str, str]] = []


def row(name: str, value: str, target: str = "") -> None:
    ROWS.append((name, value, target))
    print(f"| {name} | {value} | {target} |", flush=True)


def pct(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


class BenchVendor(Vendor):
    name = "bench"
    poll_interval = 0.0

    def __init__(self, count: int) -> None:
        super().__init__({})
        self.devices = tuple(
            Device(f"dev-{i:05d}", numa_nodes=(i % 2,),
                   spec=ContainerSpec(devices=(DeviceNode("/dev/null", f"/dev/bench{i}"),),
                                      env={"BENCH_DEVICES": f"dev-{i:05d}"}))
            for i in range(count))
        self.sink: EventSink | None = None
        self.ready = threading.Event()

    def discover(self) -> Snapshot:
        return {RES: self.devices}

    def watch(self, sink: EventSink, stop: threading.Event) -> None:
        self.sink = sink
        self.ready.set()
        stop.wait()


@contextmanager
def node(count: int) -> Iterator[tuple[Kubelet, Manager, BenchVendor, Path]]:
    tmp = Path(tempfile.mkdtemp(prefix="dpkb-", dir="/tmp"))
    kubelet = Kubelet(tmp / "dp").start()
    vendor = BenchVendor(count)
    manager = Manager(vendor, Config(plugin_dir=str(tmp / "dp"), state_dir=str(tmp / "st")))
    manager.start()
    try:
        assert kubelet.wait_for(lambda k: k.capacity(RES) == count, 60), "plugin never registered"
        assert vendor.ready.wait(10)
        yield kubelet, manager, vendor, tmp
    finally:
        manager.stop()
        kubelet.stop()
        shutil.rmtree(tmp, ignore_errors=True)


def stub_for(tmp: Path) -> tuple[grpc.Channel, api_pb2_grpc.DevicePluginStub]:
    channel = grpc.insecure_channel(f"unix://{tmp / 'dp' / 'dpkit-example.com_bench.sock'}")
    return channel, api_pb2_grpc.DevicePluginStub(channel)


def bench_allocate(calls: int) -> None:
    with node(64) as (_, _, _, tmp):
        channel, stub = stub_for(tmp)
        container = api_pb2.ContainerAllocateRequest(devices_ids=["dev-00001"])
        request = api_pb2.AllocateRequest(container_requests=[container])
        for _ in range(200):  # warm up
            stub.Allocate(request)
        samples = []
        for _ in range(calls):
            t0 = time.perf_counter()
            stub.Allocate(request)
            samples.append((time.perf_counter() - t0) * 1000)
        channel.close()
    row(f"Allocate latency, 1 device ({calls} calls)",
        f"p50 {pct(samples, 0.5):.3f} ms, p99 {pct(samples, 0.99):.3f} ms", "p99 < 2 ms")


def bench_list_and_watch(count: int) -> None:
    with node(count) as (_, _, _, tmp):
        channel, stub = stub_for(tmp)
        t0 = time.perf_counter()
        stream = stub.ListAndWatch(api_pb2.Empty())
        first = next(stream)
        took = (time.perf_counter() - t0) * 1000
        size = first.ByteSize()
        stream.cancel()
        channel.close()
    row(f"ListAndWatch first list, {count} devices", f"{took:.1f} ms, {size / 1024:.0f} KiB", "")


def bench_health(iterations: int, count: int = 100) -> None:
    with node(count) as (_, _, vendor, tmp):
        channel, stub = stub_for(tmp)
        stream = stub.ListAndWatch(api_pb2.Empty())
        next(stream)
        assert vendor.sink is not None
        samples = []
        for i in range(iterations):
            health = Health.UNHEALTHY if i % 2 == 0 else Health.HEALTHY
            t0 = time.perf_counter()
            vendor.sink.health(RES, "dev-00003", health, "bench")
            while True:
                update = next(stream)
                if any(d.ID == "dev-00003" and d.health == str(health) for d in update.devices):
                    break
            samples.append((time.perf_counter() - t0) * 1000)
        stream.cancel()
        channel.close()
    row(f"health change -> ListAndWatch ({iterations} changes, {count} devices)",
        f"p50 {pct(samples, 0.5):.2f} ms, p99 {pct(samples, 0.99):.2f} ms", "< 50 ms")


def bench_reregistration(iterations: int) -> None:
    with node(100) as (kubelet, _, _, _):
        samples = []
        for _ in range(iterations):
            t0 = time.perf_counter()
            kubelet.restart()
            assert kubelet.wait_for(lambda k: k.registered(RES) and k.capacity(RES) == 100, 10)
            samples.append((time.perf_counter() - t0) * 1000)
    row(f"re-registration after kubelet restart ({iterations} restarts)",
        f"p50 {statistics.median(samples):.0f} ms, max {max(samples):.0f} ms", "< 1 s")


def bench_preferred(count: int) -> None:
    with node(count) as (_, _, _, tmp):
        channel, stub = stub_for(tmp)
        ids = [f"dev-{i:05d}" for i in range(count)]
        request = api_pb2.PreferredAllocationRequest(container_requests=[
            api_pb2.ContainerPreferredAllocationRequest(available_deviceIDs=ids, allocation_size=8)])
        samples = []
        for _ in range(20):
            t0 = time.perf_counter()
            stub.GetPreferredAllocation(request)
            samples.append((time.perf_counter() - t0) * 1000)
        channel.close()
    row(f"GetPreferredAllocation, {count} available, size 8", f"p50 {statistics.median(samples):.1f} ms", "")


def bench_process(idle_seconds: float, runs: int) -> None:
    """`dpkit run sim` as a real process: start-up to registered, RSS and idle CPU."""
    startups: list[float] = []
    rss = cpu = 0.0
    for run in range(runs):
        tmp = Path(tempfile.mkdtemp(prefix="dpkp-", dir="/tmp"))
        devices = tmp / "devices.yaml"
        devices.write_text(yaml.safe_dump({"resources": {RES: [{"id": f"d{i}", "numa": i % 2} for i in range(8)]}}))
        config = tmp / "config.yaml"
        config.write_text(yaml.safe_dump({"plugin_dir": str(tmp / "dp"), "state_dir": str(tmp / "st"),
                                          "cdi_dir": str(tmp / "cdi"), "nfd_features_dir": str(tmp / "nfd"),
                                          "vendor": {"devices_file": str(devices), "script": False}}))
        kubelet = Kubelet(tmp / "dp").start()
        t0 = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-m", "dpkit.core.tools.cli", "run", "sim", "-c", str(config)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            assert kubelet.wait_for(lambda k: k.capacity(RES) == 8, 30), "never registered"
            startups.append((time.perf_counter() - t0) * 1000)
            if run == runs - 1:
                time.sleep(1.0)  # let start-up work settle before measuring idle
                c0, w0 = proc_cpu_seconds(proc.pid), time.monotonic()
                time.sleep(idle_seconds)
                cpu = (proc_cpu_seconds(proc.pid) - c0) / (time.monotonic() - w0) * 100
                rss = rss_mb(proc.pid)
        finally:
            proc.terminate()
            proc.wait(10)
            kubelet.stop()
            shutil.rmtree(tmp, ignore_errors=True)
    row(f"start-up to registered, `dpkit run` process ({runs} runs)",
        f"median {statistics.median(startups):.0f} ms", "")
    row("RSS of `dpkit run sim` (8 devices, idle)", f"{rss:.1f} MB", "< 60 MB")
    row(f"idle CPU of `dpkit run sim` over {idle_seconds:.0f} s", f"{cpu:.2f} %", "< 0.5 %")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer iterations (smoke run)")
    args = parser.parse_args()
    quick = args.quick
    print("| figure | result | target |\n|---|---|---|")
    steps: list[Callable[[], None]] = [
        lambda: bench_allocate(1000 if quick else 10000),
        lambda: bench_list_and_watch(1000),
        lambda: bench_list_and_watch(10000),
        lambda: bench_health(50 if quick else 500),
        lambda: bench_reregistration(5 if quick else 20),
        lambda: bench_preferred(1000 if quick else 10000),
        lambda: bench_process(3 if quick else 20, 2 if quick else 5),
    ]
    for step in steps:
        step()
    return 0


if __name__ == "__main__":
    sys.exit(main())
