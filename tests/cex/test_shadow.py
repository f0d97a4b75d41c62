"""Shadow sysfs: a read-only AP bus view with only the allocated APQNs, built atomically."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from cex.aptree import ApTree, mask
from dpkit.cex import shadow
from dpkit.cex.apbus import scan


def test_the_shadow_shows_only_the_allocated_apqns(tree: ApTree, tmp_path: Path) -> None:
    tree.set("01.0005", "request_count", "999")
    built = shadow.build(tmp_path / "shadow", "apqn-1-5-0", scan(tree.root), [(1, 5), (2, 5)], live=False)
    assert built.root == tmp_path / "shadow" / "sysfs-apqn-1-5-0" and built.live == ()
    bus, devices = built.bus_dir, built.devices_dir
    assert sorted(os.listdir(bus / "devices")) == ["01.0005", "02.0005", "card01", "card02"]
    assert sorted(os.listdir(devices)) == ["card01", "card02"]
    assert (bus / "ap_adapter_mask").read_text() == mask({1, 2}) + "\n"
    assert (bus / "ap_usage_domain_mask").read_text() == mask({5}) + "\n"
    assert (bus / "ap_control_domain_mask").read_text() == mask(()) + "\n"
    assert (bus / "ap_domain").read_text() == "5\n"
    assert (bus / "ap_max_domain_id").read_text() == "84\n"      # copied from the real bus
    queue = bus / "devices" / "01.0005"                              # relative links resolve inside the tree
    assert queue.resolve() == devices / "card01" / "01.0005"
    assert (queue / "request_count").read_text() == "0\n"           # counters start at 0
    assert (queue / "mkvps").read_text().startswith("AES CUR")
    assert (devices / "card01" / "type").read_text() == "CEX7C\n"
    assert (queue / "subsystem").resolve() == bus
    assert stat.S_IMODE((queue / "online").stat().st_mode) == 0o444
    assert not (devices / "card01" / "01.0006").exists()            # same card, other domain: hidden
    assert shadow.keys(tmp_path / "shadow") == ["apqn-1-5-0"]


def test_live_sysfs_mounts_the_real_queue_directories_where_ibm_does(tree: ApTree, tmp_path: Path) -> None:
    built = shadow.build(tmp_path / "shadow", "apqn-1-5-0", scan(tree.root), [(1, 5)], live=True)
    # IBM's shadowsysfs.go addLiveMounts: host <APSYSFS_DEVSDIR>/cardAA/AA.DDDD, container /sys/bus/ap/devices/AA.DDDD
    assert built.live == ((str(tree.devices / "card01" / "01.0005"), "/sys/bus/ap/devices/01.0005"),)
    # the target is the shadow bus link, which the runtime follows to the shadow queue directory
    target = built.bus_dir / "devices" / "01.0005"
    assert target.is_symlink() and target.resolve() == (built.devices_dir / "card01" / "01.0005").resolve()
    # and, as in IBM's live view, the card's state and counters are its queue's
    card = built.devices_dir / "card01"
    for name in ("online", "pendingq_count", "request_count", "requestq_count"):
        assert os.readlink(card / name) == f"01.0005/{name}"
    assert (card / "load").read_text() == "0\n"
    static = shadow.build(tmp_path / "shadow", "apqn-1-5-0", scan(tree.root), [(1, 5)], live=False)
    assert static.live == () and not (static.devices_dir / "card01" / "online").is_symlink()


def test_ibm_devices_dir_sets_the_live_host_path(tree: ApTree, tmp_path: Path) -> None:
    tree_layout = shadow.layout(tmp_path / "shadow", "apqn-2-5-0", [(2, 5)], live=True, bus_dir=tree.bus,
                                devices_dir="/srv/ap")
    assert tree_layout.live == (("/srv/ap/card02/02.0005", "/sys/bus/ap/devices/02.0005"),)
    default = shadow.layout(tmp_path / "shadow", "apqn-2-5-0", [(2, 5)], live=True, bus_dir=tree.bus)
    assert default.live == ((str(tree.devices / "card02" / "02.0005"), "/sys/bus/ap/devices/02.0005"),)


def test_rebuild_replaces_and_remove_deletes(tree: ApTree, tmp_path: Path) -> None:
    base = tmp_path / "shadow"
    shadow.build(base, "apqn-1-5-0", scan(tree.root), [(1, 5)], live=False)
    built = shadow.build(base, "apqn-1-5-0", scan(tree.root), [(1, 6)], live=False)
    assert sorted(os.listdir(built.bus_dir / "devices")) == ["01.0006", "card01"]
    assert sorted(os.listdir(base)) == ["sysfs-apqn-1-5-0"]  # no scratch dirs left
    shadow.remove(base, "apqn-1-5-0")
    assert not shadow.exists(base, "apqn-1-5-0") and shadow.keys(base) == []


def test_the_tree_records_the_apqns_it_shows(tree: ApTree, tmp_path: Path) -> None:
    base = tmp_path / "shadow"
    assert not shadow.matches(base, "apqn-1-5-0", [(1, 5)])                 # no tree yet
    built = shadow.build(base, "apqn-1-5-0", scan(tree.root), [(2, 5), (1, 5)], live=True)
    assert (built.root / shadow.MARKER).read_text() == "01.0005,02.0005\n"  # outside both mounts
    assert shadow.matches(base, "apqn-1-5-0", [(1, 5), (2, 5)])
    assert not shadow.matches(base, "apqn-1-5-0", [(1, 5)])
    (built.root / shadow.MARKER).unlink()                                   # an earlier version's tree
    assert not shadow.matches(base, "apqn-1-5-0", [(1, 5), (2, 5)])


def test_a_failed_rebuild_keeps_the_old_tree(tree: ApTree, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    base = tmp_path / "shadow"
    shadow.build(base, "apqn-1-5-0", scan(tree.root), [(1, 5)], live=False)
    real_rename = os.rename

    def failing_rename(src: str | Path, dst: str | Path) -> None:
        if Path(src).name.startswith(".sysfs-"):                            # the swap into place
            raise OSError(28, "No space left on device")
        real_rename(src, dst)

    monkeypatch.setattr(shadow.os, "rename", failing_rename)
    with pytest.raises(shadow.ShadowError, match=r"cannot build shadow sysfs .*No space left"):
        shadow.build(base, "apqn-1-5-0", scan(tree.root), [(1, 5), (2, 5)], live=False)
    assert shadow.matches(base, "apqn-1-5-0", [(1, 5)])
    assert sorted(os.listdir(base)) == ["sysfs-apqn-1-5-0"]


def test_bad_requests_leave_nothing_behind(tree: ApTree, tmp_path: Path) -> None:
    base = tmp_path / "shadow"
    with pytest.raises(shadow.ShadowError, match=r"not on the AP bus: 09.0005"):
        shadow.build(base, "apqn-9-5-0", scan(tree.root), [(9, 5)], live=False)
    with pytest.raises(shadow.ShadowError, match="invalid shadow key"):
        shadow.build(base, "../../etc", scan(tree.root), [(1, 5)], live=False)
    assert not base.exists() or os.listdir(base) == []
    blocked = tmp_path / "file"
    blocked.write_text("")
    with pytest.raises(shadow.ShadowError, match="cannot create a shadow sysfs"):
        shadow.build(blocked / "sub", "apqn-1-5-0", scan(tree.root), [(1, 5)], live=False)
