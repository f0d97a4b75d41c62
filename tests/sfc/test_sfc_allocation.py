"""Preferred allocation: one physical NIC first, then one NUMA node, distinct ports before slots."""

from __future__ import annotations

from dpkit.core.vendorapi.allocation import is_valid_choice
from dpkit.core.vendorapi.device import Device
from dpkit.sfc.allocation import prefer


def nic(address: str, numa: int, slots: int = 1) -> list[Device]:
    ids = [address] if slots == 1 else [f"{address}-{n}" for n in range(slots)]
    return [Device(i, numa_nodes=(numa,), attributes={"pci": address, "nic": address.rsplit(".", 1)[0]})
            for i in ids]


def ids(devices: list[Device]) -> list[str]:
    return [d.id for d in devices]


def test_two_ports_of_one_card_before_two_cards() -> None:
    # card A (0000:03:00) has one free port on NUMA 0, card B two ports on NUMA 0, card C two on NUMA 1
    available = nic("0000:03:00.0", 0) + nic("0000:04:00.0", 0) + nic("0000:04:00.1", 0) \
        + nic("0000:81:00.0", 1) + nic("0000:81:00.1", 1)
    choice = prefer(available, [], 2)
    assert choice == ["0000:04:00.0", "0000:04:00.1"]


def test_best_fitting_card_keeps_big_cards_whole() -> None:
    available = nic("0000:03:00.0", 0) + nic("0000:04:00.0", 0) + nic("0000:04:00.1", 0)
    assert prefer(available, [], 1) == ["0000:03:00.0"]


def test_must_include_pulls_its_card_and_node() -> None:
    available = nic("0000:03:00.0", 0) + nic("0000:03:00.1", 0) + nic("0000:81:00.0", 1) + nic("0000:81:00.1", 1)
    must = [d for d in available if d.id == "0000:81:00.0"]
    assert prefer(available, must, 2) == ["0000:81:00.0", "0000:81:00.1"]


def test_spills_over_cards_within_one_numa_node() -> None:
    available = nic("0000:03:00.0", 0) + nic("0000:04:00.0", 0) + nic("0000:04:00.1", 0) \
        + nic("0000:81:00.0", 1) + nic("0000:81:00.1", 1)
    choice = prefer(available, [], 3)
    assert sorted(choice) == ["0000:03:00.0", "0000:04:00.0", "0000:04:00.1"]


def test_spans_numa_nodes_only_when_it_must() -> None:
    available = nic("0000:03:00.0", 0) + nic("0000:81:00.0", 1) + nic("0000:81:00.1", 1)
    choice = prefer(available, [], 3)
    assert choice[:2] == ["0000:81:00.0", "0000:81:00.1"] and choice[2] == "0000:03:00.0"


def test_distinct_ports_before_second_slots() -> None:
    available = nic("0000:03:00.0", 0, slots=3) + nic("0000:03:00.1", 0, slots=3)
    assert prefer(available, [], 2) == ["0000:03:00.0-0", "0000:03:00.1-0"]
    assert prefer(available, [], 3) == ["0000:03:00.0-0", "0000:03:00.1-0", "0000:03:00.0-1"]


def test_every_answer_is_valid_for_the_kubelet() -> None:
    available = nic("0000:03:00.0", 0, 2) + nic("0000:04:00.0", 0) + nic("0000:81:00.0", 1, 3) \
        + [Device("odd", attributes={})]
    for size in range(len(available) + 1):
        for must in ([], available[:1], available[-2:]):
            if len(must) > size:
                continue
            choice = prefer(available, must, size)
            assert is_valid_choice(choice, ids(available), ids(must), size), (size, ids(must), choice)
