"""Every call into vendor code goes through dpkit.core.engine.vendor_calls: hangs get a deadline, failures a count."""

from __future__ import annotations

import ast
import logging
import os
import threading
import time
import urllib.request
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from scripted_vendor import RES, ScriptedVendor, widget

from dpkit.core.engine.manager import Manager
from dpkit.core.engine.vendor_calls import VendorCalls, VendorTimeout
from dpkit.core.integrations.metrics import Metrics
from dpkit.core.integrations.observers import attach_observers
from dpkit.core.support.config import Config
from dpkit.core.tools.kubelet import Kubelet
from dpkit.core.vendorapi.device import ContainerSpec, Snapshot
from dpkit.core.vendorapi.vendor import MetricSample, Vendor

TIMEOUT = 0.5
CORE = Path(__file__).resolve().parents[2] / "core" / "src" / "dpkit" / "core"
HOOKS = {"discover", "probes", "container_spec", "preferred_allocation", "pre_start", "node_labels",
         "metric_samples", "cdi_kind", "explain", "doctor", "close"}
VENDOR_NAMES = {"vendor", "old", "new_vendor"}  # plain names that hold a Vendor in core code


class Hanging(ScriptedVendor):
    """Hooks named in ``hang`` block like a stuck driver call until the test releases them."""

    def __init__(self, *hang: str) -> None:
        super().__init__()
        self.hang = set(hang)
        self.release = threading.Event()
        self.calls: dict[str, int] = {}

    def _maybe_hang(self, hook: str) -> None:
        self.calls[hook] = self.calls.get(hook, 0) + 1
        if hook in self.hang:
            self.release.wait(30)

    def container_spec(self, resource: str, devices: Any) -> ContainerSpec:
        self._maybe_hang("container_spec")
        return super().container_spec(resource, devices)

    def node_labels(self, snapshot: Snapshot) -> Mapping[str, str]:
        self._maybe_hang("node_labels")
        return {"example.com/widgets": str(sum(len(d) for d in snapshot.values()))}

    def discover(self) -> Snapshot:
        self._maybe_hang("discover")
        return super().discover()


class RaisingMetrics(ScriptedVendor):
    def metric_samples(self) -> Iterable[MetricSample]:
        raise RuntimeError("counter file vanished")


def _start_in_thread(manager: Manager, limit: float) -> float:
    """Manager.start() on a helper thread; its duration, failing the test if it does not return by ``limit``."""
    done = threading.Event()
    failed: list[BaseException] = []

    def body() -> None:
        try:
            manager.start()
        except BaseException as exc:
            failed.append(exc)
        finally:
            done.set()

    started = time.monotonic()
    threading.Thread(target=body, name="test-start", daemon=True).start()
    assert done.wait(limit), f"Manager.start() did not return within {limit} s"
    assert not failed, failed
    return time.monotonic() - started


@pytest.fixture
def managed(make_config: Callable[..., Config]) -> Iterator[Callable[..., Manager]]:
    """A Manager with the integrations its config turns on (as `dpkit run`), stopped after the test."""
    made: list[tuple[Manager, Vendor]] = []

    def make(vendor: Vendor, **overrides: Any) -> Manager:
        manager = Manager(vendor, make_config(vendor_call_timeout=TIMEOUT, vendor_scan_timeout=TIMEOUT, **overrides))
        attach_observers(manager)
        made.append((manager, vendor))
        return manager

    yield make
    for manager, vendor in reversed(made):
        if isinstance(vendor, Hanging):
            vendor.release.set()
        manager.stop()


def test_hung_container_spec_with_cdi_does_not_block_start(managed: Callable[..., Manager], kubelet: Kubelet,
                                                            short_tmp: Path) -> None:
    vendor = Hanging("container_spec")
    manager = managed(vendor)
    took = _start_in_thread(manager, TIMEOUT + 2)
    assert took < TIMEOUT + 2
    assert kubelet.wait_for(lambda k: k.registered(RES), 10)
    cdi = next(o for o in manager.observers if hasattr(o, "cdi_spec"))
    assert "did not answer within" in cdi.errors[RES]  # recorded for `dpkit status`
    assert vendor.calls["container_spec"] == 1, "one deadline per resource, not one per device"
    assert manager.calls.errors[("container_spec", "timeout")] == 1
    manager._notify_observers()  # nothing changed: not asked again
    assert vendor.calls["container_spec"] == 1


def test_hung_node_labels_do_not_block_start(managed: Callable[..., Manager], kubelet: Kubelet) -> None:
    vendor = Hanging("node_labels")
    manager = managed(vendor, cdi_dir="")
    _start_in_thread(manager, TIMEOUT + 2)
    assert kubelet.wait_for(lambda k: k.registered(RES), 10)
    labels = next(o for o in manager.observers if hasattr(o, "features_dir"))
    assert "did not answer within" in labels.last_error
    assert manager.calls.errors[("node_labels", "timeout")] == 1


