"""Preferred allocation for VFIO devices: one NUMA node first, whole IOMMU groups together.

A VM gets a whole IOMMU group or none of it (the group node opens once), so splitting a group
between pods strands its other functions. Choices, in order:

1. ``must_include`` and the rest of their groups;
2. whole groups from one NUMA node: the node already used, else the smallest node that can
   hold the request (best fit keeps big nodes whole), else the biggest;
3. within those nodes, the largest groups that still fit, then other nodes the same way;
4. only when no whole group fits any more, part of the smallest group that covers the rest.
"""

from __future__ import annotations

from collections.abc import Sequence

from dpkit.core import Device

_NO_NUMA = -1


def _group_key(device: Device) -> str:
    return device.attributes.get("iommu_group", "") or f"device:{device.id}"


def _node(device: Device) -> int:
    return device.numa_nodes[0] if device.numa_nodes else _NO_NUMA


def prefer_groups(available: Sequence[Device], must_include: Sequence[Device], size: int) -> list[str] | None:
    """Device IDs to prefer, or None when ``size`` devices cannot be chosen from ``available``."""
    free = {d.id: d for d in available}
    if size > len(free) or len(must_include) > size or any(d.id not in free for d in must_include):
        return None
    groups: dict[str, list[Device]] = {}
    for device in available:
        groups.setdefault(_group_key(device), []).append(device)
    chosen: list[str] = [d.id for d in must_include]

    def take(members: Sequence[Device], limit: int) -> None:
        for device in members:
            if len(chosen) < limit and device.id not in chosen:
                chosen.append(device.id)

    for key in dict.fromkeys(_group_key(d) for d in must_include):
        rest = [d for d in groups.pop(key) if d.id not in chosen]
        if len(chosen) + len(rest) <= size:
            take(rest, size)
    remaining = size - len(chosen)
    for node in _node_order(groups, remaining, {_node(d) for d in must_include}):
        on_node = sorted((g for g in groups.values() if _node(g[0]) == node), key=len, reverse=True)
        for members in on_node:
            if len(members) <= size - len(chosen):
                take(members, size)
                groups.pop(_group_key(members[0]))
    if len(chosen) < size:  # no whole group fits: split the smallest one that covers the rest
        need = size - len(chosen)
        ordered = sorted(groups.values(), key=lambda g: (len(g) < need, len(g) if len(g) >= need else -len(g)))
        for members in ordered:
            take(members, size)
    return chosen if len(chosen) == size else None


def _node_order(groups: dict[str, list[Device]], remaining: int, used: set[int]) -> list[int]:
    """NUMA nodes in the order to draw from."""
    counts: dict[int, int] = {}
    for members in groups.values():
        counts[_node(members[0])] = counts.get(_node(members[0]), 0) + len(members)
    fitting = sorted((n for n, c in counts.items() if c >= remaining), key=lambda n: (n not in used, counts[n], n))
    first = fitting[:1] or sorted(counts, key=lambda n: (n not in used, -counts[n], n))[:1]
    return first + sorted((n for n in counts if n not in first), key=lambda n: (-counts[n], n))
