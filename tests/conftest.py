"""Shared fixtures: a real kubelet emulator and a real manager over real unix sockets in tmp dirs.

Unix socket paths are limited to 107 bytes, so sockets live under a short /tmp directory
rather than pytest's deep tmp_path.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from dpkit.core.engine.manager import Manager
from dpkit.core.support.config import Config
from dpkit.core.tools.kubelet import Kubelet
from dpkit.core.vendorapi.vendor import Vendor


@pytest.fixture(autouse=True)
def restore_dpkit_logging() -> Iterator[None]:
    """CLI entry points configure the ``dpkit`` logger for the process; undo that after each test."""
    logger = logging.getLogger("dpkit")
    saved = (logger.level, list(logger.handlers), logger.propagate)
    yield
    logger.setLevel(saved[0])
    logger.handlers[:] = saved[1]
    logger.propagate = saved[2]


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="dpk-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def plugin_dir(short_tmp: Path) -> Path:
    return short_tmp / "dp"


@pytest.fixture
def kubelet(short_tmp: Path, plugin_dir: Path) -> Iterator[Kubelet]:
    k = Kubelet(plugin_dir, pod_resources_socket=short_tmp / "pr" / "kubelet.sock").start()
    try:
        yield k
    finally:
        k.stop()


@pytest.fixture
def make_config(short_tmp: Path, plugin_dir: Path) -> Callable[..., Config]:
    def make(**overrides: Any) -> Config:
        base = Config(plugin_dir=str(plugin_dir), state_dir=str(short_tmp / "st"),
                      pod_resources_socket=str(short_tmp / "pr" / "kubelet.sock"),
                      cdi_dir=str(short_tmp / "cdi"), nfd_features_dir=str(short_tmp / "nfd"))
        return base.replace(**overrides)

    return make


@pytest.fixture
def run_manager(make_config: Callable[..., Config]) -> Iterator[Callable[..., Manager]]:
    """Start a Manager for a vendor; every manager started is stopped after the test."""
    started: list[Manager] = []

    def run(vendor: Vendor, config: Config | None = None, **config_overrides: Any) -> Manager:
        manager = Manager(vendor, config or make_config(**config_overrides))
        manager.start()
        started.append(manager)
        return manager

    yield run
    for manager in reversed(started):
        manager.stop()
