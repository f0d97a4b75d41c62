"""A fresh fake host (sysfs tree + /dev directory) per test."""

from __future__ import annotations

from pathlib import Path

import pytest
from kvm_vfio.fakehost import FakeHost


@pytest.fixture
def host(tmp_path: Path) -> FakeHost:
    return FakeHost(tmp_path / "sys", tmp_path / "dev")
