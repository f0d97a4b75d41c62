"""Default preferred-allocation policy: pack the request on the fewest NUMA nodes."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

from dpkit.core.vendorapi.device import Device


def pack_numa(available: Sequence[Device], must_include: Sequence[Device], size: int) -> list[str]:
    """Choose ``size`` devices: ``must_include`` first, then fill from as few NUMA nodes as possible.

    When one NUMA node can hold the rest, the node already used by ``must_include`` wins, then
    the smallest node that fits (best fit keeps big nodes whole for big requests). Otherwise
    the largest nodes are drained first. Order inside a node follows ``available``.
    """
    chosen = [d.id for d in must_include][:size]
    taken = set(chosen)
    remaining = size - len(chosen)
    if remaining <= 0:
        return chosen
    groups: dict[tuple[int, ...], list[str]] = defaultdict(list)
    for device in available:
        if device.id not in taken:
            groups[device.numa_nodes].append(device.id)
    used_nodes = {n for d in must_include for n in d.numa_nodes}

    def fit_key(item: tuple[tuple[int, ...], list[str]]) -> tuple[int, int, tuple[int, ...]]:
        nodes, ids = item
        return (0 if used_nodes and set(nodes) <= used_nodes else 1, len(ids), nodes)

    fitting = [g for g in groups.items() if len(g[1]) >= remaining]
    if fitting:
        _, ids = min(fitting, key=fit_key)
        return chosen + ids[:remaining]
    for _, ids in sorted(groups.items(), key=lambda g: (-len(g[1]), g[0])):
        take = ids[:remaining]
        chosen.extend(take)
        remaining -= len(take)
        if remaining == 0:
            break
    return chosen


def is_valid_choice(
    choice: Sequence[str], available: Sequence[str], must_include: Sequence[str], size: int
) -> bool:
    """Whether a vendor's preferred answer is one the kubelet can use."""
    picked = set(choice)
    return (
        len(choice) == size
        and len(picked) == len(choice)
        and picked <= set(available)
        and set(must_include) <= picked
    )
