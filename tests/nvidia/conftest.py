"""Fixtures for the NVIDIA vendor: the fake NVML library (built once per session) and a fake host."""

from __future__ import annotations

import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # tests/nvidia/fakenvml as `fakenvml`

from fakenvml import FakeHost, build_library

from dpkit.nvidia.vendor import NvidiaVendor


@pytest.fixture(scope="session")
def fake_library() -> Iterator[Path]:
    out = Path(tempfile.mkdtemp(prefix="fakenvml-"))
    try:
        yield build_library(out)
    finally:
        shutil.rmtree(out, ignore_errors=True)


@pytest.fixture
def host(fake_library: Path, short_tmp: Path, monkeypatch: pytest.MonkeyPatch) -> FakeHost:
    """A fake host; $FAKENVML_CONFIG points the library (and probe children) at its description."""
    fake = FakeHost(short_tmp / "host", fake_library)
    fake.root.mkdir()
    monkeypatch.setenv("FAKENVML_CONFIG", str(fake.description))
    for name in ("CONFIG_FILE", "MIG_STRATEGY", "DEVICE_LIST_STRATEGY", "DEVICE_ID_STRATEGY", "PASS_DEVICE_SPECS",
                 "DP_DISABLE_HEALTHCHECKS", "DP_ENABLE_HEALTHCHECKS", "NVIDIA_DRIVER_ROOT", "NVIDIA_DEV_ROOT"):
        monkeypatch.delenv(name, raising=False)
    return fake


@pytest.fixture
def vendors(host: FakeHost) -> Iterator[Callable[..., NvidiaVendor]]:
    """Makes NvidiaVendors on the fake host (``vendors(config, environ=None)``); closes them all at the end."""
    made: list[NvidiaVendor] = []

    def make(config: Mapping[str, Any], environ: Mapping[str, str] | None = None) -> NvidiaVendor:
        vendor = NvidiaVendor(config, environ=environ or {})
        made.append(vendor)
        return vendor

    yield make
    for vendor in made:
        vendor.close()
