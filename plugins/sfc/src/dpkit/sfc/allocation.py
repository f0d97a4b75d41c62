"""Preferred allocation: keep a pod's interfaces on one physical NIC, else on one NUMA node.

Two ports of one card share its PCIe link and its NUMA node, so an application spreading
traffic over them stays local. Inside a card, distinct ports come before second slots of a
port already chosen, so a pod asking for two gets two ports when it can.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from itertools import chain, zip_longest

from dpkit.core import Device

Group = list[Device]


def _nic(device: Device) -> str:
    return device.attributes.get("nic", device.id)


def _function(device: Device) -> str:
    return device.attributes.get("pci", device.id)


def _spread(devices: Group) -> list[str]:
    """Round-robin over PCI functions: first slot of every port, then second slots..."""
    by_function: dict[str, list[str]] = defaultdict(list)
    for device in devices:
        by_function[_function(device)].append(device.id)
    rounds = zip_longest(*by_function.values())
    return [i for i in chain.from_iterable(rounds) if i is not None]


def _fill(groups: dict[str, Group], remaining: int, preferred: set[str]) -> list[str]:
    """Take from as few NICs as possible: the preferred ones, then the biggest."""
    out: list[str] = []
    for nic in sorted(groups, key=lambda n: (n not in preferred, -len(groups[n]), n)):
        out.extend(_spread(groups[nic])[: remaining - len(out)])
        if len(out) == remaining:
            break
    return out


def prefer(available: Sequence[Device], must_include: Sequence[Device], size: int) -> list[str]:
    """``size`` device IDs from ``available``, ``must_include`` first; see the module docstring."""
    chosen = [d.id for d in must_include][:size]
    remaining = size - len(chosen)
    if remaining <= 0:
        return chosen
    taken = set(chosen)
    free = [d for d in available if d.id not in taken]
    must_nics = {_nic(d) for d in must_include}
    must_numa = {d.numa_nodes for d in must_include}
    nics: dict[str, Group] = defaultdict(list)
    numa_of: dict[str, tuple[int, ...]] = {}
    for device in free:
        nics[_nic(device)].append(device)
        numa_of.setdefault(_nic(device), device.numa_nodes)

    fitting = [n for n, group in nics.items() if len(group) >= remaining]
    if fitting:
        best = min(fitting, key=lambda n: (n not in must_nics, bool(must_numa) and numa_of[n] not in must_numa,
                                           len(nics[n]), n))
        return chosen + _spread(nics[best])[:remaining]

    by_numa: dict[tuple[int, ...], dict[str, Group]] = defaultdict(dict)
    for nic, group in nics.items():
        by_numa[numa_of[nic]][nic] = group
    sizes = {numa: sum(len(g) for g in groups.values()) for numa, groups in by_numa.items()}
    fitting_numa = [numa for numa, total in sizes.items() if total >= remaining]
    if fitting_numa:
        best_numa = min(fitting_numa, key=lambda n: (n not in must_numa, sizes[n], n))
        return chosen + _fill(by_numa[best_numa], remaining, must_nics)

    for numa in sorted(by_numa, key=lambda n: (n not in must_numa, -sizes[n], n)):
        chosen.extend(_fill(by_numa[numa], remaining, must_nics))
        remaining = size - len(chosen)
        if remaining == 0:
            break
    return chosen
