"""Node lifetimes: IBM's two grace periods, with a controlled clock."""

from __future__ import annotations

from pathlib import Path

from cex.aptree import ApTree, FakeZcryptKernel
from dpkit.cex import shadow
from dpkit.cex.apbus import scan
from dpkit.cex.nodes import NodeKeeper
from dpkit.cex.zcrypt import ZcryptNodes


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _keeper(tree: ApTree, tmp_path: Path, clock: Clock) -> tuple[NodeKeeper, ZcryptNodes]:
    nodes = ZcryptNodes(tree.root, tmp_path / "dev")
    keeper = NodeKeeper(nodes, tmp_path / "shadow", unused_after=120, never_used_after=1800, clock=clock)
    return keeper, nodes


def _make(keeper: NodeKeeper, nodes: ZcryptNodes, tree: ApTree, tmp_path: Path, key: str,
          apqn: tuple[int, int]) -> None:
    keeper.provisioned(key)
    nodes.ensure(f"zcrypt-{key}", {apqn[0]}, {apqn[1]})
    shadow.build(tmp_path / "shadow", key, scan(tree.root), [apqn], live=False)


def test_grace_periods(tree: ApTree, kernel: FakeZcryptKernel, tmp_path: Path) -> None:
    clock = Clock()
    keeper, nodes = _keeper(tree, tmp_path, clock)
    _make(keeper, nodes, tree, tmp_path, "apqn-1-5-0", (1, 5))   # will be used, then released
    _make(keeper, nodes, tree, tmp_path, "apqn-2-5-0", (2, 5))   # never used (pod never started)
    _make(keeper, nodes, tree, tmp_path, "apqn-1-6-0", (1, 6))   # stays in use
    assert keeper.reconcile({"apqn-1-5-0", "apqn-1-6-0"}) == []
    clock.now += 119
    assert keeper.reconcile({"apqn-1-6-0"}) == []                # last seen in use 119 s ago (< 120)
    clock.now += 1
    assert keeper.reconcile({"apqn-1-6-0"}) == ["apqn-1-5-0"]    # 120 s: gone
    assert not nodes.exists("zcrypt-apqn-1-5-0") and not shadow.exists(tmp_path / "shadow", "apqn-1-5-0")
    clock.now += 1800 - 120 - 1
    assert keeper.reconcile({"apqn-1-6-0"}) == []                # made 1799 s ago, never used
    clock.now += 1
    assert keeper.reconcile({"apqn-1-6-0"}) == ["apqn-2-5-0"]
    assert nodes.names() == ["zcrypt-apqn-1-6-0"] and shadow.keys(tmp_path / "shadow") == ["apqn-1-6-0"]


def test_leftovers_of_an_earlier_run_get_the_full_grace(tree: ApTree, kernel: FakeZcryptKernel, tmp_path: Path) -> None:
    clock = Clock()
    first, nodes = _keeper(tree, tmp_path, clock)
    _make(first, nodes, tree, tmp_path, "apqn-1-5-0", (1, 5))
    clock.now += 5000
    again, _ = _keeper(tree, tmp_path, clock)           # a restarted plugin knows nothing of it
    assert again.reconcile(set()) == []
    clock.now += 1800
    assert again.reconcile(set()) == ["apqn-1-5-0"]


def test_provisioning_again_restarts_the_grace(tree: ApTree, kernel: FakeZcryptKernel, tmp_path: Path) -> None:
    clock = Clock()
    keeper, nodes = _keeper(tree, tmp_path, clock)
    _make(keeper, nodes, tree, tmp_path, "apqn-1-5-0", (1, 5))
    keeper.reconcile({"apqn-1-5-0"})
    clock.now += 500                                     # released long ago, now allocated anew
    keeper.provisioned("apqn-1-5-0")
    assert keeper.reconcile(set()) == []                 # the new pod is not listed yet: kept


def test_an_orphan_shadow_tree_is_removed_too(tree: ApTree, tmp_path: Path) -> None:
    clock = Clock()
    keeper, _ = _keeper(tree, tmp_path, clock)
    shadow.build(tmp_path / "shadow", "apqn-2-6-0", scan(tree.root), [(2, 6)], live=False)
    assert keeper.reconcile(set()) == []
    clock.now += 1800
    assert keeper.reconcile(set()) == ["apqn-2-6-0"] and shadow.keys(tmp_path / "shadow") == []
