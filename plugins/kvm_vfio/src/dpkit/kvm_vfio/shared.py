"""Shared device nodes (``/dev/kvm``, ``/dev/vhost-net``, ``/dev/net/tun``) as counted slots.

Any number of pods may use one of these nodes at once; the kubelet only counts, so each node is
advertised as N identical slots (IDs ``kvm0``, ``kvm1``... as KubeVirt names them). Health is
one fact for all slots: the node exists and this process can open it read-write.
"""

from __future__ import annotations

import errno
import functools
import os
from dataclasses import dataclass

from dpkit.core import ContainerSpec, Device, DeviceNode, Health

DOMAIN = "devices.kubevirt.io"


@dataclass(frozen=True)
class SharedNode:
    name: str  # resource suffix and slot ID prefix
    path: str  # below the /dev root
    permissions: str
    always: bool  # advertised even when the node has never been seen (kvm)
    hint: str

    @property
    def resource(self) -> str:
        return f"{DOMAIN}/{self.name}"


SHARED_NODES = (
    SharedNode("kvm", "kvm", "rw", True,
               "load kvm_intel or kvm_amd, and enable VT-x/AMD-V in the firmware"),
    SharedNode("vhost-net", "vhost-net", "rw", False, "load the vhost_net module"),
    SharedNode("tun", "net/tun", "rwm", False, "load the tun module"),
)


ACCESS_HINT = "run the plugin privileged (or allow the node in its device cgroup) and check the node's mode"


def hint_for(node: SharedNode, problem: str) -> str:
    """How to fix ``problem``: load the module when the node is missing, else grant access."""
    if not problem:
        return ""
    return node.hint if problem.endswith("does not exist") else ACCESS_HINT


def node_problem(path: str) -> str:
    """Why the node cannot be used ("" when it opens read-write)."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY)
    except OSError as exc:
        if exc.errno == errno.ENOENT:
            return f"{path} does not exist"
        if exc.errno in (errno.EACCES, errno.EPERM):
            return f"{path} is not accessible: {exc.strerror}"
        return f"{path} cannot be opened: {exc.strerror or exc}"
    os.close(fd)
    return ""


@functools.lru_cache(maxsize=32)
def slots(node: SharedNode, count: int, host_path: str, problem: str) -> tuple[Device, ...]:
    """``count`` slots for ``node``, Unhealthy with ``problem`` when there is one.

    Cached: the same state yields the same (immutable) tuple, so 1000 slots cost nothing per rescan.
    """
    spec = ContainerSpec(devices=(DeviceNode(host_path, f"/dev/{node.path}", node.permissions),))
    health = Health.UNHEALTHY if problem else Health.HEALTHY
    return tuple(Device(f"{node.name}{i}", health, spec=spec, reason=problem) for i in range(count))
