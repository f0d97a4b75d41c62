"""What the host offers of OpenOnload, and what a container needs to run an Onload application.

An Onload application needs the Onload character devices, the host's own ``libonload`` (the
user-space library must match the loaded kernel module, so it is mounted from the host rather
than baked into images) and, optionally, ``LD_PRELOAD`` plus ``EF_*`` tuning variables.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from dpkit.core import ContainerSpec, DeviceNode, Mount
from dpkit.sfc.config import OnloadConfig
from dpkit.sfc.sysfs import read_version

DEVICE_NODES = ("onload", "onload_epoll", "sfc_char")
MAIN_NODE = "onload"
MAIN_LIBRARY = "libonload.so"
_LIBRARY = re.compile(r"^libonload[A-Za-z0-9_+-]*\.so(\.[0-9]+)*$")


@dataclass(frozen=True)
class OnloadState:
    """One look at the host: which nodes and libraries exist, and the kernel module's version."""

    nodes: tuple[str, ...]  # host paths of the device nodes present
    libraries: tuple[str, ...]  # library file names present in the library path
    version: str  # the onload kernel module's version, "" when not loaded
    missing: tuple[str, ...]  # what is missing for Onload to be usable, for operators

    @property
    def available(self) -> bool:
        return not self.missing


def detect(config: OnloadConfig, dev_root: str, sys_root: str) -> OnloadState:
    """Look for the device nodes under ``dev_root`` and the libraries under the library path."""
    nodes = tuple(str(Path(dev_root) / name) for name in DEVICE_NODES if os.path.exists(Path(dev_root) / name))
    try:
        names = sorted(os.listdir(config.library_path))
    except OSError:
        names = []
    libraries = tuple(
        n for n in names if _LIBRARY.match(n) and os.path.isfile(os.path.join(config.library_path, n))
    )
    missing = []
    if str(Path(dev_root) / MAIN_NODE) not in nodes:
        missing.append(f"device node {Path(dev_root) / MAIN_NODE} (is the onload kernel module loaded?)")
    if MAIN_LIBRARY not in libraries:
        missing.append(f"{MAIN_LIBRARY} in {config.library_path} (vendor.onload.library_path)")
    version = read_version(Path(sys_root) / "module" / "onload" / "version")
    return OnloadState(nodes, libraries, version, tuple(missing))


def container_spec(state: OnloadState, config: OnloadConfig) -> ContainerSpec:
    """The Onload part of every container spec; empty when Onload is not usable.

    Raises :class:`~dpkit.core.vendorapi.errors.ValidationError` if a host path is unusable.
    """
    if not state.available:
        return ContainerSpec()
    devices = tuple(DeviceNode(path, f"/dev/{os.path.basename(path)}", "rw") for path in state.nodes)
    mounts = tuple(
        Mount(os.path.join(config.library_path, name), os.path.join(config.container_library_path, name))
        for name in state.libraries
    )
    env = dict(config.env)
    if config.preload:
        env["LD_PRELOAD"] = os.path.join(config.container_library_path, MAIN_LIBRARY)
    return ContainerSpec(devices=devices, mounts=mounts, env=env)
