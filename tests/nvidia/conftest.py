"""Fixtures for the NVIDIA vendor: the fake NVML library (built once per session) and a fake host."""

from __future__ import annotations

import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # tests/nvidia/fakenvml as `fakenvml`

from fakenvml import FakeHost, build_library


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
