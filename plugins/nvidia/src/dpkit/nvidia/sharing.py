"""Shared GPUs (time-slicing, MPS): replicas advertised as ``<id>::<n>``, and how they are handed out.

``sharedDevicesAllocationPolicy`` as NVIDIA's plugin: ``distributed`` (default) takes each replica
from the GPU with the fewest replicas in use, so pods spread over GPUs before they stack;
``packed`` takes it from the GPU with the most in use (that still has one free), so pods fill
one GPU before touching the next and whole GPUs stay free.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

SEPARATOR = "::"


def replica_id(device_id: str, n: int) -> str:
    return f"{device_id}{SEPARATOR}{n}"


def base_id(device_id: str) -> str:
    """The physical device a (possibly replicated) ID stands for."""
    return device_id.split(SEPARATOR, 1)[0]


def is_replica(device_id: str) -> bool:
    return SEPARATOR in device_id


def distributed(all_ids: Sequence[str], available: Sequence[str], required: Sequence[str], size: int,
                policy: str = "distributed") -> list[str]:
    """``size`` replica IDs: ``required`` first, then one at a time from the least (``packed``: most) used GPU.

    "In use" counts the replicas of a GPU that are not ``available`` (held by other pods) plus
    those picked for this request; ties go to the GPU listed first in ``all_ids``.
    """
    sign = -1 if policy == "packed" else 1
    chosen = list(dict.fromkeys(required))[:size]
    order = {device: i for i, device in enumerate(dict.fromkeys(base_id(d) for d in all_ids))}
    total = Counter(base_id(d) for d in all_ids)
    free = Counter(base_id(d) for d in available)
    used = {gpu: total[gpu] - free[gpu] for gpu in total}
    candidates: dict[str, list[str]] = {}
    for device in available:
        if device not in chosen:
            candidates.setdefault(base_id(device), []).append(device)
    picked: Counter[str] = Counter(base_id(d) for d in chosen)
    while len(chosen) < size and candidates:
        gpu = min(candidates, key=lambda g: (sign * (used.get(g, 0) + picked[g]), order.get(g, len(order))))
        chosen.append(candidates[gpu].pop(0))
        picked[gpu] += 1
        if not candidates[gpu]:
            del candidates[gpu]
    return chosen
