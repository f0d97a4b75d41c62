"""What a vendor tells the core about a device, and what a container needs to use it.

A vendor hands the core whole snapshots of these immutable values; the core diffs them, serves
them to the kubelet and merges the container specs on Allocate.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from dpkit.core.vendorapi.validation import (
    check_annotation_key,
    check_cdi_name,
    check_container_path,
    check_device_id,
    check_env_name,
    check_host_path,
    check_numa_node,
    check_permissions,
)


class Health(enum.StrEnum):
    """The two health strings the kubelet understands."""

    HEALTHY = "Healthy"
    UNHEALTHY = "Unhealthy"


class FrozenMap(dict[str, str]):
    """A read-only, hashable, picklable str -> str mapping (specs travel over the event bus)."""

    __slots__ = ()  # no per-instance __dict__ or weakref slot: two per device, 100k devices

    def _readonly(self, *args: object, **kwargs: object) -> None:
        raise TypeError("FrozenMap is read-only")

    __setitem__ = __delitem__ = _readonly
    clear = pop = popitem = setdefault = update = _readonly  # type: ignore[assignment]

    def __hash__(self) -> int:  # type: ignore[override]
        return hash(tuple(sorted(self.items())))

    def __reduce__(self) -> tuple[type[FrozenMap], tuple[dict[str, str]]]:
        return (FrozenMap, (dict(self),))


_EMPTY = FrozenMap()  # shared by every spec and device without env, annotations or attributes


def _frozen(mapping: Mapping[str, str] | None) -> Mapping[str, str]:
    if isinstance(mapping, FrozenMap):
        return mapping
    return FrozenMap(mapping) if mapping else _EMPTY


def _str_map(mapping: Mapping[str, str]) -> Mapping[str, str]:
    """``mapping`` with str keys and values, frozen; a FrozenMap that already is one is kept, so
    devices built with one shared attributes map share it."""
    if isinstance(mapping, FrozenMap) and all(type(k) is str and type(v) is str for k, v in mapping.items()):
        return mapping
    return _frozen({str(k): str(v) for k, v in mapping.items()})


_NUMA_SETS: dict[tuple[int, ...], tuple[int, ...]] = {}  # one shared tuple per distinct NUMA set
_NUMA_SETS_MAX = 4096


def _numa(nodes: Iterable[int]) -> tuple[int, ...]:
    """Sorted, checked, and shared between devices: a node has a few distinct sets, not one per device."""
    key = tuple(sorted({check_numa_node(int(n)) for n in nodes}))
    if len(_NUMA_SETS) < _NUMA_SETS_MAX:
        return _NUMA_SETS.setdefault(key, key)
    return _NUMA_SETS.get(key, key)


@dataclass(frozen=True, slots=True)
class DeviceNode:
    """A device node the container gets; ``container_path`` defaults to ``host_path``."""

    host_path: str
    container_path: str = ""
    permissions: str = "rw"

    def __post_init__(self) -> None:
        check_host_path(self.host_path)
        if not self.container_path:
            object.__setattr__(self, "container_path", self.host_path)
        check_container_path(self.container_path)
        check_permissions(self.permissions)


@dataclass(frozen=True, slots=True)
class Mount:
    """A host path bind-mounted into the container, read-only unless said otherwise."""

    host_path: str
    container_path: str = ""
    read_only: bool = True

    def __post_init__(self) -> None:
        check_host_path(self.host_path)
        if not self.container_path:
            object.__setattr__(self, "container_path", self.host_path)
        check_container_path(self.container_path)


@dataclass(frozen=True, slots=True)
class ContainerSpec:
    """What a container needs to use some devices.

    Every field is validated on construction, so nothing unchecked from sysfs, NVML or a
    request can reach the kubelet.
    """

    devices: tuple[DeviceNode, ...] = ()
    mounts: tuple[Mount, ...] = ()
    env: Mapping[str, str] = field(default_factory=lambda: _frozen(None))
    annotations: Mapping[str, str] = field(default_factory=lambda: _frozen(None))
    cdi_devices: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "devices", tuple(self.devices))
        object.__setattr__(self, "mounts", tuple(self.mounts))
        object.__setattr__(self, "cdi_devices", tuple(self.cdi_devices))
        object.__setattr__(self, "env", _frozen(self.env))
        object.__setattr__(self, "annotations", _frozen(self.annotations))
        for name in self.env:
            check_env_name(name)
        for key in self.annotations:
            check_annotation_key(key)
        for cdi in self.cdi_devices:
            check_cdi_name(cdi)

    def merge(self, other: ContainerSpec) -> ContainerSpec:
        """Union of two specs.

        Device nodes and mounts are de-duplicated by container path (the first wins); distinct
        env values for one name are joined with commas in order, the way device lists such as
        ``NVIDIA_VISIBLE_DEVICES`` or ``PCI_RESOURCE_*`` are written; equal values appear once.
        """
        return merge_specs((self, other))

    def __hash__(self) -> int:
        return hash((self.devices, self.mounts, tuple(sorted(self.env.items())), self.cdi_devices))


def _merged_already(spec: ContainerSpec) -> bool:
    """True when merging ``spec`` alone would give an equal spec: no container path or CDI name twice."""
    return (len({n.container_path for n in spec.devices}) == len(spec.devices)
            and len({m.container_path for m in spec.mounts}) == len(spec.mounts)
            and len(set(spec.cdi_devices)) == len(spec.cdi_devices))


def merge_specs(specs: Iterable[ContainerSpec]) -> ContainerSpec:
    """Merge many specs in order; see :meth:`ContainerSpec.merge`.

    One spec that is merged already is returned as it is (specs are immutable): the CDI writer
    asks for every device's spec alone, 100k of them at 100k devices.
    """
    specs = tuple(specs)
    if len(specs) == 1 and _merged_already(specs[0]):
        return specs[0]
    devices: dict[str, DeviceNode] = {}
    mounts: dict[str, Mount] = {}
    env: dict[str, list[str]] = {}
    annotations: dict[str, str] = {}
    cdi: dict[str, None] = {}
    for spec in specs:
        for node in spec.devices:
            devices.setdefault(node.container_path, node)
        for mount in spec.mounts:
            mounts.setdefault(mount.container_path, mount)
        for name, value in spec.env.items():
            values = env.setdefault(name, [])
            if value not in values:  # whole values: "1,1" from one device stays as written
                values.append(value)
        for key, value in spec.annotations.items():
            annotations.setdefault(key, value)
        for name in spec.cdi_devices:
            cdi[name] = None
    return ContainerSpec(
        devices=tuple(devices.values()),
        mounts=tuple(mounts.values()),
        env={name: ",".join(values) for name, values in env.items()},
        annotations=annotations,
        cdi_devices=tuple(cdi),
    )


@dataclass(frozen=True, slots=True)
class Device:
    """One schedulable unit of a resource.

    ``id`` is what the kubelet sees and must stay stable across restarts. ``reason`` says why
    an unhealthy device is unhealthy; ``attributes`` are facts shown by ``status``/``discover``
    and used for node labels (model, memory, PCI address...).
    """

    id: str
    health: Health = Health.HEALTHY
    numa_nodes: tuple[int, ...] = ()
    spec: ContainerSpec = field(default_factory=ContainerSpec)
    reason: str = ""
    attributes: Mapping[str, str] = field(default_factory=lambda: _frozen(None))

    def __post_init__(self) -> None:
        check_device_id(self.id)
        object.__setattr__(self, "health", Health(self.health))
        object.__setattr__(self, "numa_nodes", _numa(self.numa_nodes))
        object.__setattr__(self, "attributes", _str_map(self.attributes))

    @property
    def healthy(self) -> bool:
        return self.health is Health.HEALTHY

    def with_health(self, health: Health, reason: str = "") -> Device:
        """A copy with another health (and the reason for it).

        Everything else was validated when this device was made, so it is copied as is: the
        manager calls this for every health change of every device.
        """
        copy = object.__new__(Device)
        for name, value in (("id", self.id), ("health", Health(health)), ("numa_nodes", self.numa_nodes),
                            ("spec", self.spec), ("reason", str(reason)), ("attributes", self.attributes)):
            object.__setattr__(copy, name, value)
        return copy

    def __hash__(self) -> int:
        return hash((self.id, self.health, self.numa_nodes, self.spec, self.reason))


# A vendor's whole view of the node: resource name -> its devices.
Snapshot = Mapping[str, tuple[Device, ...]]
