"""The manager publishes an immutable, versioned PluginState; observers see only that, on their
own threads, so one that raises or hangs never delays health -> ListAndWatch (issue 11 point 2)."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import threading
import time
import typing
from pathlib import Path

import pytest
from scripted_vendor import RES, ScriptedVendor, widget

from dpkit.core.engine.state import Observer, PluginState, StatusFields
from dpkit.core.integrations.cdi import CdiWriter
from dpkit.core.integrations.labels import NodeLabelWriter
from dpkit.core.integrations.metrics import Metrics
from dpkit.core.integrations.podresources import PodResourcesView
from dpkit.core.tools.kubelet import Kubelet
from dpkit.core.vendorapi.device import Health

OTHER = "example.com/gadget"
CORE = Path(__file__).resolve().parents[2] / "core" / "src" / "dpkit" / "core"
BOUND = 2.0  # seconds: the kubelet sees a health change within this, whatever the observers do


class Recorder:
    """A well-behaved observer: keeps every state it is given."""

    def __init__(self) -> None:
        self.seen: list[PluginState] = []
        self.changed = threading.Condition()

    def publish(self, state: PluginState) -> None:
        with self.changed:
            self.seen.append(state)
            self.changed.notify_all()

    def status_fields(self, state: PluginState) -> StatusFields:
        return {"recorder": {"seen": len(self.seen)}}

    def close(self) -> None:
        pass

    def wait_for(self, predicate: typing.Callable[[PluginState], bool], timeout: float) -> PluginState:
        with self.changed:
            assert self.changed.wait_for(lambda: bool(self.seen) and predicate(self.seen[-1]), timeout), \
                f"no state matching within {timeout} s; last: {self.seen[-1] if self.seen else None}"
            return self.seen[-1]


class Blocking(Recorder):
    """Once armed, its next publish blocks (like a hung disk) until released, at most 10 s."""

    def __init__(self) -> None:
        super().__init__()
        self.armed = threading.Event()
        self.entered = threading.Event()
        self.release = threading.Event()

    def publish(self, state: PluginState) -> None:
        super().publish(state)
        if self.armed.is_set() and not self.release.is_set():
            self.entered.set()
            self.release.wait(10)


class Raising(Recorder):
    def publish(self, state: PluginState) -> None:
        super().publish(state)
        raise RuntimeError("observer bug")

    def status_fields(self, state: PluginState) -> StatusFields:
        raise RuntimeError("status bug")


def _state_observers(*observers: Observer) -> list[Observer]:
    """Typed on purpose: mypy checks each of them against the Observer protocol."""
    return list(observers)


def _two_resources() -> ScriptedVendor:
    return ScriptedVendor(snapshot={RES: tuple(widget(i) for i in range(4)),
                                    OTHER: tuple(widget(i) for i in range(10, 13))})


def _health(kubelet: Kubelet, device: str) -> str | None:
    found = kubelet.devices(RES).get(device)
    return found.health if found is not None else None


def test_state_is_immutable_versioned_and_shares_what_did_not_change(kubelet, run_manager, make_config) -> None:
    vendor = _two_resources()
    manager = run_manager(vendor, make_config(cdi_dir="", nfd_features_dir=""))
    assert kubelet.wait_for(lambda k: k.allocatable(RES) == 4 and k.allocatable(OTHER) == 3, 10)
    before = manager.current_state()
    assert manager.current_state() is before, "nothing changed: the same object, the same version"

    with pytest.raises(dataclasses.FrozenInstanceError):
        before.version = 99  # type: ignore[misc]
    with pytest.raises(TypeError):
        before.resources[RES] = before.resources[OTHER]  # type: ignore[index]
    assert isinstance(before.resources[RES].devices, tuple) and isinstance(before.errors, tuple)

    vendor.set_health("w1", Health.UNHEALTHY, "ECC error")
    assert kubelet.wait_for(lambda k: _health(k, "w1") == "Unhealthy", 10)
    after = manager.current_state()
    assert after.version > before.version
    assert after.changed_since(before) == {RES}
    assert after.resources[OTHER] is before.resources[OTHER], "an unchanged resource is shared, not rebuilt"
    changed = after.resources[RES]
    assert [d.reason for d in changed.devices if not d.healthy] == ["ECC error"]
    assert changed.devices[0] is before.resources[RES].devices[0], "unchanged devices are the same objects"
    assert changed.offered is before.resources[RES].offered, "the vendor's list did not change"
    assert before.resources[RES].allocatable == 4 and changed.allocatable == 3, "the old version stays as it was"

    vendor.push({RES: vendor.current[RES]})  # OTHER goes away
    assert kubelet.wait_for(lambda k: not k.registered(OTHER) or k.capacity(OTHER) == 0, 10)
    gone = manager.current_state()
    assert OTHER not in gone.resources and gone.changed_since(after) >= {OTHER}
    assert gone.version > after.version


def test_observers_are_called_with_the_state_only() -> None:
    expected = inspect.signature(Observer.publish)
    for cls in (CdiWriter, NodeLabelWriter, Metrics, PodResourcesView, Recorder):
        for method in ("publish", "status_fields"):
            hints = typing.get_type_hints(getattr(cls, method))
            params = [p for p in inspect.signature(getattr(cls, method)).parameters if p != "self"]
            assert params == ["state"] and hints["state"] is PluginState, f"{cls.__name__}.{method}"
        assert list(inspect.signature(cls.close).parameters) == ["self"], cls.__name__
    assert list(expected.parameters) == ["self", "state"]


def test_a_raising_and_a_blocked_observer_never_delay_the_kubelet(kubelet, run_manager, make_config) -> None:
    vendor = ScriptedVendor()
    blocking, raising, recorder = Blocking(), Raising(), Recorder()
    config = make_config(cdi_dir="", nfd_features_dir="")
    from dpkit.core.engine.manager import Manager

    manager = Manager(vendor, config)
    manager.observers.extend(_state_observers(blocking, raising, recorder))
    try:
        manager.start()
        assert kubelet.wait_for(lambda k: k.allocatable(RES) == 4, 10)
        blocking.armed.set()
        vendor.set_health("w0", Health.UNHEALTHY, "first")
        assert blocking.entered.wait(10), "the blocking observer got the change and is now stuck in it"

        took = []
        for i, device in enumerate(("w1", "w2", "w3")):  # each change reaches the kubelet while it is stuck
            started = time.monotonic()
            vendor.set_health(device, Health.UNHEALTHY, f"change {i}")
            assert kubelet.wait_for(lambda k, d=device: _health(k, d) == "Unhealthy", 10)
            took.append(time.monotonic() - started)
            recorder.wait_for(lambda s, d=device: not next(x for x in s.resources[RES].devices if x.id == d).healthy,
                              10)  # one published version per change
        assert max(took) < BOUND, f"kubelet saw the changes after {took} s"
        assert not blocking.release.is_set() and blocking.entered.is_set(), "the observer is still blocked"

        # the others still run: the recorder and the raising one both get the newest state
        last = recorder.wait_for(lambda s: s.resources[RES].allocatable == 0, 10)
        raising.wait_for(lambda s: s.resources[RES].allocatable == 0, 10)
        status = manager.status()  # the raising observer's status_fields fails; the rest answers
        assert status["recorder"]["seen"] >= 1 and status["resources"][0]["allocatable"] == 0
        failures = {o["name"]: o["failures"] for o in status["observers"]}
        assert failures["Raising"] >= 2 and failures["Blocking"] == 0 and failures["Recorder"] == 0

        # released, the slow one gets the newest state, not the ones it missed
        stuck_on = blocking.seen[-1].version
        blocking.release.set()
        newest = blocking.wait_for(lambda s: s.version >= last.version, 10)
        skipped = [s.version for s in recorder.seen if stuck_on < s.version < newest.version]
        assert skipped, "the recorder saw versions in between"
        assert next(s.version for s in blocking.seen if s.version > stuck_on) >= last.version, "no queue of old states"
    finally:
        blocking.release.set()
        manager.stop()


def test_the_seam_has_no_any_and_no_hasattr() -> None:
    """Observers are typed: no ``Any`` or attribute probing where the manager meets them."""
    seam = [CORE / "integrations" / "observers.py", CORE / "engine" / "state.py", CORE / "engine" / "publisher.py"]
    for path in seam:
        tree = ast.parse(path.read_text())
        names = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)} | {
            a.attr for a in ast.walk(tree) if isinstance(a, ast.Attribute)}
        imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) for a in n.names}
        assert not ({"Any", "hasattr", "getattr"} & (names | imported)), path.name
    manager = ast.parse((CORE / "engine" / "manager.py").read_text())
    calls = {n.func.id for n in ast.walk(manager) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)}
    assert "hasattr" not in calls, "the manager picks no observer by its attributes"
    for path in (CORE / "integrations").glob("*.py"):
        assert "engine.manager" not in path.read_text(), f"{path.name} depends on the state, not the manager"


def test_a_state_asked_for_during_start_up_is_never_built_beside_it(short_tmp) -> None:
    """A metrics scrape while start() applies the first snapshot must not build a state from half-made
    lists (it cleared the changed marks, and the resource kept an empty device list for good)."""
    from dpkit.core.engine.manager import Manager
    from dpkit.core.support.config import Config
    from dpkit.core.vendorapi.device import Device
    from dpkit.core.vendorapi.errors import DpkitError
    from dpkit.core.vendorapi.vendor import Vendor

    asked: list[object] = []

    class Scraped(Vendor):
        name = "scraped"
        poll_interval = 0.0

        def discover(self):  # runs while start() is in progress: a scrape arrives now
            def scrape() -> None:
                try:
                    asked.append(manager.current_state(timeout=1))
                except DpkitError as exc:
                    asked.append(exc)

            thread = threading.Thread(target=scrape)
            thread.start()
            thread.join(10)
            return {"example.com/a": tuple(Device(id=f"a{i}") for i in range(3))}

    manager = Manager(Scraped(), Config(plugin_dir=str(short_tmp / "dp"), state_dir=str(short_tmp / "st"),
                                        cdi_dir="", nfd_features_dir=""))
    manager.start()
    try:
        assert len(asked) == 1 and isinstance(asked[0], DpkitError), asked
        assert len(manager.current_state(timeout=5).resources["example.com/a"].devices) == 3
    finally:
        manager.stop()


def test_what_a_start_up_slower_than_stop_makes_is_removed_when_it_ends(short_tmp) -> None:
    """stop() waits 2 s for start-up; a step no interrupt reaches (a huge snapshot) may outlast that.
    What start-up makes after stop() tore down (servers, sockets, CDI files, threads) must go too."""
    from dpkit.core.engine.manager import Manager
    from dpkit.core.integrations.observers import attach_observers
    from dpkit.core.support.config import Config

    entered, release = threading.Event(), threading.Event()

    class Slow(Manager):
        def _apply_snapshot(self, source, snapshot):  # type: ignore[no-untyped-def]
            if source == "discover":
                entered.set()
                release.wait(10)
            super()._apply_snapshot(source, snapshot)

    config = Config(plugin_dir=str(short_tmp / "dp"), state_dir=str(short_tmp / "st"), cdi_dir=str(short_tmp / "cdi"),
                    nfd_features_dir="")
    manager = Slow(ScriptedVendor(), config)
    attach_observers(manager)
    starter = threading.Thread(target=manager.start)
    starter.start()
    assert entered.wait(10)
    manager.stop()  # gives start-up 2 s, then tears down what exists
    release.set()
    starter.join(10)
    assert not starter.is_alive()
    assert not list((short_tmp / "dp").glob("dpkit-*.sock")), "a server start-up made after stop() is left"
    assert not list((short_tmp / "cdi").glob("*.json")), "a CDI spec start-up wrote after stop() is left"
    left = [t.name for t in threading.enumerate() if t.name.startswith(("observer-", "vendor-watch", "manager-loop"))]
    assert left == []
