"""A vendor for tests/core/test_hook_matrix.py whose hooks misbehave on request: they hang or raise.

It implements every optional hook. Its ``vendor:`` config section chooses the bad one:
``hook`` (a hook name) and ``mode``: ``hang`` or ``raise`` for the whole vendor (global hooks), or
``both`` for a per-resource hook, which then hangs for :data:`HANG`, raises for :data:`RAISE` and
works for :data:`GOOD`. ``marks`` names a file where each bad call appends one line, so a test
knows the hook really ran. Loaded by ``dpkit run hookmatrix`` through a real ``dpkit.vendors``
entry point that the test installs on ``PYTHONPATH``.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from dpkit.core import (
    Check,
    ConfigError,
    ContainerSpec,
    Device,
    DeviceNode,
    EventSink,
    Finding,
    MetricSample,
    Probe,
    Snapshot,
    Vendor,
)

NAME = "hookmatrix"
GOOD, HANG, RAISE = "example.com/good", "example.com/hang", "example.com/raise"
RESOURCES = (GOOD, HANG, RAISE)
GLOBAL_HOOKS = ("discover", "watch", "probes", "node_labels", "metric_samples", "explain", "doctor", "close")
PER_RESOURCE_HOOKS = ("container_spec", "preferred_allocation", "pre_start", "cdi_kind")
HOOKS = GLOBAL_HOOKS + PER_RESOURCE_HOOKS
_NEVER = threading.Event()  # never set: a hung hook waits on it like a stuck driver call


def devices(resource: str) -> tuple[Device, ...]:
    prefix = resource.rpartition("/")[2][0]
    return tuple(Device(id=f"{prefix}{i}", numa_nodes=(0,),
                        spec=ContainerSpec(devices=(DeviceNode("/dev/null", f"/dev/hm-{prefix}{i}"),),
                                           env={"HM_VISIBLE": f"{prefix}{i}"}))
                 for i in range(2))


class MatrixVendor(Vendor):
    name = NAME
    poll_interval = 0.0

    def __init__(self, config: Mapping[str, Any] | None = None) -> None:
        super().__init__(config)
        self.hook = str(self.config.get("hook", ""))
        self.mode = str(self.config.get("mode", ""))
        self.marks = str(self.config.get("marks", ""))
        if self.hook and self.hook not in HOOKS:
            raise ConfigError(f"vendor.hook: unknown hook {self.hook!r}")
        if self.mode not in ("", "hang", "raise", "both"):
            raise ConfigError(f"vendor.mode: expected hang, raise or both, got {self.mode!r}")
        if self.config.get("hang_in_init"):  # vendor code the core runs before any hook: the constructor
            self.hook, self.mode = "__init__", "hang"
            self._misbehave("__init__")

    def _misbehave(self, hook: str, resource: str = "") -> None:
        """Hang or raise when ``hook`` is the bad one (for ``resource``, when it is per-resource)."""
        if hook != self.hook:
            return
        mode = self.mode
        if mode == "both":
            mode = {HANG: "hang", RAISE: "raise"}.get(resource, "")
        if not mode:
            return
        if self.marks:
            with open(self.marks, "a") as out:
                out.write(f"{hook} {resource or '-'} {mode}\n")
        if mode == "hang":
            _NEVER.wait()
        raise RuntimeError(f"{NAME} {hook} failed on purpose")

    def discover(self) -> Snapshot:
        self._misbehave("discover")
        return {r: devices(r) for r in RESOURCES}

    def watch(self, sink: EventSink, stop: threading.Event) -> None:
        self._misbehave("watch")
        stop.wait()

    def probes(self) -> Sequence[Probe]:
        self._misbehave("probes")
        return ()

    def container_spec(self, resource: str, devices: Sequence[Device]) -> ContainerSpec:
        self._misbehave("container_spec", resource)
        return super().container_spec(resource, devices)

    def preferred_allocation(self, resource: str, available: Sequence[Device], must_include: Sequence[Device],
                             size: int) -> Sequence[str] | None:
        self._misbehave("preferred_allocation", resource)
        chosen = [d.id for d in must_include]
        chosen += [d.id for d in available if d.id not in chosen][: size - len(chosen)]
        return chosen

    def pre_start(self, resource: str, devices: Sequence[Device]) -> None:
        self._misbehave("pre_start", resource)

    def explain(self) -> Iterable[Finding]:
        self._misbehave("explain")
        return [Finding("hookmatrix node", True, "every resource present")]

    def doctor(self) -> Iterable[Check]:
        self._misbehave("doctor")
        return [Check("hookmatrix driver", True, "loaded")]

    def node_labels(self, snapshot: Snapshot) -> Mapping[str, str]:
        self._misbehave("node_labels")
        return {"example.com/hookmatrix.devices": str(sum(len(d) for d in snapshot.values()))}

    def metric_samples(self) -> Iterable[MetricSample]:
        self._misbehave("metric_samples")
        return [MetricSample("hookmatrix_up", "1 while the test vendor answers.", 1.0)]

    def cdi_kind(self, resource: str) -> str:
        self._misbehave("cdi_kind", resource)
        return f"example.com/{resource.rpartition('/')[2]}"

    def close(self) -> None:
        self._misbehave("close")


def entry_point_site(site: str) -> dict[str, str]:
    """A real installed distribution registering :class:`MatrixVendor` as ``dpkit.vendors`` entry point
    ``hookmatrix``; returns the environment (``PYTHONPATH``) a child process needs to find it."""
    info = os.path.join(site, "dpkit_hookmatrix-0.1.dist-info")
    os.makedirs(info, exist_ok=True)
    with open(os.path.join(info, "METADATA"), "w") as out:
        out.write("Metadata-Version: 2.1\nName: dpkit-hookmatrix\nVersion: 0.1\n")
    with open(os.path.join(info, "entry_points.txt"), "w") as out:
        out.write(f"[dpkit.vendors]\n{NAME} = hook_matrix_vendor:MatrixVendor\n")
    here = os.path.dirname(os.path.abspath(__file__))
    path = os.pathsep.join(p for p in (site, here, os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path}
