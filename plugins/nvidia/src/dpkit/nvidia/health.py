"""The NVML health probe: runs in its own process (``dpkit.nvidia.health:run``), since NVML calls
can hang on a broken GPU.

It waits for NVML events (critical XIDs, double-bit ECC errors) and reads every GPU each
``health_interval``. A critical XID or ECC error marks the GPU's devices (or only the MIG
device the event names) Unhealthy; a lost GPU or an NVML call that does not return within
``nvml_timeout`` does too. Going beyond NVIDIA's plugin, a GPU that went away (lost, needing a
reset, hanging) and answers again has been reset: its marks are cleared, its devices become
Healthy again and a log line says why. Marks are kept in ``health_state_file`` so a restarted
probe does not forget an XID.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pynvml

from dpkit.core import DpkitError, Health, ProbeContext, get_logger, kv, setup_logging
from dpkit.nvidia import inventory, nvml
from dpkit.nvidia.config import Settings, load_settings
from dpkit.nvidia.gpus import NodeReader
from dpkit.nvidia.guard import Guard, Hung

log = get_logger("nvidia.health")

ALL_INSTANCES = 0xFFFFFFFF
EVENT_WAIT_MS = 1000
MAX_STUCK = 4  # NVML calls stuck at once before the probe gives up and lets the core restart it

Report = Callable[[str, str, Health, str], None]


@dataclass
class Marks:
    """Why one GPU (key: its UUID) or one MIG instance (``uuid/gi/ci``) is unhealthy."""

    causes: dict[str, str] = field(default_factory=dict)  # "xid" | "ecc" | "lost" -> reason
    went_away: bool = False


class Monitor:
    """The probe's state machine; ``run`` drives it, tests can drive it directly."""

    def __init__(self, settings: Settings, report: Report, guard: Guard) -> None:
        self.settings = settings
        self.report = report
        self.guard = guard
        self.reader = NodeReader(settings.nvml_library, settings.sysfs_root, guard)
        self.marks: dict[str, Marks] = self._load()
        self.sent: dict[tuple[str, str], tuple[Health, str]] = {}
        self.devices: dict[tuple[str, str], Mapping[str, str]] = {}  # (resource, id) -> attributes
        self.event_set: Any = None
        self.registered: set[str] = set()  # GPUs whose registration was tried
        self.listening: set[str] = set()  # GPUs whose events actually arrive
        self._wait_error = ""

    # -- persistence ---------------------------------------------------------------------
    def _load(self) -> dict[str, Marks]:
        path = self.settings.health_state_file
        if not path:
            return {}
        try:
            raw = json.loads(Path(path).read_text())
            return {str(k): Marks({str(c): str(r) for c, r in v["causes"].items()}, bool(v["went_away"]))
                    for k, v in raw.items()}
        except FileNotFoundError:
            return {}
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            log.warning("health state file unreadable; starting afresh", extra=kv(path=path, error=str(exc)))
            return {}

    def _save(self) -> None:
        path = self.settings.health_state_file
        if not path:
            return
        data = {k: {"causes": m.causes, "went_away": m.went_away} for k, m in self.marks.items() if m.causes}
        try:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            tmp = f"{path}.tmp"
            Path(tmp).write_text(json.dumps(data, indent=1, sort_keys=True))
            os.replace(tmp, path)
        except OSError as exc:
            log.warning("cannot save health state; XID marks will not survive a probe restart",
                        extra=kv(path=path, error=exc.strerror or str(exc)))

    # -- reading the node ----------------------------------------------------------------------
    def refresh(self) -> None:
        """Read every GPU; record lost/hung ones and clear the marks of GPUs that came back."""
        node = self.reader.read(topology=False)
        built = inventory.build(self.settings, node)
        self.devices = {(r, d.id): d.attributes for r, devs in built.snapshot.items() for d in devs}
        changed = False
        for gpu in node.gpus:
            marks = self.marks.setdefault(gpu.uuid, Marks())
            if gpu.problem:
                if marks.causes.get("lost") != gpu.problem:
                    log.warning("GPU unusable; marking its devices Unhealthy", extra=kv(gpu=gpu.uuid, why=gpu.problem))
                    marks.causes["lost"] = gpu.problem
                    marks.went_away = True
                    self.registered.discard(gpu.uuid)
                    self.listening.discard(gpu.uuid)
                    changed = True
            elif marks.went_away:
                cleared = sorted(set(marks.causes) | self._instance_causes(gpu.uuid))
                log.info("GPU answers NVML again after going away (a reset or recovery); marking its devices "
                         "Healthy again", extra=kv(gpu=gpu.uuid, cleared=",".join(cleared) or "-"))
                self._clear(gpu.uuid)
                changed = True
        if changed:
            self._save()
        self._register(node)
        self.publish()

    def _instance_causes(self, gpu_uuid: str) -> set[str]:
        return {c for key, m in self.marks.items() if key.startswith(gpu_uuid + "/") for c in m.causes}

    def _clear(self, gpu_uuid: str) -> None:
        for key in [k for k in self.marks if k == gpu_uuid or k.startswith(gpu_uuid + "/")]:
            del self.marks[key]

    # -- events ----------------------------------------------------------------------------------
    def _register(self, node: Any) -> None:
        wanted = {g.uuid for g in node.gpus if not g.problem}
        if wanted <= self.registered and self.event_set is not None:
            return
        if self.event_set is not None and not (self.registered <= wanted):
            self._free_events()
        if self.event_set is None:
            self.event_set = self.guard.call("events", pynvml.nvmlEventSetCreate)
            self.registered, self.listening = set(), set()
        mask = pynvml.nvmlEventTypeXidCriticalError | pynvml.nvmlEventTypeDoubleBitEccError
        for uuid in sorted(wanted - self.registered):
            self.registered.add(uuid)  # tried once per event set, not every round
            try:
                self.guard.call(f"register {uuid}", _register_gpu, uuid, mask, self.event_set)
                self.listening.add(uuid)
            except (nvml.NVMLError, Hung) as exc:
                log.warning("GPU health events unavailable; lost and hung GPUs are still detected",
                            extra=kv(gpu=uuid, error=str(exc)))

    def _free_events(self) -> None:
        event_set, self.event_set = self.event_set, None
        self.registered, self.listening = set(), set()
        try:
            self.guard.call("events", pynvml.nvmlEventSetFree, event_set)
        except (nvml.NVMLError, Hung) as exc:
            log.debug("freeing the event set failed", extra=kv(error=str(exc)))

    def wait_event(self, timeout_ms: int = EVENT_WAIT_MS) -> bool:
        """Handle at most one event; True when the node should be re-read (an NVML error)."""
        if self.event_set is None or not self.listening:
            time.sleep(timeout_ms / 1000)
            return False
        try:
            data = self.guard.call("events", pynvml.nvmlEventSetWait, self.event_set, timeout_ms,
                                   timeout=self.settings.nvml_timeout + timeout_ms / 1000)
        except nvml.NVMLError as exc:
            if nvml.is_error(exc, "NVML_ERROR_TIMEOUT"):
                self._wait_error = ""
                return False
            if self._wait_error != nvml.error_name(exc):  # once per distinct error, not every second
                self._wait_error = nvml.error_name(exc)
                log.warning("waiting for NVML events failed; re-reading every GPU", extra=kv(error=self._wait_error))
            time.sleep(timeout_ms / 1000)
            return True
        self._wait_error = ""
        try:
            uuid = nvml.text(self.guard.call("event device", pynvml.nvmlDeviceGetUUID, data.device))
        except (nvml.NVMLError, Hung) as exc:
            log.warning("event for a GPU that does not answer; re-reading every GPU", extra=kv(error=str(exc)))
            return True
        self.handle(uuid, int(data.eventType), int(data.eventData), int(data.gpuInstanceId),
                    int(data.computeInstanceId))
        return False

    def handle(self, gpu_uuid: str, event_type: int, data: int, gi: int = ALL_INSTANCES,
               ci: int = ALL_INSTANCES) -> None:
        """Apply one NVML event to the marks and report the devices it affects."""
        if event_type & pynvml.nvmlEventTypeXidCriticalError:
            if not self.settings.xids.is_critical(data):
                log.info("ignoring XID (not critical by configuration)", extra=kv(gpu=gpu_uuid, xid=data))
                return
            kind, reason = "xid", f"XID {data} (critical error) reported by NVML"
        elif event_type & pynvml.nvmlEventTypeDoubleBitEccError:
            kind, reason = "ecc", "double-bit ECC error reported by NVML"
        else:
            return
        key = gpu_uuid if ALL_INSTANCES in (gi, ci) else f"{gpu_uuid}/{gi}/{ci}"
        log.warning("GPU error; marking devices Unhealthy", extra=kv(gpu=gpu_uuid, reason=reason, instance=key))
        self.marks.setdefault(key, Marks()).causes[kind] = reason
        self._save()
        self.publish()

    # -- reporting -------------------------------------------------------------------------------
    def publish(self) -> None:
        """Send each device's health when it differs from what was last sent."""
        for (resource, device_id), attrs in self.devices.items():
            gpu = attrs.get("gpu", "")
            keys = [gpu]
            if "gi" in attrs:
                keys.append(f"{gpu}/{attrs['gi']}/{attrs['ci']}")
            reasons = [r for k in keys if k in self.marks for r in self.marks[k].causes.values()]
            state = (Health.UNHEALTHY, "; ".join(reasons)) if reasons else (Health.HEALTHY, "")
            if self.sent.get((resource, device_id)) != state:
                self.report(resource, device_id, state[0], state[1])
                self.sent[(resource, device_id)] = state

    def close(self) -> None:
        if self.event_set is not None and not self.guard.stuck():
            self._free_events()
        self.reader.close()