def test_hung_discover_at_start_serves_nothing_and_returns(managed: Callable[..., Manager], kubelet: Kubelet) -> None:
    manager = managed(Hanging("discover"))
    _start_in_thread(manager, TIMEOUT + 2)
    assert manager.servers == {}
    assert any("discovery failed" in e["msg"] for e in manager.errors.entries)


def test_discover_raising_at_start_serves_nothing_and_logs_once(
        managed: Callable[..., Manager], kubelet: Kubelet, caplog: pytest.LogCaptureFixture) -> None:
    vendor = ScriptedVendor()
    vendor.discover_error = RuntimeError("no driver")
    manager = managed(vendor)
    with caplog.at_level(logging.WARNING, logger="dpkit"):
        _start_in_thread(manager, 5)
    assert manager.servers == {}
    assert list(Path(manager.config.plugin_dir).glob("dpkit-*.sock")) == []
    failures = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert [r.getMessage() for r in failures] == ["vendor discovery failed; keeping the last device list"]
    assert not any(r.exc_info for r in failures), "a clean line, no traceback"
    assert manager.calls.errors[("discover", "error")] == 1


def test_metric_samples_raising_is_counted_and_the_scrape_answers(managed: Callable[..., Manager],
                                                                  kubelet: Kubelet) -> None:
    manager = managed(RaisingMetrics(), metrics_address="127.0.0.1:0", cdi_dir="")
    _start_in_thread(manager, 5)
    metrics = next(o for o in manager.observers if isinstance(o, Metrics))
    for _ in range(2):
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics.port}/metrics", timeout=5) as response:
            assert response.status == 200
            text = response.read().decode()
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(text) for s in family.samples}
    assert samples[("dpkit_vendor_call_errors_total", (("hook", "metric_samples"), ("kind", "error")))] == 2
    assert samples[("dpkit_devices", (("health", "Healthy"), ("resource", RES)))] == 4


def test_adapter_runs_overridden_hooks_on_the_pool_and_defaults_inline() -> None:
    vendor = Hanging("node_labels")
    calls = VendorCalls(vendor, TIMEOUT)
    seen: list[str] = []

    class Spy(ScriptedVendor):
        def container_spec(self, resource: str, devices: Any) -> ContainerSpec:
            seen.append(threading.current_thread().name)
            return super().container_spec(resource, devices)

    try:
        started = time.monotonic()
        with pytest.raises(VendorTimeout, match=r"node_labels did not answer within 0\.5s"):
            calls.node_labels({})
        assert time.monotonic() - started < TIMEOUT + 1
        assert calls.errors == {("node_labels", "timeout"): 1}
    finally:
        vendor.release.set()
    spy = VendorCalls(Spy(), TIMEOUT)
    spy.container_spec(RES, [])
    assert seen and seen[0].startswith("vendor-call")
    assert spy.cdi_kind(RES) == RES  # not overridden: core code, right here
    with pytest.raises(KeyError):  # the vendor's own exception, not a wrapper
        VendorCalls(_Raising(), TIMEOUT).cdi_kind(RES)


def test_inline_hooks_run_on_the_callers_thread_and_are_still_counted() -> None:
    """A vendor's promise that a hook only reads memory saves the hop; only Allocate-path hooks qualify."""
    seen: list[str] = []

    class Inline(ScriptedVendor):
        inline_hooks = frozenset({"container_spec", "node_labels"})  # node_labels may not be inline

        def container_spec(self, resource: str, devices: Any) -> ContainerSpec:
            seen.append(threading.current_thread().name)
            if not devices:
                raise RuntimeError("no devices")
            return super().container_spec(resource, devices)

        def node_labels(self, snapshot: Snapshot) -> Mapping[str, str]:
            seen.append(threading.current_thread().name)
            return {}

    calls = VendorCalls(Inline(), TIMEOUT)
    calls.container_spec(RES, [widget(0)])
    assert seen == [threading.current_thread().name]
    with pytest.raises(RuntimeError, match="no devices"):
        calls.container_spec(RES, [])
    assert calls.errors == {("container_spec", "error"): 1}
    calls.node_labels({})
    assert seen[-1].startswith("vendor-call"), "a hook outside INLINE_HOOKS keeps its deadline"


class _Raising(ScriptedVendor):
    def cdi_kind(self, resource: str) -> str:
        raise KeyError(resource)


def _direct_hook_calls(tree: ast.AST) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in HOOKS):
            continue
        owner = node.func.value
        if isinstance(owner, ast.Name) and owner.id in VENDOR_NAMES:
            found.append((node.lineno, f"{owner.id}.{node.func.attr}"))
        elif isinstance(owner, ast.Attribute) and owner.attr == "vendor":
            found.append((node.lineno, f"....vendor.{node.func.attr}"))
    return found


