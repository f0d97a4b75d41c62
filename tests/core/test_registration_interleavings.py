"""KubeletLink under forced interleavings: add, remove, kubelet restart and stop in the middle of a pass.

Real kubelet emulator, real resource servers on real unix sockets. The link's thread is held at a
known point by a gate in ``socket_present`` (which every pass calls for every resource just before
restarting or registering it); the test does its membership change while the thread is held and
only then lets it go. Every wait has a timeout; nothing depends on sleeping long enough.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from scripted_vendor import ScriptedVendor, widget

from dpkit.core.engine.registration import KubeletLink
from dpkit.core.engine.server import ResourceServer
from dpkit.core.tools.kubelet import Kubelet

A = "example.com/alpha"
B = "example.com/beta"
SENTINEL = "example.com/sentinel"
WAIT = 10.0


class Gate:
    """Holds the link's thread once: ``reached`` when it arrives, it goes on after ``release``."""

    def __init__(self) -> None:
        self.reached = threading.Event()
        self.release = threading.Event()


class GatedServer(ResourceServer):
    """A real server whose ``socket_present`` can hold the link thread once at a gate."""

    def __init__(self, resource: str, plugin_dir: Path, count: int = 4) -> None:
        super().__init__(resource, ScriptedVendor(), plugin_dir)
        self.update([widget(i) for i in range(count)])
        self.gate: Gate | None = None

    def socket_present(self) -> bool:
        gate = self.gate
        if gate is not None and threading.current_thread().name == "kubelet-link":
            self.gate = None
            gate.reached.set()
            gate.release.wait(WAIT)
        return super().socket_present()


class Link(KubeletLink):
    """The real link, telling the test when a removal starts to wait for work in flight."""

    def __init__(self, plugin_dir: Path) -> None:
        super().__init__(plugin_dir, "kubelet.sock", backoff_max=0.2)
        self.removal_blocked = threading.Event()

    def _removal_waits(self, resource: str) -> None:
        self.removal_blocked.set()


class Servers:
    """Real resource servers for the test, each started; all stopped at the end."""

    def __init__(self, plugin_dir: Path) -> None:
        self.plugin_dir = plugin_dir
        self.made: list[GatedServer] = []

    def __call__(self, resource: str, count: int = 4) -> GatedServer:
        server = GatedServer(resource, self.plugin_dir, count)
        server.start()
        self.made.append(server)
        return server


@pytest.fixture
def servers(plugin_dir: Path) -> Iterator[Servers]:
    made = Servers(plugin_dir)
    yield made
    for server in made.made:
        server.stop()


@pytest.fixture
def link(plugin_dir: Path) -> Iterator[Link]:
    made = Link(plugin_dir)
    yield made
    made.stop()


def in_thread(target: Callable[[], None]) -> threading.Thread:
    thread = threading.Thread(target=target, name="test-helper", daemon=True)
    thread.start()
    return thread


def remove_like_the_manager(link: Link, server: ResourceServer, done: threading.Event) -> None:
    """What Manager._remove_resource does: the link lets go of the resource, then its server stops."""
    link.remove(server.resource)
    server.stop()
    done.set()


def after_the_pass(kubelet: Kubelet, link: Link, servers: Servers) -> None:
    """A barrier: a resource added now is registered only after the pass in progress has ended."""
    link.add(servers(SENTINEL, 1))
    assert kubelet.wait_for(lambda k: k.registered(SENTINEL) and link.registered(SENTINEL), WAIT), (
        "the link stopped reconciling"
    )


def serving_both(kubelet: Kubelet, link: Link, servers: Servers) -> tuple[GatedServer, GatedServer]:
    """B and A served, the link started, both registered at the kubelet and at the link."""
    b, a = servers(B), servers(A)
    link.start()
    link.add(b)
    link.add(a)
    assert kubelet.wait_for(lambda k: all(k.registered(r) and link.registered(r) for r in (A, B)), WAIT)
    return b, a


def remove_while_held(link: Link, a: GatedServer, held: str, gate: Gate) -> None:
    """Remove A as the manager does while the pass is held at ``held``'s gate, then let the pass go on."""
    removed = threading.Event()
    helper = in_thread(lambda: remove_like_the_manager(link, a, removed))
    if held == A:  # the removal waits for A's work in flight (the fixed link says when it starts waiting)
        assert link.removal_blocked.wait(WAIT) or removed.is_set()
        assert not (link.removal_blocked.is_set() and removed.is_set()), "removal returned during A's work"
    else:
        assert removed.wait(WAIT)
    gate.release.set()
    helper.join(WAIT)
    assert removed.is_set() and not a.socket_path.exists()


def registrations_of(kubelet: Kubelet, resource: str, since: int) -> list[str]:
    return [r for _, r in kubelet.registrations[since:] if r == resource]


