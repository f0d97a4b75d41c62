"""Facts NVML does not give: NUMA nodes from sysfs, MIG capability minors from procfs, device nodes.

Every root is configurable so tests use temp trees. Values are checked before use: a bus ID
must look like one before it becomes part of a path, a NUMA node must be a small integer.
Bad data yields a problem string for the caller to report, never an exception.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

BUS_ID = re.compile(r"^([0-9a-fA-F]{4,8}):([0-9a-fA-F]{2}):([0-9a-fA-F]{2})\.([0-7])$")
MAX_NUMA_NODE = 1024
MIG_MINORS = "driver/nvidia-caps/mig-minors"
#: control nodes every GPU container needs when device specs are passed (when present)
CONTROL_NODES = ("/dev/nvidiactl", "/dev/nvidia-uvm", "/dev/nvidia-uvm-tools", "/dev/nvidia-modeset")


def sysfs_bus_id(bus_id: str) -> str | None:
    """NVML's ``00000000:18:00.0`` as sysfs names it (``0000:18:00.0``); None if malformed."""
    match = BUS_ID.match(bus_id.strip())
    if not match:
        return None
    domain, bus, device, function = match.groups()
    return f"{int(domain, 16):04x}:{bus.lower()}:{device.lower()}.{function}"


def numa_node(sysfs_root: str, bus_id: str) -> tuple[int | None, str]:
    """The GPU's NUMA node (None when the platform has none), and a problem if sysfs is odd."""
    name = sysfs_bus_id(bus_id)
    if name is None:
        return None, f"PCI bus ID {bus_id!r} from NVML is malformed; NUMA node unknown"
    path = Path(sysfs_root) / "bus/pci/devices" / name / "numa_node"
    try:
        raw = path.read_text().strip()
    except FileNotFoundError:
        return None, ""  # many VMs have no NUMA information at all
    except OSError as exc:
        return None, f"cannot read {path}: {exc.strerror or exc}"
    try:
        node = int(raw)
    except ValueError:
        return None, f"{path} holds {raw[:40]!r}, not a NUMA node number"
    if node < 0:
        return None, ""
    if node > MAX_NUMA_NODE:
        return None, f"{path} holds {node}, not a plausible NUMA node"
    return node, ""


def mig_minors(proc_root: str) -> tuple[dict[str, int], str]:
    """``gpu0/gi1/access`` -> minor of ``/dev/nvidia-caps/nvidia-cap<minor>``, and a problem."""
    path = Path(proc_root) / MIG_MINORS
    try:
        text = path.read_text()
    except FileNotFoundError:
        return {}, f"{path} does not exist (no MIG support in the loaded driver?)"
    except OSError as exc:
        return {}, f"cannot read {path}: {exc.strerror or exc}"
    minors: dict[str, int] = {}
    bad = 0
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2 and re.fullmatch(r"[a-z0-9/]+", parts[0]) and parts[1].isdigit():
            minors[parts[0]] = int(parts[1])
        elif line.strip():
            bad += 1
    return minors, (f"{path}: {bad} malformed line(s) ignored" if bad else "")


def host_path(dev_root: str, container_path: str) -> str:
    """Where a ``/dev/...`` node is on the host, given NVIDIA's ``nvidiaDevRoot``."""
    return os.path.normpath(os.path.join(dev_root, container_path.lstrip("/")))


def node_state(dev_root: str, container_path: str) -> str:
    """"" when the node exists and is usable by us, else what is wrong with it."""
    path = host_path(dev_root, container_path)
    if not os.path.exists(path):
        return f"{path} is absent"
    if not os.access(path, os.R_OK | os.W_OK):
        return f"{path} is not readable and writable by this process"
    return ""
