"""Which resource a PCI function is served under, and how many shared slots it offers."""

from __future__ import annotations

from collections.abc import Sequence
from fnmatch import fnmatchcase

from dpkit.sfc.config import Pool, SfcConfig


def match_pool(pools: Sequence[Pool], address: str, interfaces: Sequence[str]) -> Pool | None:
    """The first pool whose PCI-address or interface-name patterns match; None for the default."""
    for pool in pools:
        if any(fnmatchcase(address, pattern) for pattern in pool.pci_addresses):
            return pool
        if any(fnmatchcase(name, pattern) for name in interfaces for pattern in pool.interfaces):
            return pool
    return None


def assign(config: SfcConfig, address: str, interfaces: Sequence[str]) -> tuple[str, int]:
    """(resource, slots) for a function."""
    pool = match_pool(config.pools, address, interfaces)
    return (pool.resource, pool.slots) if pool else (config.resource, config.slots)


def slot_ids(address: str, slots: int) -> tuple[str, ...]:
    """Device IDs for a function: its PCI address, or ``<address>-<n>`` for each shared slot.

    The PCI address is stable across reboots and interface renames, which the kubelet's
    checkpoint of allocated IDs relies on.
    """
    if slots == 1:
        return (address,)
    return tuple(f"{address}-{n}" for n in range(slots))
