"""For the umockdev children: the vendor served by a real Manager to the kubelet emulator, in a work dir."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from dpkit.core.engine.manager import Manager
from dpkit.core.support.config import Config
from dpkit.core.tools.kubelet import Kubelet
from dpkit.core.vendorapi.vendor import Vendor


@contextmanager
def served(vendor: Vendor, work: Path) -> Iterator[tuple[Kubelet, Manager]]:
    """The kubelet emulator and a started Manager (sockets and state under ``work``); both stopped on leaving."""
    kubelet = Kubelet(work / "dp").start()
    manager = Manager(vendor, Config(plugin_dir=str(work / "dp"), state_dir=str(work / "st"),
                                     pod_resources_socket=str(work / "pr.sock")))
    manager.start()
    try:
        yield kubelet, manager
    finally:
        manager.stop()
        kubelet.stop()