def _register_gpu(uuid: str, mask: int, event_set: Any) -> None:
    handle = pynvml.nvmlDeviceGetHandleByUUID(uuid)
    supported = int(pynvml.nvmlDeviceGetSupportedEventTypes(handle))
    pynvml.nvmlDeviceRegisterEvents(handle, mask & supported, event_set)


def run(ctx: ProbeContext) -> None:
    """Probe entry point: loop until asked to stop, beating between every step."""
    setup_logging(os.environ.get("DPKIT_LOG_FORMAT", "human"), os.environ.get("DPKIT_LOG_LEVEL", "info"))
    try:
        settings = load_settings(ctx.config.get("vendor", {}))
    except DpkitError as exc:
        log.error("health probe cannot start: bad configuration", extra=kv(error=str(exc)))
        return
    guard = Guard(settings.nvml_timeout, tick=ctx.heartbeat)
    monitor = Monitor(settings, ctx.health, guard)
    next_read = 0.0
    try:
        while not ctx.should_stop():
            ctx.heartbeat()
            if len(guard.stuck()) >= MAX_STUCK or "events" in guard.stuck():
                log.error("NVML is wedged; ending the probe so it is restarted",
                          extra=kv(stuck=",".join(sorted(guard.stuck()))))
                return
            if time.monotonic() >= next_read:
                next_read = time.monotonic() + settings.health_interval
                try:
                    monitor.refresh()
                except (DpkitError, nvml.NVMLError, Hung) as exc:
                    log.warning("cannot read the GPUs; retrying", extra=kv(error=str(exc)))
                    time.sleep(min(1.0, settings.health_interval))
                    continue
            if monitor.wait_event(min(EVENT_WAIT_MS, max(10, int(settings.health_interval * 1000)))):
                next_read = 0.0
    except Hung as exc:
        log.error("NVML event wait hung; ending the probe so it is restarted", extra=kv(error=str(exc)))
    finally:
        if not guard.stuck():
            monitor.close()
