"""Fixtures for the cex vendor: a fake AP bus in a temp dir, a fake zcrypt driver, a config file."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from cex.aptree import STANDARD_SETS, ApTree, FakeZcryptKernel, standard_tree, write_sets
from dpkit.cex.vendor import CexVendor


@pytest.fixture
def tree(tmp_path: Path) -> ApTree:
    return standard_tree(tmp_path / "sys")


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    return write_sets(tmp_path / "cex_resources.json", STANDARD_SETS)


@pytest.fixture
def kernel(tree: ApTree, tmp_path: Path) -> Iterator[FakeZcryptKernel]:
    with FakeZcryptKernel(tree.root, tmp_path / "dev") as fake:
        yield fake


@pytest.fixture
def vendor_config(tree: ApTree, config_file: Path, tmp_path: Path) -> dict[str, Any]:
    """A vendor section pointing every path at the test's temp dir."""
    return {"config_file": str(config_file), "sysfs_root": str(tree.root), "dev_dir": str(tmp_path / "dev"),
            "shadow_dir": str(tmp_path / "shadow"), "sysinfo_path": str(tmp_path / "sysinfo"),
            "pod_resources_socket": str(tmp_path / "no-kubelet.sock"), "node_timeout": 5.0}


@pytest.fixture
def make_vendor(vendor_config: dict[str, Any]) -> Callable[..., CexVendor]:
    def make(environ: dict[str, str] | None = None, **overrides: Any) -> CexVendor:
        return CexVendor({**vendor_config, **overrides}, environ=environ or {})

    return make
