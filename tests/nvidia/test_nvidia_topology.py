"""Preferred allocation: NVLink, then PCIe switch, then NUMA; exact up to 8 GPUs, heuristic beyond; replicas spread."""

from __future__ import annotations

import itertools
import random

import pytest
from fakenvml import FakeNode, gpu_uuid

from dpkit.core.vendorapi.device import Device
from dpkit.nvidia import sharing, topology
from dpkit.nvidia.gpus import GpuInfo
from dpkit.nvidia.vendor import NvidiaVendor, preferred_gpus


def gpu(i: int, numa: int = 0, links: tuple[str, ...] = ()) -> GpuInfo:
    return GpuInfo(i, gpu_uuid(i), "GPU", 1 << 30, i, f"00000000:{0x18 + i:02X}:00.0", numa, nvlinks=links)


def bus(i: int) -> str:
    return f"00000000:{0x18 + i:02X}:00.0"


def devices(n: int) -> list[Device]:
    return [Device(gpu_uuid(i), attributes={"uuid": gpu_uuid(i)}) for i in range(n)]


def brute_force(scores, candidates, required, size):
    free = [c for c in candidates if c not in required]
    best = max(itertools.combinations(free, size - len(required)),
               key=lambda c: sum(scores[a][b] for a, b in itertools.combinations([*required, *c], 2)))
    return sum(scores[a][b] for a, b in itertools.combinations([*required, *best], 2))


def set_score(scores, chosen):
    return sum(scores[a][b] for a, b in itertools.combinations(chosen, 2))


def test_nvlink_pairs_beat_pcie_and_numa():
    # 0-1 share two NVLinks; 2-3 one NVLink; 0,1,2,3 on NUMA 0; 4,5 on NUMA 1
    gpus = [gpu(0, 0, (bus(1), bus(1))), gpu(1, 0, (bus(0), bus(0))), gpu(2, 0, (bus(3),)), gpu(3, 0, (bus(2),)),
            gpu(4, 1), gpu(5, 1)]
    topo = topology.build(gpus, {})
    assert topo.scores[0][1] == 2 * topology.NVLINK_SCORE + topology.SAME_NUMA_SCORE
    assert topo.scores[2][3] == topology.NVLINK_SCORE + topology.SAME_NUMA_SCORE
    assert topo.scores[0][4] == topology.OTHER_SCORE
    assert preferred_gpus(topo, devices(6), [], 2) == [gpu_uuid(0), gpu_uuid(1)]
    without_01 = [d for d in devices(6) if d.id not in (gpu_uuid(0), gpu_uuid(1))]
    assert preferred_gpus(topo, without_01, [], 2) == [gpu_uuid(2), gpu_uuid(3)]
    assert preferred_gpus(topo, devices(6)[3:], [], 2) == [gpu_uuid(4), gpu_uuid(5)], "same NUMA node"


def test_pcie_switch_beats_numa_only():
    gpus = [gpu(i, 0) for i in range(4)]
    levels = {}
    for a, b in itertools.combinations(range(4), 2):
        level = 10 if {a, b} == {1, 3} else 40  # 1 and 3 behind one PCIe switch
        levels[(gpus[a].uuid, gpus[b].uuid)] = levels[(gpus[b].uuid, gpus[a].uuid)] = level
    topo = topology.build(gpus, levels)
    assert preferred_gpus(topo, devices(4), [], 2) == [gpu_uuid(1), gpu_uuid(3)]


def test_nvswitch_links_join_gpus_through_the_switch():
    switch = "00000000:C0:00.0"
    gpus = [gpu(0, 0, (switch, switch)), gpu(1, 1, (switch, switch)), gpu(2, 0)]
    topo = topology.build(gpus, {})
    assert topo.scores[0][1] == 2 * topology.NVLINK_SCORE + topology.OTHER_SCORE
    assert preferred_gpus(topo, devices(3), [], 2) == [gpu_uuid(0), gpu_uuid(1)]


