"""What the manager publishes: one immutable, versioned :class:`PluginState` per change.

Everything besides the kubelet learns about the plugin from this object: the observers (CDI
specs, NFD labels, metrics, the pod view) and ``dpkit status``. It is built by the manager's
loop thread only and never changes afterwards, so any thread may read it without a lock.

Building a new version costs what changed, not what exists: device tuples are the manager's own
immutable :class:`Device` objects, and a resource whose devices and serving counters did not
change keeps its :class:`ResourceState` object from the previous version. Observers find what
changed with :meth:`PluginState.changed_since` (identity checks), whichever versions they skipped.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Protocol

from dpkit.core.vendorapi.device import Device

#: What an observer adds to ``dpkit status``: JSON-encodable values under its own top-level keys.
StatusFields = Mapping[str, object]


def frozen_map(items: Mapping[str, object] | None = None) -> Mapping[str, object]:
    return MappingProxyType(dict(items or {}))


@dataclass(frozen=True, slots=True)
class Serving:
    """One resource's server and registration, as last seen (cheap to compare)."""

    socket: str
    registered: bool = False
    registrations: int = 0
    last_error: str = ""
    streams: int = 0
    allocations: int = 0
    allocate_errors: int = 0


@dataclass(frozen=True, slots=True)
class ResourceState:
    """One served resource: its devices with effective health, and how it is served."""

    name: str
    devices: tuple[Device, ...]  # effective: vendor health with health reports and probe silences laid over
    offered: tuple[Device, ...]  # as the vendor described them (specs do not depend on health)
    serving: Serving

    @property
    def capacity(self) -> int:
        return len(self.devices)

    @property
    def allocatable(self) -> int:
        return sum(1 for d in self.devices if d.healthy)


@dataclass(frozen=True, slots=True)
class ProbeStatus:
    """One out-of-process health probe."""

    name: str
    pid: int | None
    alive: bool
    silent: bool
    heartbeats: int
    last_heartbeat: float  # time.monotonic() of the last heartbeat; meaningless while heartbeats == 0
    restarts: int
    timeout: float


@dataclass(frozen=True, slots=True)
class ServerFailure:
    """A resource whose gRPC server could not start; retried with backoff."""

    attempts: int
    error: str
    next_try: float  # time.monotonic()


@dataclass(frozen=True, slots=True)
class KubeletState:
    socket: str
    present: bool
    restarts_seen: int


@dataclass(frozen=True, slots=True)
class HealthCounters:
    reports: int = 0  # health reports received from in-process watchers
    coalesced: int = 0  # replaced by a newer report before the manager read them
    changes_published: int = 0  # effective health or reason changes sent to servers


@dataclass(frozen=True, slots=True)
class PluginState:
    """The whole plugin at one moment; ``version`` grows by one with every change."""

    version: int
    vendor: str
    vendor_generation: int  # grows when a reload replaces the vendor object (its specs may differ)
    pid: int
    started_at: float  # time.time()
    kubelet: KubeletState
    resources: Mapping[str, ResourceState]  # sorted by name, read-only
    probes: tuple[ProbeStatus, ...] = ()
    reloads: int = 0
    health: HealthCounters = HealthCounters()
    server_failures: Mapping[str, ServerFailure] = field(default_factory=lambda: MappingProxyType({}))
    errors: tuple[Mapping[str, object], ...] = ()  # the last warnings and errors, oldest first

    def changed_since(self, previous: PluginState | None) -> frozenset[str]:
        """Resources added, removed, or whose devices changed since ``previous`` (any older version)."""
        if previous is None:
            return frozenset(self.resources)
        changed = {r for r in previous.resources if r not in self.resources}
        for name, now in self.resources.items():
            before = previous.resources.get(name)
            if before is None or before.devices is not now.devices or before.offered is not now.offered:
                changed.add(name)
        return frozenset(changed)


class Observer(Protocol):
    """A side door (CDI, labels, metrics, pod view): sees the plugin only through PluginState.

    ``publish`` runs on the observer's own thread with the newest state (a slow observer skips
    versions, it never queues them); ``status_fields`` runs when ``dpkit status`` is asked, never
    on the manager's loop; ``close`` at shutdown.
    """

    def publish(self, state: PluginState) -> None: ...

    def status_fields(self, state: PluginState) -> StatusFields: ...

    def close(self) -> None: ...
