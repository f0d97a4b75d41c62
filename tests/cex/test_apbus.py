"""AP bus scans over fake sysfs trees: modes, generations, states, and garbage that must not crash."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from cex.aptree import ApTree, mask
from dpkit.cex.apbus import format_mask, parse_mask, scan


def test_scan_reads_adapters_queues_modes_and_generations(tree: ApTree) -> None:
    bus = scan(tree.root)
    assert bus.present and bus.notes == ()
    modes = {n: (a.mode, a.gen, a.type) for n, a in bus.adapters.items()}
    assert modes == {1: ("cca", 7, "CEX7C"), 2: ("cca", 7, "CEX7C"), 3: ("ep11", 8, "CEX8P"),
                     4: ("accel", 6, "CEX6A"), 5: ("cca", 5, "CEX5C"), 6: ("cca", 7, "CEX7C")}
    assert sorted(bus.queues) == [(1, 5), (1, 6), (2, 5), (2, 6), (3, 5), (4, 5), (5, 5), (6, 7)]
    assert bus.queues[(1, 5)].name == "01.0005" and bus.usage_domains == {5, 6}
    assert all(not q.problems for q in bus.queues.values())


def test_mode_comes_from_ap_functions_then_type_and_generation_from_hwtype(tmp_path: Path) -> None:
    tree = ApTree(tmp_path)
    tree.adapter(1, "CEX7C", functions="0x06000000")        # the function bits say EP11: they win
    tree.adapter(2, "CEX7P", functions="garbage")           # unreadable bits: the type's letter
    tree.adapter(3, "XYZ", functions="0x00000000", hwtype="12")  # unknown type: generation from hwtype
    bus = scan(tmp_path)
    assert (bus.adapters[1].mode, bus.adapters[2].mode) == ("ep11", "ep11")
    assert (bus.adapters[3].mode, bus.adapters[3].gen, bus.adapters[3].gen_name) == (None, 6, "cex6")


@pytest.mark.parametrize(("where", "attr", "value", "problem"), [
    ("01.0005", "online", "0", "APQN 01.0005 is offline"),
    ("01.0005", "config", "0", "APQN 01.0005 is configured off"),
    ("01.0005", "chkstop", "1", "APQN 01.0005 is checkstopped"),
    ("01.0005", "online", "banana", "online attribute holds 'banana'"),
    ("01.0005", "chkstop", "\x00\xff", "chkstop attribute holds"),
    ("card01", "online", "0", "adapter card01 is offline"),
    ("card01", "config", "0", "adapter card01 is configured off"),
    ("card01", "chkstop", "1", "adapter card01 is checkstopped"),
])
def test_states_become_problems(tree: ApTree, where: str, attr: str, value: str, problem: str) -> None:
    tree.set(where, attr, value)
    bus = scan(tree.root)
    found = bus.queues[(1, 5)].problems if "." in where else bus.adapters[1].problems
    assert any(problem in p for p in found), found


def test_missing_config_and_chkstop_mean_an_older_kernel_not_a_problem(tree: ApTree) -> None:
    (tree.path("01.0005") / "config").unlink()
    (tree.path("01.0005") / "chkstop").unlink()
    assert scan(tree.root).queues[(1, 5)].problems == ()


def test_garbage_and_vanishing_entries_are_notes_never_exceptions(tree: ApTree) -> None:
    os.symlink("../../../devices/ap/nowhere", tree.bus / "devices" / "card0z")    # not a card name
    os.symlink("../../../devices/ap/nowhere", tree.bus / "devices" / "07.0005")   # queue of no card
    os.symlink("../../../devices/ap/nowhere", tree.bus / "devices" / "01.0100")   # domain 256
    (tree.path("02.0005") / "online").unlink()                                   # vanished mid-scan
    (tree.bus / "ap_usage_domain_mask").write_text("0xnothex\n")
    bus = scan(tree.root)
    assert any("card0z" in n for n in bus.notes)
    assert any("07.0005" in n and "card07 is not on the bus" in n for n in bus.notes)
    assert any("01.0100" in n and "above 255" in n for n in bus.notes)
    assert any("ap_usage_domain_mask" in n for n in bus.notes) and bus.usage_domains is None
    assert bus.queues[(2, 5)].problems == ("APQN 02.0005 has no readable online attribute (vanished?)",)


def test_no_ap_bus_is_reported_not_raised(tmp_path: Path) -> None:
    bus = scan(tmp_path / "empty")
    assert not bus.present and bus.adapters == {} and bus.queues == {}


def test_request_counters(tree: ApTree) -> None:
    tree.set("01.0005", "request_count", "12345")
    tree.set("02.0005", "request_count", "lots")
    bus = scan(tree.root)
    assert bus.request_count(bus.queues[(1, 5)]) == 12345
    assert bus.request_count(bus.queues[(2, 5)]) is None


def test_masks_count_bits_from_the_most_significant() -> None:
    assert parse_mask("0x0600000000000000000000000000000000000000000000000000000000000000") == {5, 6}
    assert parse_mask(mask((0, 255))) == {0, 255}
    assert parse_mask(format_mask({1, 2, 200})) == {1, 2, 200}
    assert format_mask(set()) == "0x" + "0" * 64
    assert parse_mask("0x80") == {0}  # short masks (older kernels) are read as written
    for bad in (None, "", "0x", "0x" + "f" * 65, "zz"):
        assert parse_mask(bad) is None
    with pytest.raises(ValueError):
        format_mask({256})