def test_no_core_module_calls_a_vendor_hook_directly() -> None:
    offenders = {}
    for path in sorted(CORE.rglob("*.py")):
        if path.name in ("vendor_calls.py", "vendor.py") or "api" in path.parts:
            continue
        found = _direct_hook_calls(ast.parse(path.read_text(), str(path)))
        if found:
            offenders[path.name] = found
    assert offenders == {}


def test_the_scan_finds_a_direct_call() -> None:
    sample = "def f(manager, vendor):\n    manager.vendor.container_spec('r', [])\n    vendor.discover()\n"
    assert _direct_hook_calls(ast.parse(sample)) == [(2, "....vendor.container_spec"), (3, "vendor.discover")]



class _SlowScan(ScriptedVendor):
    """Discovery that takes longer than an Allocate deadline, as a big node's scan may."""

    def __init__(self) -> None:
        super().__init__()
        self.release = threading.Event()

    def discover(self) -> Snapshot:
        self.release.wait(TIMEOUT * 2)  # returns after 1 s unless released
        return super().discover()

    def container_spec(self, resource: str, devices: Any) -> ContainerSpec:
        self.release.wait(10)
        return super().container_spec(resource, devices)


def test_scans_get_their_own_longer_deadline() -> None:
    vendor = _SlowScan()
    calls = VendorCalls(vendor, TIMEOUT, scan_timeout=10)
    try:
        assert RES in calls.discover()  # 1 s: past vendor_call_timeout, within vendor_scan_timeout
        with pytest.raises(VendorTimeout, match=r"container_spec did not answer within 0\.5s"):
            calls.container_spec(RES, [])
        with pytest.raises(VendorTimeout, match=r"discover did not answer within 0\.5s"):
            VendorCalls(vendor, TIMEOUT, scan_timeout=TIMEOUT).discover()
    finally:
        vendor.release.set()


def test_a_forked_child_gets_a_pool_of_its_own() -> None:
    """The pool's threads do not survive fork: a child's first vendor call must not wait on them."""
    warm = VendorCalls(_SlowScan(), TIMEOUT)
    warm.vendor.release.set()  # type: ignore[attr-defined]
    warm.container_spec(RES, [])  # the parent's pool now has a thread, idle
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            child = _SlowScan()
            child.release.set()
            spec = VendorCalls(child, 5.0).container_spec(RES, [])
            os.write(write, b"ok" if isinstance(spec, ContainerSpec) else b"bad")
        finally:
            os._exit(0)
    os.close(write)
    deadline = time.monotonic() + 20
    while os.waitpid(pid, os.WNOHANG) == (0, 0):
        assert time.monotonic() < deadline, "the forked child's vendor call never ran"
        time.sleep(0.05)
    with os.fdopen(read) as pipe:
        assert pipe.read() == "ok"


def test_the_pool_grows_past_stuck_workers_even_after_it_ran_a_queued_job() -> None:
    """A worker that finished a job and took a queued one once left a stray permit: the next call then
    waited behind two stuck workers for its whole deadline instead of getting a new worker."""
    from dpkit.core.engine.vendor_calls import _DaemonPool

    pool = _DaemonPool(2)
    gate, hang = threading.Event(), threading.Event()
    try:
        first = pool.submit(gate.wait, 10)
        stuck = [pool.submit(hang.wait, 10), pool.submit(hang.wait, 10)]  # the second waits in the queue
        gate.set()
        assert first.result(timeout=5)
        deadline = time.monotonic() + 5
        while not all(f.running() for f in stuck):  # the freed worker took the queued job
            assert time.monotonic() < deadline
            time.sleep(0.01)
        for future in stuck:
            pool.abandon(future)
        assert pool.submit(lambda: "answer").result(timeout=2) == "answer"
    finally:
        hang.set()


def test_a_hung_close_of_a_reloaded_vendor_does_not_block_closing_the_new_one() -> None:
    release = threading.Event()
    closed: list[str] = []

    class Closing(ScriptedVendor):
        def __init__(self, label: str, hang: bool) -> None:
            super().__init__()
            self.label, self.hang = label, hang

        def close(self) -> None:
            if self.hang:
                release.wait(30)
            closed.append(self.label)

    old, new = Closing("old", hang=True), Closing("new", hang=False)
    calls = VendorCalls(old, TIMEOUT)
    try:
        calls.vendor = new  # a reload swaps the vendor, then closes the one it replaced
        with pytest.raises(VendorTimeout):
            calls.close(old)
        calls.close()  # stop: the current vendor's own close runs
        assert closed == ["new"]
    finally:
        release.set()
