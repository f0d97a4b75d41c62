"""Fixtures for the sfc vendor on a fake Solarflare host (sfc/fakehost.py, a module of its own so the
bench can build the same host without pytest)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sfc.fakehost import FakeHost

from dpkit.sfc.vendor import SfcVendor


@pytest.fixture
def host(tmp_path: Path) -> FakeHost:
    return FakeHost(tmp_path / "host")


@pytest.fixture
def make_vendor(host: FakeHost) -> Iterator[Callable[..., SfcVendor]]:
    made: list[SfcVendor] = []

    def make(**overrides: Any) -> SfcVendor:
        vendor = SfcVendor(host.config(**overrides))
        made.append(vendor)
        return vendor

    yield make
    for vendor in made:
        vendor.close()
