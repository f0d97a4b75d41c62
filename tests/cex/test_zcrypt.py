"""zcrypt nodes through the create/destroy files, played by a fake driver over plain files."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from cex.aptree import ApTree, FakeZcryptKernel, mask
from dpkit.cex.zcrypt import ZcryptError, ZcryptNodes

NAME = "zcrypt-apqn-1-5-0"


def test_ensure_makes_a_node_restricted_to_the_apqns(tree: ApTree, kernel: FakeZcryptKernel, tmp_path: Path) -> None:
    nodes = ZcryptNodes(tree.root, tmp_path / "dev")
    dev = nodes.ensure(NAME, {1, 2}, {5})
    assert dev == tmp_path / "dev" / NAME and nodes.exists(NAME) and nodes.names() == [NAME]
    assert kernel.created == [NAME]
    node = kernel.node(NAME)
    assert (node / "apmask").read_text() == mask({1, 2}) + "\n"
    assert (node / "aqmask").read_text() == mask({5}) + "\n"
    assert (node / "ioctlmask").read_text() == mask(range(256)) + "\n"
    assert (node / "admask").read_text() == mask(()) + "\n"  # no control domains
    assert stat.S_IMODE(dev.stat().st_mode) == 0o666


def test_ensure_is_idempotent_and_rewrites_the_masks(tree: ApTree, kernel: FakeZcryptKernel, tmp_path: Path) -> None:
    nodes = ZcryptNodes(tree.root, tmp_path / "dev")
    nodes.ensure(NAME, {1}, {5})
    (kernel.node(NAME) / "apmask").write_text(mask(range(256)))  # someone widened it
    nodes.ensure(NAME, {1}, {5})
    assert kernel.created == [NAME]
    assert (kernel.node(NAME) / "apmask").read_text() == mask({1}) + "\n"


def test_destroy_removes_node_and_dev(tree: ApTree, kernel: FakeZcryptKernel, tmp_path: Path) -> None:
    nodes = ZcryptNodes(tree.root, tmp_path / "dev")
    nodes.ensure(NAME, {1}, {5})
    assert nodes.destroy(NAME)
    assert not nodes.exists(NAME) and not (tmp_path / "dev" / NAME).exists() and kernel.destroyed == [NAME]
    assert nodes.destroy(NAME)  # already gone: nothing to do


def test_no_multi_node_support_is_a_clear_error(tmp_path: Path) -> None:
    nodes = ZcryptNodes(tmp_path / "sys", tmp_path / "dev")
    assert not nodes.supported() and nodes.names() == []
    with pytest.raises(ZcryptError, match="CONFIG_ZCRYPT_MULTIDEVNODES"):
        nodes.ensure(NAME, {1}, {5})


def test_a_node_udev_never_makes_is_destroyed_again(tree: ApTree, tmp_path: Path) -> None:
    with FakeZcryptKernel(tree.root, tmp_path / "dev", make_dev=False) as kernel:
        nodes = ZcryptNodes(tree.root, tmp_path / "dev", timeout=0.3)
        with pytest.raises(ZcryptError, match=r"udev made no .*zcrypt-apqn-1-5-0 within 0.3 s"):
            nodes.ensure(NAME, {1}, {5})
        assert kernel.destroyed == [NAME] and not nodes.exists(NAME)


def test_a_create_the_kernel_ignores_times_out(tree: ApTree, tmp_path: Path) -> None:
    with FakeZcryptKernel(tree.root, tmp_path / "dev", honour_create=False):
        nodes = ZcryptNodes(tree.root, tmp_path / "dev", timeout=0.3)
        with pytest.raises(ZcryptError, match=r"did not appear within 0.3 s"):
            nodes.ensure(NAME, {1}, {5})


def test_names_are_checked_before_anything_is_written(tree: ApTree, tmp_path: Path) -> None:
    nodes = ZcryptNodes(tree.root, tmp_path / "dev")
    for bad in ("zcrypt-apqn-1-5-0\nzcrypt", "../x", "zcrypt-apqn-1000-5-0", "z90crypt"):
        with pytest.raises(ZcryptError, match="invalid zcrypt node name"):
            nodes.ensure(bad, {1}, {5})
    assert (tree.zcrypt_class / "create").read_text() == ""


def test_foreign_nodes_are_not_listed(tree: ApTree, tmp_path: Path) -> None:
    (tree.root / "devices" / "virtual" / "zcrypt" / "my-own-node").mkdir()
    (tree.root / "devices" / "virtual" / "zcrypt" / "zcrypt-apqn-2-6-1").mkdir()
    assert ZcryptNodes(tree.root, tmp_path / "dev").names() == ["zcrypt-apqn-2-6-1"]
