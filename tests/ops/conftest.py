"""Fixtures for the operator integrations: managers with observers attached, scraping, waiting."""

from __future__ import annotations

import time
import urllib.request
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from dpkit.core.engine.manager import Manager
from dpkit.core.integrations.observers import attach_observers
from dpkit.core.support.config import Config
from dpkit.core.vendorapi.vendor import Vendor


def eventually(predicate: Callable[[], Any], timeout: float = 10.0, interval: float = 0.02) -> Any:
    """Poll ``predicate`` until it returns something truthy; fail the test after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s: {predicate}")
        time.sleep(interval)


@pytest.fixture
def run_ops(make_config: Callable[..., Config]) -> Iterator[Callable[..., Manager]]:
    """Start a Manager with the integrations its config enables, as ``dpkit run`` does."""
    started: list[Manager] = []

    def run(vendor: Vendor, **overrides: Any) -> Manager:
        manager = Manager(vendor, make_config(**overrides))
        attach_observers(manager)
        started.append(manager)
        manager.start()
        return manager

    yield run
    for manager in reversed(started):
        manager.stop()


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(port: int) -> Samples:
    """GET /metrics over real HTTP and parse it with Prometheus's own parser."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        assert response.status == 200
        text = response.read().decode()
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


@pytest.fixture(name="eventually")
def eventually_fixture() -> Callable[..., Any]:
    return eventually


@pytest.fixture(name="scrape")
def scrape_fixture() -> Callable[[int], Samples]:
    return scrape


@pytest.fixture(name="metric")
def metric_fixture() -> Callable[..., float | None]:
    return value
