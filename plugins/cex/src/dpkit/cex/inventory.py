"""From crypto config sets and an AP bus scan to the devices advertised, and why others are not.

Each set is a resource; each of its APQNs present on this node, in a usage domain, on an
adapter of the set's mode and generation, is advertised ``overcommit`` times as
``apqn-<adapter>-<domain>-<slot>`` (IBM's device IDs, so kubelet checkpoints carry over). An
APQN that is offline, configured off or checkstopped (or whose adapter is) is advertised
Unhealthy with that reason. Every APQN that is not advertised gets a :class:`Finding` saying why.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from dpkit.cex.apbus import ApBus, apqn_name
from dpkit.cex.cryptoconfig import ConfigSet, CryptoConfig
from dpkit.core import Device, Finding, Health

_DEVICE_ID = re.compile(r"^apqn-([0-9]{1,3})-([0-9]{1,3})-([0-9]{1,4})$")


def device_id(adapter: int, domain: int, slot: int) -> str:
    return f"apqn-{adapter}-{domain}-{slot}"


def parse_device_id(value: str) -> tuple[int, int, int] | None:
    """(adapter, domain, slot) of one of our device IDs; None for anything else."""
    match = _DEVICE_ID.match(value)
    if match is None:
        return None
    adapter, domain, slot = (int(g) for g in match.groups())
    return (adapter, domain, slot) if adapter <= 255 and domain <= 255 else None


@dataclass(frozen=True)
class Inventory:
    """What to advertise (a snapshot), why anything is not, and which set each APQN serves.

    ``unassigned`` lists APQNs on the bus that no set names: worth showing, not worth a warning.
    """

    snapshot: dict[str, tuple[Device, ...]]
    findings: tuple[Finding, ...]
    set_of: dict[tuple[int, int], ConfigSet]
    unassigned: tuple[Finding, ...] = ()


def _unfit(s: ConfigSet, bus: ApBus, adapter: int, domain: int) -> str:
    """Why APQN (adapter, domain) cannot serve set ``s`` on this node ("" when it can)."""
    queue = bus.queues.get((adapter, domain))
    if queue is None:
        return "not on this node's AP bus"
    if bus.usage_domains is not None and domain not in bus.usage_domains:
        return f"domain {domain} is not a usage domain of this LPAR/guest (ap_usage_domain_mask)"
    card = bus.adapters[adapter]
    if card.gen is None or card.mode is None:
        return f"adapter {card.name} has an unrecognised type {card.type!r}; cannot tell its mode and generation"
    if s.cexmode and card.mode != s.cexmode:
        return f"adapter {card.name} ({card.type}) is in {card.mode} mode; set {s.setname} needs {s.cexmode}"
    if s.mincexgen is not None and card.gen < s.mincexgen:
        return f"adapter {card.name} is {card.gen_name}; set {s.setname} needs cex{s.mincexgen} or newer"
    return ""


def _devices(s: ConfigSet, bus: ApBus, adapter: int, domain: int) -> tuple[Device, ...]:
    card, queue = bus.adapters[adapter], bus.queues[(adapter, domain)]
    problems = card.problems + queue.problems
    health = Health.UNHEALTHY if problems else Health.HEALTHY
    attributes = {"apqn": queue.name, "adapter": str(adapter), "domain": str(domain), "type": card.type,
                  "mode": card.mode or "", "generation": card.gen_name, "set": s.setname, "project": s.project}
    return tuple(Device(device_id(adapter, domain, slot), health, reason="; ".join(problems), attributes=attributes)
                 for slot in range(s.overcommit))


def build(config: CryptoConfig | None, bus: ApBus, machine_id: str | None) -> Inventory:
    """The snapshot and findings for ``config`` on the scanned ``bus``."""
    snapshot: dict[str, tuple[Device, ...]] = {}
    findings: list[Finding] = []
    set_of: dict[tuple[int, int], ConfigSet] = {}
    if not bus.present:
        findings.append(Finding(f"{bus.root}/bus/ap", False, "no AP bus: not an s390 machine, or no ap module",
                                hint="modprobe ap (and zcrypt); check the LPAR/guest has crypto adapters"))
    for s in config.sets if config else ():
        devices: list[Device] = []
        elsewhere: dict[tuple[int, int], list[str]] = {}  # one finding per APQN, however many machines
        for a in s.apqns:
            subject = f"APQN {apqn_name(a.adapter, a.domain)}"
            if not a.applies_to(machine_id):
                elsewhere.setdefault((a.adapter, a.domain), []).append(a.machineid)
                continue
            why = _unfit(s, bus, a.adapter, a.domain)
            if why:
                findings.append(Finding(subject, False, why, s.resource))
                continue
            new = _devices(s, bus, a.adapter, a.domain)
            devices.extend(new)
            set_of[(a.adapter, a.domain)] = s
            state = "healthy" if new[0].healthy else f"unhealthy: {new[0].reason}"
            findings.append(Finding(subject, True, f"advertised {s.overcommit}x ({state})", s.resource))
        for (adapter, domain), machines in elsewhere.items():
            if (adapter, domain) in set_of and set_of[(adapter, domain)] is s:
                continue  # also listed for this machine: advertised, nothing to explain
            pinned = machines[0] if len(machines) == 1 else f"{len(machines)} other machines (first {machines[0]})"
            findings.append(Finding(f"APQN {apqn_name(adapter, domain)}", False, f"pinned to machine {pinned}; "
                                    f"this is {machine_id or 'an unknown machine'}", s.resource))
        snapshot[s.resource] = tuple(devices)
    named = {(a.adapter, a.domain) for s in (config.sets if config else ()) for a in s.apqns}
    unassigned = tuple(
        Finding(f"APQN {queue.name}", False, "not part of any crypto config set",
                hint="add it to a set in cex_resources.json to offer it")
        for (adapter, domain), queue in sorted(bus.queues.items())
        if (adapter, domain) not in named and (bus.usage_domains is None or domain in bus.usage_domains))
    return Inventory(snapshot, tuple(findings), set_of, unassigned)