def assert_gone(kubelet: Kubelet, link: Link, server: GatedServer, since: int) -> None:
    """The removed resource: no socket, not registered again, not listed by the kubelet or the link."""
    assert not server.socket_path.exists(), "the removed resource's socket outlived its removal"
    assert not server.running, "the removed resource's server was started again"
    assert registrations_of(kubelet, server.resource, since) == [], "the removed resource was registered again"
    assert not kubelet.registered(server.resource)
    assert not link.registered(server.resource) and server.resource not in link.state


# -- remove during a pass ------------------------------------------------------------------
@pytest.mark.parametrize("held", [A, B], ids=["its-own-registration", "another-resource"])
def test_remove_during_a_pass_is_final(kubelet: Kubelet, link: Link, servers: Servers, held: str) -> None:
    """A removal that lands while the pass is at the removed resource (or at another) is never undone."""
    b, a = serving_both(kubelet, link, servers)
    gate = Gate()
    (a if held == A else b).gate = gate
    link.kick()
    assert gate.reached.wait(WAIT)
    # A is removed while the pass holds a copy of it. Its socket is already gone (as after a kubelet
    # restart), so the pass would restart the server if it still acted on it.
    a.socket_path.unlink()
    since = len(kubelet.registrations)
    remove_while_held(link, a, held, gate)
    after_the_pass(kubelet, link, servers)
    assert_gone(kubelet, link, a, since)
    assert kubelet.registered(B) and link.registered(B)


# -- add and remove during a pass ----------------------------------------------------------
def test_replace_and_add_during_a_pass(kubelet: Kubelet, link: Link, servers: Servers) -> None:
    """A resource replaced mid-pass (removed, added with a new server) is served by the new server only.

    The kubelet also restarts while the pass is held, so every socket the pass meets is gone: a pass
    still acting on the old server object would restart it over the new server's socket path.
    """
    b, a = serving_both(kubelet, link, servers)
    gate = Gate()
    b.gate = gate
    link.kick()
    assert gate.reached.wait(WAIT)
    removed = threading.Event()
    remove_like_the_manager(link, a, removed)  # A is not in flight: returns at once
    assert removed.is_set()
    a2 = servers(A, 2)  # a reload: same resource, new server, two devices instead of four
    link.add(a2)
    c = servers("example.com/gamma", 3)
    link.add(c)
    kubelet.restart()
    gate.release.set()
    assert kubelet.wait_for(lambda k: sorted(k.devices(A)) == ["w0", "w1"] and k.registered(A), WAIT), (
        f"the kubelet lists {sorted(kubelet.devices(A))} for {A}, not the new server's two devices"
    )
    assert kubelet.wait_for(lambda k: k.capacity(c.resource) == 3 and k.registered(B), WAIT)
    assert kubelet.wait_for(lambda k: all(link.registered(r) for r in (A, B, c.resource)), WAIT)
    assert not a.running, "the removed server was restarted"
    assert a2.socket_present() and a2.running


# -- kubelet restart during removal --------------------------------------------------------
@pytest.mark.parametrize("held", [A, B], ids=["its-own-registration", "another-resource"])
def test_kubelet_restart_during_removal(kubelet: Kubelet, link: Link, servers: Servers, held: str) -> None:
    """The kubelet restarts (wiping our sockets); the pass that follows must not bring a removed resource back."""
    b, a = serving_both(kubelet, link, servers)
    gate = Gate()
    (a if held == A else b).gate = gate
    kubelet.restart()  # inotify: our sockets deleted, kubelet.sock recreated -> a pass
    assert gate.reached.wait(WAIT)
    since = len(kubelet.registrations)
    remove_while_held(link, a, held, gate)
    after_the_pass(kubelet, link, servers)
    assert_gone(kubelet, link, a, since)
    assert kubelet.wait_for(lambda k: k.registered(B) and link.registered(B), WAIT), "B was not re-registered"
    assert link.kubelet_restarts == 1


# -- stop during a pass --------------------------------------------------------------------
def test_stop_during_a_pass_registers_nothing_more(
    kubelet: Kubelet, link: Link, servers: Servers, plugin_dir: Path
) -> None:
    """Once stop() is called, the pass in progress registers nothing, and stop returns with the thread gone."""
    b, a = servers(B), servers(A)
    link.add(b)
    link.add(a)
    gate = Gate()
    b.gate = gate
    link.start()  # the first pass has both; it is held at B, before anything is registered
    assert gate.reached.wait(WAIT)
    stopped = threading.Event()

    def stop() -> None:
        link.stop()
        stopped.set()

    helper = in_thread(stop)
    assert link._stop.wait(WAIT)  # stop() has asked the thread to end (the flag both old and new code set)
    gate.release.set()
    helper.join(WAIT)
    assert stopped.is_set()
    assert not any(t.name == "kubelet-link" and t.is_alive() for t in threading.enumerate())
    assert kubelet.registrations == [], f"registered after stop(): {kubelet.registrations}"
    assert not link.registered(A) and not link.registered(B)
    for server in (b, a):  # the manager's stop: remove each resource, stop its server
        link.remove(server.resource)
        server.stop()
    assert sorted(p.name for p in plugin_dir.iterdir()) == ["kubelet.sock"]
