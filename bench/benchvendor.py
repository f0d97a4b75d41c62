"""The sim vendor plus a side channel, so a benchmark can inject health reports into a real `dpkit run`.

``dpkit run simbench`` is ``dpkit run sim`` (same devices file, same parsing, same serving path)
whose watch thread also answers :mod:`sidechannel` commands. Every command becomes ordinary
``EventSink.health`` calls from the vendor's watch thread, so a report takes the path a real
vendor's does: watcher -> event bus -> manager -> ListAndWatch, status, CDI, labels.
The bench harness registers it through a ``dpkit.vendors`` entry point in a temporary
``.dist-info`` (see :func:`harness.vendor_site`), as a vendor package would.

Config: the sim vendor's keys, plus ``control`` (the side channel's socket path) and
``generate`` (``{resource: N}``: N more devices built in process, exactly as the sim vendor builds
a devices file's entries, for sizes the core refuses to read from a file).

Commands (``resource`` everywhere; ``healthy`` is a bool):

- ``flip``: one report for ``id``; replies the time it was handed to the sink;
- ``burst``: one report for every device of the resource, as fast as the sink takes them;
- ``flap``: ``rate`` reports per second for ``seconds`` seconds, each toggling a random one of the
  first ``devices`` devices (seeded by ``seed``);

``burst`` and ``flap`` reply with start and end times and the last report of every device.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Mapping
from typing import Any

import sidechannel
from sidechannel import device_ids

from dpkit.core.tools.sim import SimulatedVendor
from dpkit.core.vendorapi.device import Health
from dpkit.core.vendorapi.vendor import EventSink


def _health(healthy: bool) -> Health:
    return Health.HEALTHY if healthy else Health.UNHEALTHY


class SideChannelSim(SimulatedVendor):
    """Simulated devices whose health reports come from a benchmark, on demand."""

    name = "simbench"
    description = "sim vendor driven by a benchmark's side channel (bench/)"

    def __init__(self, config: Mapping[str, Any] | None = None) -> None:
        settings = dict(config or {})
        self.control = str(settings.pop("control", ""))
        generate: dict[str, int] = dict(settings.pop("generate", {}))
        super().__init__(settings)
        for resource, count in generate.items():
            devices = self._devices.setdefault(resource, {})
            for i, device_id in enumerate(device_ids(int(count))):
                devices[device_id] = self._device({"id": device_id, "numa": i % 2}, f"generate[{i}]")
        # the last report sent per device reported on; the others keep the devices file's health.
        # Kept sparse: a dict of every device would be this bench's own 4 MB in dpkit's RSS at 100k.
        self.reported: dict[str, dict[str, bool]] = {res: {} for res in self._devices}

    def _healthy(self, resource: str, device_id: str) -> bool:
        known = self.reported[resource].get(device_id)
        return self._devices[resource][device_id].healthy if known is None else known

    def _final(self, resource: str) -> dict[str, bool]:
        return {device_id: self._healthy(resource, device_id) for device_id in self._devices[resource]}

    def watch(self, sink: EventSink, stop: threading.Event) -> None:
        if not self.control:
            super().watch(sink, stop)
            return
        sidechannel.serve(self.control, lambda command: self._command(command, sink, stop), stop)

    def _report(self, sink: EventSink, resource: str, device_id: str, healthy: bool, reason: str) -> None:
        self.reported[resource][device_id] = healthy
        sink.health(resource, device_id, _health(healthy), "" if healthy else reason)

    def _command(self, command: dict[str, Any], sink: EventSink, stop: threading.Event) -> dict[str, Any]:
        op, resource = command["op"], command["resource"]
        if op == "flip":
            self._report(sink, resource, command["id"], bool(command["healthy"]), "bench flip")
            return {"ok": True, "t": time.monotonic()}
        t0 = time.monotonic()
        if op == "burst":
            healthy = bool(command["healthy"])
            for device_id in list(self._devices[resource]):
                self._report(sink, resource, device_id, healthy, "bench burst")
            events = len(self._devices[resource])
        elif op == "flap":
            events = self._flap(sink, resource, command, stop)
        else:
            raise ValueError(f"unknown op {op!r}")
        t1 = time.monotonic()
        return {"ok": True, "t0": t0, "t1": t1, "events": events, "final": self._final(resource)}

    def _flap(self, sink: EventSink, resource: str, command: dict[str, Any], stop: threading.Event) -> int:
        ids = list(self._devices[resource])[: int(command["devices"])]
        rate, total = float(command["rate"]), int(float(command["rate"]) * float(command["seconds"]))
        rng = random.Random(int(command.get("seed", 0)))
        start, sent = time.monotonic(), 0
        while sent < total and not stop.is_set():
            due = min(total, int((time.monotonic() - start) * rate) + 1)
            while sent < due:
                device_id = rng.choice(ids)
                self._report(sink, resource, device_id, not self._healthy(resource, device_id), "bench flap")
                sent += 1
            pause = sent / rate - (time.monotonic() - start)
            if pause > 0:
                time.sleep(pause)
        return sent
