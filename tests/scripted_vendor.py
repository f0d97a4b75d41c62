"""A vendor the tests drive by hand: set devices, push health events, count calls."""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from typing import Any

from dpkit.core.vendorapi.device import ContainerSpec, Device, DeviceNode, Health, Snapshot
from dpkit.core.vendorapi.vendor import EventSink, Probe, Vendor

RES = "example.com/widget"


def widget(i: int, numa: int = 0, health: Health = Health.HEALTHY) -> Device:
    return Device(
        id=f"w{i}",
        health=health,
        numa_nodes=(numa,),
        spec=ContainerSpec(devices=(DeviceNode("/dev/null", f"/dev/w{i}"),), env={"WIDGETS": f"w{i}"}),
    )


class ScriptedVendor(Vendor):
    name = "scripted"
    poll_interval = 0.0

    def __init__(self, config: Mapping[str, Any] | None = None, snapshot: Snapshot | None = None) -> None:
        super().__init__(config)
        default = {RES: tuple(widget(i, i // 2) for i in range(4))}
        self.current: dict[str, tuple[Device, ...]] = dict(snapshot or default)
        self.sink: EventSink | None = None
        self.sink_ready = threading.Event()
        self.pre_started: list[tuple[str, tuple[str, ...]]] = []
        self.discover_error: Exception | None = None

    def discover(self) -> Snapshot:
        if self.discover_error is not None:
            raise self.discover_error
        return dict(self.current)

    def watch(self, sink: EventSink, stop: threading.Event) -> None:
        self.sink = sink
        self.sink_ready.set()
        stop.wait()

    def push(self, snapshot: Snapshot) -> None:
        """Publish a new snapshot through the event bus, as a hotplug watcher would."""
        assert self.sink_ready.wait(5), "watch thread never started"
        self.current = dict(snapshot)
        assert self.sink is not None
        self.sink.snapshot(self.current)

    def set_health(self, device_id: str, health: Health, reason: str = "", resource: str = RES) -> None:
        assert self.sink_ready.wait(5), "watch thread never started"
        assert self.sink is not None
        self.sink.health(resource, device_id, health, reason)


class PreStartVendor(ScriptedVendor):
    def pre_start(self, resource: str, devices: Sequence[Device]) -> None:
        self.pre_started.append((resource, tuple(d.id for d in devices)))
        if any(d.id == "w3" for d in devices):
            raise RuntimeError("w3 refuses to start")


class BadPreferenceVendor(ScriptedVendor):
    def preferred_allocation(
        self, resource: str, available: Sequence[Device], must_include: Sequence[Device], size: int
    ) -> Sequence[str] | None:
        return ["nonexistent"] * size


def hanging_probe(ctx: Any) -> None:
    """Beats until the file named in config appears, then hangs like a stuck driver call."""
    import os
    import time

    while not ctx.should_stop():
        if os.path.exists(ctx.config["hang_flag"]):
            time.sleep(3600)
        ctx.heartbeat()
        time.sleep(0.05)


def reporting_probe(ctx: Any) -> None:
    """Reports w1 unhealthy once, then only beats."""
    import time

    ctx.health(RES, "w1", "Unhealthy", "probe saw an XID 79")
    while not ctx.should_stop():
        ctx.heartbeat()
        time.sleep(0.05)


class ProbedVendor(ScriptedVendor):
    def __init__(self, config: Mapping[str, Any] | None = None, probe: Probe | None = None) -> None:
        super().__init__(config)
        self.probe = probe

    def probes(self) -> Sequence[Probe]:
        return [self.probe] if self.probe else []
