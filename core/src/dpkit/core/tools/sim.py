"""The built-in simulated vendor: devices from a YAML file, with scripted health changes and hotplug.

It drives ``dpkit demo`` and the core's tests, and is the smallest complete example of a vendor.
Config (the ``vendor:`` section): ``devices_file`` (default: the embedded demo node),
``device_node`` (host device node given to containers, default ``/dev/null``),
``script`` (true to play the file's script, default true).

Booleans are strict (YAML ``true``/``false`` only): a quoted ``'false'`` is a string, and reading
it as true would advertise a device the file says is broken.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any

from dpkit.core.support.config import parse_yaml, read_text
from dpkit.core.support.schema import Section, load_section, show
from dpkit.core.vendorapi.device import ContainerSpec, Device, DeviceNode, Health, Snapshot
from dpkit.core.vendorapi.errors import ConfigError, ValidationError
from dpkit.core.vendorapi.vendor import EventSink, Finding, Vendor

DEFAULT_FILE = "demo.yaml"
MAX_KEPT_SPECS = 256  # one-device specs the sim keeps, most recently asked first (see container_spec)


def _flag(value: Any, where: str) -> bool:
    """A YAML boolean and nothing else."""
    if isinstance(value, bool):
        return value
    hint = " (quoted, so a string: write true or false without quotes)" if isinstance(value, str) else ""
    raise ConfigError(f"{where}: expected true or false, got {type(value).__name__} {show(value)}{hint}")


class SimSettings(Section, frozen=True):
    """The ``vendor:`` section of the simulated vendor."""

    devices_file: str | None = None  # None: the embedded demo node
    device_node: str = "/dev/null"
    script: bool = True


def _load(config: SimSettings) -> tuple[dict[str, list[dict[str, Any]]], list[dict[str, Any]], str]:
    path = config.devices_file
    if path is None:
        from importlib import resources  # only for the embedded node: it loads zipfile and tempfile (1.5 MB)

        text = resources.files("dpkit.core.tools").joinpath("data", DEFAULT_FILE).read_text()
        where = f"<embedded {DEFAULT_FILE}>"
    else:
        where = str(path)
        text = read_text(path, "vendor.devices_file")
    data = parse_yaml(text, where) or {}
    if not isinstance(data, dict) or not isinstance(data.get("resources"), dict):
        raise ConfigError(f"{where}: expected a 'resources' mapping of resource name -> device list")
    script = data.get("script", [])
    if not isinstance(script, list):
        raise ConfigError(f"{where}: 'script' must be a list of steps")
    return data["resources"], script, where


class SimulatedVendor(Vendor):
    """A vendor with no hardware: the demo and the tests' stand-in for a driver."""

    name = "sim"
    description = "simulated devices from a YAML file (demo and tests)"
    poll_interval = 0.0
    inline_hooks = frozenset({"container_spec"})  # built from the device IDs in memory

    def __init__(self, config: Mapping[str, Any] | None = None) -> None:
        super().__init__(config)
        settings = load_section(self.config, SimSettings, root="vendor")
        self.device_node = settings.device_node
        self.play_script = settings.script
        raw, self.script, self.where = _load(settings)
        self._lock = threading.Lock()
        self._devices: dict[str, dict[str, Device]] = {}
        # model -> the attributes map of the first device of that model, shared by the rest
        self._attributes: dict[str, Mapping[str, str]] = {}
        self._specs: OrderedDict[str, ContainerSpec] = OrderedDict()  # recent one-device specs
        self._specs_lock = threading.Lock()
        for resource, entries in raw.items():
            if not isinstance(entries, list):
                raise ConfigError(f"{self.where}: resources.{resource}: expected a list of devices")
            self._devices[resource] = {}
            for index, entry in enumerate(entries):
                device = self._device(entry, f"resources.{resource}[{index}]")
                self._devices[resource][device.id] = device
        for index, step in enumerate(self.script):
            self._check_step(step, f"script[{index}]")
        self.script_done = threading.Event()

    def _check_step(self, step: Any, where: str) -> None:
        """Every step checked at load, so a typo fails ``dpkit run`` instead of the watch thread later."""
        if not isinstance(step, dict):
            raise ConfigError(f"{self.where}: {where}: expected a mapping (health, add or remove)")
        try:
            float(step.get("at", 0))
        except (TypeError, ValueError, OverflowError):
            raise ConfigError(f"{self.where}: {where}.at: expected seconds, got {show(step.get('at'))}") from None
        for kind, keys in (("health", ("resource", "id")), ("add", ("resource", "device")),
                           ("remove", ("resource", "id"))):
            if kind not in step:
                continue
            body = step[kind]
            if not isinstance(body, dict) or any(k not in body for k in keys):
                raise ConfigError(f"{self.where}: {where}.{kind}: expected a mapping with {' and '.join(keys)}")
            if kind == "health":
                _flag(body.get("healthy", True), f"{self.where}: {where}.health.healthy")
            if kind == "add":
                self._device(body["device"], f"{where}.add.device")
            return
        raise ConfigError(f"{self.where}: {where}: expected one of health, add, remove")

    def _device(self, entry: Any, where: str) -> Device:
        if not isinstance(entry, dict) or "id" not in entry:
            raise ConfigError(f"{self.where}: {where}: expected a mapping with an 'id'")
        try:
            numa = entry.get("numa")
            model = str(entry.get("model", "simulated"))
            device = Device(
                id=str(entry["id"]),
                health=Health.HEALTHY if _flag(entry.get("healthy", True), f"{self.where}: {where}.healthy")
                else Health.UNHEALTHY,
                numa_nodes=() if numa is None else (int(numa),),
                # no spec of its own: container_spec builds it from the IDs (a node and an env map on
                # every device would be about 350 bytes a device, 35 MB at 100k, to repeat its ID)
                attributes=self._attributes.get(model) or {"model": model},
            )
            self._attributes.setdefault(model, device.attributes)
            return device
        except (ValidationError, ValueError, TypeError) as exc:
            raise ConfigError(f"{self.where}: {where}: {exc}") from exc

    def discover(self) -> Snapshot:
        with self._lock:
            return {r: tuple(devs.values()) for r, devs in self._devices.items()}

    def container_spec(self, resource: str, devices: Sequence[Device]) -> ContainerSpec:
        """Each device's node ``/dev/sim/<id>`` and ``SIM_VISIBLE_DEVICES`` listing the IDs.

        The last MAX_KEPT_SPECS one-device specs are kept: the server keeps its encoded answer per
        spec object, so a device allocated again is answered from memory. Only recent ones: the CDI
        writer asks for every device's spec, and keeping them all cost about 240 bytes a device.
        """
        if len(devices) == 1:
            with self._specs_lock:  # RPC threads and the CDI writer ask at once
                if (known := self._specs.get(devices[0].id)) is not None:
                    self._specs.move_to_end(devices[0].id)
                    return known
        ids = list(dict.fromkeys(d.id for d in devices))
        spec = ContainerSpec(devices=tuple(DeviceNode(self.device_node, f"/dev/sim/{i}", "rw") for i in ids),
                             env={"SIM_VISIBLE_DEVICES": ",".join(ids)})
        if len(devices) == 1:
            with self._specs_lock:
                self._specs[devices[0].id] = spec
                if len(self._specs) > MAX_KEPT_SPECS:
                    self._specs.popitem(last=False)
        return spec

    def explain(self) -> Sequence[Finding]:
        return [Finding(subject=self.where, advertised=True, reason="simulated devices, no hardware involved")]

    def watch(self, sink: EventSink, stop: threading.Event) -> None:
        if not self.play_script:
            stop.wait()
            return
        started = time.monotonic()
        for step in self.script:
            delay = float(step.get("at", 0)) - (time.monotonic() - started)
            if delay > 0 and stop.wait(delay):
                return
            self._play(step, sink)
        self.script_done.set()
        stop.wait()

    def _play(self, step: Mapping[str, Any], sink: EventSink) -> None:
        if "health" in step:
            h = step["health"]
            health = Health.HEALTHY if h.get("healthy", True) else Health.UNHEALTHY
            sink.health(h["resource"], h["id"], health, str(h.get("reason", "")))
            return
        with self._lock:
            if "add" in step:
                a = step["add"]
                device = self._device(a["device"], "script add")
                self._devices.setdefault(a["resource"], {})[device.id] = device
            elif "remove" in step:
                r = step["remove"]
                self._devices.get(r["resource"], {}).pop(r["id"], None)
        sink.snapshot(self.discover())
