"""Topology-aware choice of GPUs: NVLink first, then a shared PCIe switch, then the NUMA node.

Each GPU pair gets a score (100 per NVLink between them, direct or through a shared NVSwitch,
plus a PCIe closeness score from NVML's common-ancestor level, or from NUMA nodes when NVML has
no topology). A set's score is the sum over its pairs. Up to :data:`EXACT_LIMIT` candidates
every set is tried; beyond, a greedy build from every seed is refined by swaps, which stays well
under 10 ms for 16 GPUs (bench/bench_nvidia_topology.py).
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from dpkit.nvidia.hostfiles import sysfs_bus_id
from dpkit.nvidia.nodeinfo import GpuInfo

NVLINK_SCORE = 100
# NVML topology levels: internal (same board), single PCIe switch, multiple switches,
# host bridge, same NUMA node (CPU), across the system interconnect
PCIE_SCORE = {0: 60, 10: 50, 20: 40, 30: 30, 40: 20, 50: 10}
SAME_NUMA_SCORE = 20
OTHER_SCORE = 10
EXACT_LIMIT = 8


@dataclass(frozen=True)
class Topology:
    """Pair scores between the GPUs named in ``uuids`` (a symmetric matrix, zero diagonal)."""

    uuids: tuple[str, ...]
    scores: tuple[tuple[int, ...], ...]

    def position(self) -> dict[str, int]:
        return {u: i for i, u in enumerate(self.uuids)}

    def set_score(self, uuids: Sequence[str]) -> int:
        pos = self.position()
        idx = [pos[u] for u in uuids if u in pos]
        return sum(self.scores[a][b] for a, b in itertools.combinations(idx, 2))


def nvlink_counts(gpus: Sequence[GpuInfo]) -> dict[tuple[int, int], int]:
    """NVLinks between GPU positions, direct or through a switch both GPUs connect to."""
    bus_to_pos = {sysfs_bus_id(g.bus_id): i for i, g in enumerate(gpus)}
    direct: Counter[tuple[int, int]] = Counter()
    switches: list[Counter[str]] = []
    for i, gpu in enumerate(gpus):
        via: Counter[str] = Counter()
        for remote in gpu.nvlinks:
            peer = bus_to_pos.get(sysfs_bus_id(remote))
            if peer is None:
                via[str(sysfs_bus_id(remote))] += 1  # an NVSwitch (or another non-GPU endpoint)
            elif peer != i:
                direct[(i, peer)] += 1
        switches.append(via)
    counts: dict[tuple[int, int], int] = {}
    for a, b in itertools.combinations(range(len(gpus)), 2):
        links = max(direct[(a, b)], direct[(b, a)])
        shared = set(switches[a]) & set(switches[b])
        if shared:
            links += min(sum(switches[a][s] for s in shared), sum(switches[b][s] for s in shared))
        if links:
            counts[(a, b)] = links
    return counts


def build(gpus: Sequence[GpuInfo], pcie: Mapping[tuple[str, str], int]) -> Topology:
    """Pair scores for ``gpus`` from their NVLinks, PCIe levels and NUMA nodes."""
    links = nvlink_counts(gpus)
    n = len(gpus)
    matrix = [[0] * n for _ in range(n)]
    for a, b in itertools.combinations(range(n), 2):
        level = pcie.get((gpus[a].uuid, gpus[b].uuid))
        if level is not None and level in PCIE_SCORE:
            close = PCIE_SCORE[level]
        elif gpus[a].numa is not None and gpus[a].numa == gpus[b].numa:
            close = SAME_NUMA_SCORE
        else:
            close = OTHER_SCORE
        matrix[a][b] = matrix[b][a] = NVLINK_SCORE * links.get((a, b), 0) + close
    return Topology(tuple(g.uuid for g in gpus), tuple(tuple(row) for row in matrix))


def choose(scores: Sequence[Sequence[int]], candidates: Sequence[int], required: Sequence[int], size: int) -> list[int]:
    """``size`` positions including ``required``, maximising the sum of pair scores.

    Ties go to the set whose sorted positions come first, so answers are deterministic.
    """
    required = list(dict.fromkeys(required))[:size]
    free = [c for c in dict.fromkeys(candidates) if c not in set(required)]
    need = size - len(required)
    if need <= 0:
        return required
    if need >= len(free):
        return required + free
    base = {c: sum(scores[c][r] for r in required) for c in free}
    if len(free) <= EXACT_LIMIT:
        best = max(itertools.combinations(free, need), key=lambda combo: (
            sum(base[c] for c in combo) + sum(scores[a][b] for a, b in itertools.combinations(combo, 2)),
            [-c for c in sorted(combo)],
        ))
        return required + list(best)
    return required + _heuristic(scores, free, base, need)


def _heuristic(scores: Sequence[Sequence[int]], free: list[int], base: dict[int, int], need: int) -> list[int]:
    best: tuple[int, list[int]] | None = None
    for seed in free:
        chosen = [seed]
        gain = {c: base[c] + scores[seed][c] for c in free}
        total = base[seed]
        while len(chosen) < need:
            pick = max((c for c in free if c not in chosen), key=lambda c: (gain[c], -c))
            total += gain[pick]
            chosen.append(pick)
            row = scores[pick]
            for c in free:
                gain[c] += row[c]
        total += _improve(scores, free, chosen, gain)
        ranked = (total, sorted(chosen))
        if best is None or ranked[0] > best[0] or (ranked[0] == best[0] and ranked[1] < best[1]):
            best = ranked
    assert best is not None
    return best[1]


def _improve(scores: Sequence[Sequence[int]], free: list[int], chosen: list[int], gain: dict[int, int]) -> int:
    """Best-improvement swaps until none helps; ``gain[x]`` is x's score against the chosen set."""
    improved = 0
    for _ in range(2 * len(chosen)):
        members = set(chosen)
        best_delta, swap = 0, None
        for i in chosen:
            for j in free:
                if j in members:
                    continue
                delta = gain[j] - scores[j][i] - gain[i]
                if delta > best_delta:
                    best_delta, swap = delta, (i, j)
        if swap is None:
            break
        i, j = swap
        chosen[chosen.index(i)] = j
        row_i, row_j = scores[i], scores[j]
        for c in free:
            gain[c] += row_j[c] - row_i[c]
        improved += best_delta
    return improved
