"""The vendor API: what a hardware vendor's package implements, and how the core finds it.

A vendor only describes devices. It returns whole snapshots (resource name -> devices, each
device carrying its container spec); the core diffs them, serves them to the kubelet, merges
specs on Allocate and handles every registration, restart and stream. Optional abilities are
optional methods: the core checks whether a subclass overrides them.

Vendors are found through the ``dpkit.vendors`` entry-point group, so adding one never edits
the core::

    [project.entry-points."dpkit.vendors"]
    acme = "dpkit.acme.vendor:AcmeVendor"
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

from dpkit.core.vendorapi.device import ContainerSpec, Device, Health, Snapshot, merge_specs


class EventSink(Protocol):
    """Where a vendor's in-process watcher reports changes; backed by the core's event bus."""

    def snapshot(self, snapshot: Snapshot) -> None:
        """A new complete view of the vendor's devices (hotplug, removal, attribute change)."""

    def health(self, resource: str, device_id: str, health: Health, reason: str = "") -> None:
        """One device's health changed; ``reason`` is logged and shown by ``status``."""


class ProbeContext(Protocol):
    """What an out-of-process probe gets: report health, prove it is alive, see config."""

    config: Mapping[str, Any]

    def heartbeat(self) -> None:
        """Call at least once per heartbeat timeout; a silent probe's devices go Unhealthy."""

    def health(self, resource: str, device_id: str, health: Health, reason: str = "") -> None: ...

    def should_stop(self) -> bool:
        """True once the manager asked the probe to end (SIGTERM)."""


@dataclass(frozen=True)
class Probe:
    """A health watcher that runs in its own process, for calls that can hang (driver calls).

    ``target`` is ``"module:function"``; the function takes a :class:`ProbeContext` and loops
    until ``ctx.should_stop()``. ``config`` must be JSON-serialisable. When the probe stops
    beating for ``heartbeat_timeout`` seconds (default: the core config's
    ``probe_heartbeat_timeout``), the devices of ``resources`` (all of the vendor's when empty)
    are marked Unhealthy and the probe process is restarted.
    """

    name: str
    target: str
    config: Mapping[str, Any] = field(default_factory=dict)
    heartbeat_timeout: float | None = None
    resources: tuple[str, ...] = ()


@dataclass(frozen=True)
class Finding:
    """One line of ``dpkit discover``: a device (or a component) and why it is (not) advertised."""

    subject: str
    advertised: bool
    reason: str
    resource: str = ""
    hint: str = ""


@dataclass(frozen=True)
class Check:
    """One line of ``dpkit doctor``: a named check, whether it passed, and how to fix it."""

    name: str
    ok: bool
    detail: str
    hint: str = ""


@dataclass(frozen=True)
class MetricSample:
    """A vendor-specific gauge or counter value exported with the core's metrics."""

    name: str
    help: str
    value: float
    labels: Mapping[str, str] = field(default_factory=dict)
    kind: str = "gauge"  # or "counter"


#: the hooks a vendor may ask the core to run inline (:attr:`Vendor.inline_hooks`)
INLINE_HOOKS = frozenset({"container_spec", "preferred_allocation", "cdi_kind"})


class Vendor:
    """Base class for vendor packages.

    Required: :attr:`name` and :meth:`discover`. Everything else is optional; override only
    what the hardware needs. The constructor receives the ``vendor:`` section of the config
    file (or ``{}``) and must raise :class:`~dpkit.core.vendorapi.errors.ConfigError` on bad keys.
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    #: seconds between re-discoveries when :meth:`watch` is not overridden (0: never re-discover)
    poll_interval: float = 30.0
    #: Allocate-path hooks this vendor computes from memory it already holds, with no I/O, driver
    #: call or contended lock: the core runs them on the kubelet's own RPC thread, without the
    #: deadline's thread hop (about a third of an Allocate's time). A listed hook that blocks blocks
    #: that RPC, so list one only when it cannot. Allowed: :data:`INLINE_HOOKS`.
    inline_hooks: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, config: Mapping[str, Any] | None = None) -> None:
        self.config: Mapping[str, Any] = dict(config or {})

    # -- required -------------------------------------------------------------------------
    def discover(self) -> Snapshot:
        """The complete current view: every resource served and its devices.

        A resource present with no devices is still registered (and advertises zero).
        """
        raise NotImplementedError

    # -- optional -------------------------------------------------------------------------
    def watch(self, sink: EventSink, stop: threading.Event) -> None:
        """Block, reporting changes to ``sink`` until ``stop`` is set (hotplug, health).

        The default re-runs :meth:`discover` every :attr:`poll_interval` seconds.
        """
        if self.poll_interval <= 0:
            stop.wait()
            return
        while not stop.wait(self.poll_interval):
            sink.snapshot(self.discover())

    def probes(self) -> Sequence[Probe]:
        """Out-of-process health probes to run (see :class:`Probe`)."""
        return ()

    def container_spec(self, resource: str, devices: Sequence[Device]) -> ContainerSpec:
        """What a container given ``devices`` needs; the default merges the devices' specs."""
        return merge_specs(d.spec for d in devices)

    def preferred_allocation(
        self, resource: str, available: Sequence[Device], must_include: Sequence[Device], size: int
    ) -> Sequence[str] | None:
        """Device IDs to prefer, or None for the core's NUMA packing.

        An answer that is not a valid choice of ``size`` IDs from ``available`` containing
        ``must_include`` is logged and replaced by the core's default.
        """
        return None

    def pre_start(self, resource: str, devices: Sequence[Device]) -> None:
        """Run before a container with these devices starts; override to get it called."""

    def explain(self) -> Iterable[Finding]:
        """Why devices are *not* advertised (driver missing, wrong mode...), for ``discover``."""
        return ()

    def doctor(self) -> Iterable[Check]:
        """Vendor checks for ``dpkit doctor`` (driver loaded, device nodes, ...)."""
        return ()

    def node_labels(self, snapshot: Snapshot) -> Mapping[str, str]:
        """Node-feature-discovery labels describing this node's devices."""
        return {}

    def metric_samples(self) -> Iterable[MetricSample]:
        """Vendor metrics (e.g. request counters) exported with the core's."""
        return ()

    def cdi_kind(self, resource: str) -> str:
        """The CDI kind (``vendor.com/class``) for a resource's devices."""
        return resource

    def close(self) -> None:
        """Release handles (NVML, udev monitors) at shutdown."""

    # -- helpers the core uses ------------------------------------------------------------
    @classmethod
    def overrides(cls, method: str) -> bool:
        """Whether this vendor implements an optional method itself."""
        return getattr(cls, method) is not getattr(Vendor, method)