def test_must_include_is_honoured_and_first():
    gpus = [gpu(0, 0, (bus(1),)), gpu(1, 0, (bus(0),)), gpu(2, 1), gpu(3, 1)]
    topo = topology.build(gpus, {})
    assert preferred_gpus(topo, devices(4), [devices(4)[2]], 2) == [gpu_uuid(2), gpu_uuid(3)]
    assert preferred_gpus(topo, devices(4), [], 0) == []
    assert sorted(preferred_gpus(topo, devices(4), [], 4)) == [gpu_uuid(i) for i in range(4)]


@pytest.mark.parametrize("n", [5, 8])
def test_exact_search_is_optimal_up_to_eight(n):
    rng = random.Random(n)
    for _ in range(20):
        scores = [[0] * n for _ in range(n)]
        for a, b in itertools.combinations(range(n), 2):
            scores[a][b] = scores[b][a] = rng.choice([10, 20, 40, 50, 120, 220])
        for size in range(1, n + 1):
            required = [rng.randrange(n)] if size > 1 and rng.random() < 0.3 else []
            chosen = topology.choose(scores, range(n), required, size)
            assert len(chosen) == size and len(set(chosen)) == size and set(required) <= set(chosen)
            assert set_score(scores, chosen) == brute_force(scores, list(range(n)), required, size)


def test_heuristic_for_sixteen_gpus_finds_the_nvlink_islands():
    # two 8-GPU NVLink islands (one per NUMA node), like two HGX boards: any request <= 8 fits one
    gpus = []
    for i in range(16):
        island = range(0, 8) if i < 8 else range(8, 16)
        gpus.append(gpu(i, 0 if i < 8 else 1, tuple(bus(j) for j in island if j != i)))
    topo = topology.build(gpus, {})
    all16 = devices(16)
    for size in (2, 4, 8):
        chosen = preferred_gpus(topo, all16, [], size)
        islands = {int(c.split("-")[-1], 16) < 8 for c in chosen}
        assert len(islands) == 1, f"size {size} split across islands: {chosen}"
    # with island 0 half used, a 4-GPU request goes to the free half of island 0 or to island 1 whole
    busy = {gpu_uuid(i) for i in (0, 1, 2, 3, 8)}
    chosen = preferred_gpus(topo, [d for d in all16 if d.id not in busy], [], 4)
    assert len({int(c.split("-")[-1], 16) < 8 for c in chosen}) == 1


def test_heuristic_matches_brute_force_on_random_sixteen_gpu_nodes():
    rng = random.Random(7)
    worse = 0
    for _ in range(5):
        n = 16
        scores = [[0] * n for _ in range(n)]
        for a, b in itertools.combinations(range(n), 2):
            scores[a][b] = scores[b][a] = rng.choice([10, 20, 40, 50, 120])
        for size in (2, 3, 4, 13, 14):
            chosen = topology.choose(scores, range(n), [], size)
            assert len(set(chosen)) == size
            worse += set_score(scores, chosen) < brute_force(scores, list(range(n)), [], size)
    assert worse <= 2, f"heuristic fell short of the optimum in {worse} of 25 cases"


def test_replicas_are_spread_over_gpus_like_nvidias_distributed_policy():
    ids = [f"{g}::{n}" for g in ("A", "B", "C") for n in range(4)]
    assert sharing.distributed(ids, ids, [], 3) == ["A::0", "B::0", "C::0"]
    # A already has two replicas in use, B one: the next two come from C, then B
    available = [i for i in ids if i not in ("A::0", "A::1", "B::0")]
    assert sharing.distributed(ids, available, [], 3) == ["C::0", "B::1", "C::1"]
    assert sharing.distributed(ids, ids, ["B::3"], 2) == ["B::3", "A::0"]


def test_vendor_uses_the_distributed_policy_for_replicas(host):
    host.apply(FakeNode.with_gpus(2))
    document = {"sharing": {"timeSlicing": {"resources": [{"name": "nvidia.com/gpu", "replicas": 4}]}}}
    vendor = NvidiaVendor(host.vendor_config(document=document), environ={})
    try:
        replicas = list(vendor.discover()["nvidia.com/gpu"])
        chosen = vendor.preferred_allocation("nvidia.com/gpu", replicas, [], 2)
        assert chosen is not None and {sharing.base_id(c) for c in chosen} == {gpu_uuid(0), gpu_uuid(1)}
    finally:
        vendor.close()
