"""Preferred allocation: NUMA-local first, whole IOMMU groups together, always a valid answer."""

from __future__ import annotations

import pytest

from dpkit.core.vendorapi.allocation import is_valid_choice
from dpkit.core.vendorapi.device import Device
from dpkit.kvm_vfio.allocation import prefer_groups


def dev(address: str, group: str, numa: int | None) -> Device:
    return Device(address, numa_nodes=() if numa is None else (numa,), attributes={"iommu_group": group})


# node 0: group 1 (two functions), group 2 (one); node 1: groups 3, 4, 5 (one each)
POOL = [dev("0000:01:00.0", "1", 0), dev("0000:01:00.1", "1", 0), dev("0000:02:00.0", "2", 0),
        dev("0000:81:00.0", "3", 1), dev("0000:82:00.0", "4", 1), dev("0000:83:00.0", "5", 1)]


def choose(size: int, must: tuple[int, ...] = (), pool: list[Device] = POOL) -> list[str]:
    answer = prefer_groups(pool, [pool[i] for i in must], size)
    assert answer is not None
    assert is_valid_choice(answer, [d.id for d in pool], [pool[i].id for i in must], size)
    return answer


def test_a_whole_group_on_one_node_is_preferred() -> None:
    assert sorted(choose(2)) == ["0000:01:00.0", "0000:01:00.1"]


def test_best_fitting_numa_node_is_used() -> None:
    # 3 fit on either node; node 0 (3 free) fits best and holds whole groups 1 and 2
    assert sorted(choose(3)) == ["0000:01:00.0", "0000:01:00.1", "0000:02:00.0"]


def test_single_device_does_not_split_a_group() -> None:
    assert choose(1) == ["0000:02:00.0"]


def test_must_include_brings_the_rest_of_its_group_and_its_node() -> None:
    assert sorted(choose(3, must=(1,))) == ["0000:01:00.0", "0000:01:00.1", "0000:02:00.0"]
    answer = choose(2, must=(3,))
    assert answer[0] == "0000:81:00.0" and answer[1] in ("0000:82:00.0", "0000:83:00.0")


def test_spills_to_the_other_node_only_when_needed() -> None:
    answer = choose(4)  # no node has 4: drain one node (ties: the lower), then one more
    assert {"0000:01:00.0", "0000:01:00.1", "0000:02:00.0"} <= set(answer)
    assert sum(a.startswith("0000:8") for a in answer) == 1


def test_a_group_is_split_only_when_nothing_else_fits() -> None:
    pool = [dev("0000:01:00.0", "1", 0), dev("0000:01:00.1", "1", 0), dev("0000:01:00.2", "1", 0)]
    assert len(choose(2, pool=pool)) == 2


def test_devices_without_group_or_numa_still_work() -> None:
    pool = [dev("0000:01:00.0", "", None), dev("0000:02:00.0", "", None)]
    assert sorted(choose(2, pool=pool)) == ["0000:01:00.0", "0000:02:00.0"]


@pytest.mark.parametrize(("size", "must"), [(7, ()), (1, (0, 1))])
def test_impossible_requests_leave_it_to_the_core(size: int, must: tuple[int, ...]) -> None:
    assert prefer_groups(POOL, [POOL[i] for i in must], size) is None
