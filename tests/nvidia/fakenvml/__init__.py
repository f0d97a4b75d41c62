"""Drive the fake ``libnvidia-ml.so.1`` (fakenvml.c) from Python: build it, describe GPUs, change them.

The real pynvml binding loads the fake; nothing in pynvml is patched. A :class:`FakeNode` is
written to the file named by ``$FAKENVML_CONFIG``; the library re-reads it whenever it changes,
so a test can deliver an XID, lose a GPU, make a call hang and undo it while code is running.
:class:`FakeHost` adds the files NVML does not provide (sysfs NUMA nodes, /dev nodes, MIG
capability minors) under a temp root.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SOURCE = Path(__file__).with_name("fakenvml.c")
XID_EVENT = 0x08
DBE_EVENT = 0x02
ALL = 0xFFFFFFFF
GIB = 1 << 30


def build_library(out_dir: Path) -> Path:
    """Compile the fake with the system C compiler; the soname is the real one."""
    gcc = shutil.which("gcc") or shutil.which("cc")
    if gcc is None:
        raise RuntimeError("no C compiler (gcc/cc) on PATH; install gcc to build the fake NVML")
    out = out_dir / "libnvidia-ml.so.1"
    subprocess.run([gcc, "-O1", "-Wall", "-shared", "-fPIC", "-Wl,-soname,libnvidia-ml.so.1",
                    "-o", str(out), str(SOURCE), "-lpthread"], check=True, capture_output=True, text=True)
    return out


@dataclass
class FakeMig:
    uuid: str
    gi: int
    ci: int
    gi_slices: int = 1
    ci_slices: int = 1
    memory_mb: int = 9856  # 1g.10gb on an 80 GB GPU


@dataclass
class FakeGpu:
    uuid: str
    minor: int
    bus_id: str
    name: str = "NVIDIA H100 80GB HBM3"
    memory: int = 80 * GIB
    numa: int | None = 0
    mig_enabled: bool = False
    mig_pending: bool | None = None  # None: same as mig_enabled
    mig_capable: bool = True  # False: GetMigMode answers NOT_SUPPORTED
    lost: bool = False
    migs: list[FakeMig] = field(default_factory=list)
    nvlinks: list[str] = field(default_factory=list)  # remote bus IDs, one per link


def gpu_uuid(i: int) -> str:
    return f"GPU-{i:08x}-1111-2222-3333-{i:012x}"


def mig_uuid(gpu: int, j: int) -> str:
    return f"MIG-{gpu:08x}-aaaa-bbbb-cccc-{j:012x}"


def bus_id(i: int) -> str:
    return f"00000000:{0x18 + i:02X}:00.0"


@dataclass
class FakeNode:
    gpus: list[FakeGpu] = field(default_factory=list)
    init_rc: int = 0
    driver: str = "550.54.15"
    cuda: int = 12040
    hangs: list[tuple[str, int]] = field(default_factory=list)  # (function, gpu index or -1)
    topo: dict[tuple[int, int], int] = field(default_factory=dict)
    events: list[tuple[int, int, int, int, int, int]] = field(default_factory=list)
    count: int | None = None  # what nvmlDeviceGetCount answers (None: the number of GPUs)
    path: Path | None = None

    @classmethod
    def with_gpus(cls, count: int, numa_split: int = 0, **gpu: Any) -> FakeNode:
        """``count`` GPUs; with ``numa_split`` the first that many are NUMA 0, the rest NUMA 1."""
        gpus = [FakeGpu(gpu_uuid(i), i, bus_id(i), numa=(0 if not numa_split or i < numa_split else 1), **gpu)
                for i in range(count)]
        return cls(gpus)

    def render(self) -> str:
        lines = [f"init {self.init_rc}", f"driver {self.driver}", f"cuda {self.cuda}"]
        lines += [f"hang {fn} {gpu}" for fn, gpu in self.hangs]
        lines += [] if self.count is None else [f"count {self.count}"]
        for i, g in enumerate(self.gpus):
            pending = g.mig_enabled if g.mig_pending is None else g.mig_pending
            lines.append(f"gpu {g.uuid} {g.minor} {g.bus_id} {g.memory} {int(g.mig_enabled)} {int(pending)} "
                         f"{int(g.lost)} {g.name}")
            lines += [] if g.mig_capable else [f"nomig {i}"]
            lines += [f"mig {i} {m.uuid} {m.gi} {m.ci} {m.gi_slices} {m.ci_slices} {m.memory_mb}" for m in g.migs]
            lines += [f"nvlink {i} {remote}" for remote in g.nvlinks]
        lines += [f"topo {a} {b} {level}" for (a, b), level in sorted(self.levels().items())]
        lines += ["event {} {} {} {} {} {}".format(*e) for e in self.events]
        return "\n".join(lines) + "\n"

    def levels(self) -> dict[tuple[int, int], int]:
        """PCIe levels: explicit ``topo`` entries, else NODE (40) within a NUMA node, SYSTEM (50) across."""
        out = {}
        for a in range(len(self.gpus)):
            for b in range(a + 1, len(self.gpus)):
                same = self.gpus[a].numa is not None and self.gpus[a].numa == self.gpus[b].numa
                out[(a, b)] = self.topo.get((a, b), self.topo.get((b, a), 40 if same else 50))
        return out

    def write(self, path: Path | None = None) -> Path:
        """Replace the description atomically (the library never sees half a file)."""
        self.path = path or self.path
        assert self.path is not None, "no description path"
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(self.render())
        os.replace(tmp, self.path)
        return self.path

    def deliver(self, gpu: int, event_type: int, data: int, gi: int = ALL, ci: int = ALL) -> None:
        seq = max((e[0] for e in self.events), default=0) + 1
        self.events.append((seq, gpu, event_type, data, gi, ci))
        self.write()

    def xid(self, gpu: int, xid: int, gi: int = ALL, ci: int = ALL) -> None:
        self.deliver(gpu, XID_EVENT, xid, gi, ci)


class FakeHost:
    """A temp root holding sys/, dev/ and proc/ trees that match a FakeNode."""

    def __init__(self, root: Path, library: Path) -> None:
        self.root = root
        self.library = library
        self.sys = root / "sys"
        self.dev_root = root / "devroot"
        self.proc = root / "proc"
        self.description = root / "fakenvml.txt"
        self.state_file = root / "health.json"

    def apply(self, node: FakeNode, *, control_nodes: bool = True, mig_minors: bool = True) -> FakeNode:
        """Write the node's description and matching host files."""
        for gpu in node.gpus:
            name = f"{int(gpu.bus_id.split(':')[0], 16):04x}:{gpu.bus_id.split(':', 1)[1].lower()}"
            pci = self.sys / "bus/pci/devices" / name
            pci.mkdir(parents=True, exist_ok=True)
            (pci / "numa_node").write_text(f"{-1 if gpu.numa is None else gpu.numa}\n")
            self.touch_node(f"nvidia{gpu.minor}")
        if control_nodes:
            for n in ("nvidiactl", "nvidia-uvm", "nvidia-uvm-tools"):
                self.touch_node(n)
        (self.proc / "driver/nvidia").mkdir(parents=True, exist_ok=True)
        version = f"NVRM version: NVIDIA UNIX Open Kernel Module  {node.driver}\n"
        (self.proc / "driver/nvidia/version").write_text(version)
        if mig_minors:
            lines = ["config 1", "monitor 2"]
            minor = 3
            for gpu in node.gpus:
                for mig in gpu.migs:
                    for cap in (f"gpu{gpu.minor}/gi{mig.gi}/access", f"gpu{gpu.minor}/gi{mig.gi}/ci{mig.ci}/access"):
                        lines.append(f"{cap} {minor}")
                        self.touch_node(f"nvidia-caps/nvidia-cap{minor}")
                        minor += 1
            caps = self.proc / "driver/nvidia-caps"
            caps.mkdir(parents=True, exist_ok=True)
            (caps / "mig-minors").write_text("\n".join(lines) + "\n")
        node.write(self.description)
        return node

    def touch_node(self, name: str) -> Path:
        path = self.dev_root / "dev" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()
        return path

    def vendor_config(self, flags: dict[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
        """A vendor section pointing every root at this host."""
        document: dict[str, Any] = {"version": "v1", "flags": {"nvidiaDevRoot": str(self.dev_root), **(flags or {})}}
        document.update(extra.pop("document", {}))
        return {
            "config": document,
            "nvml_library": str(self.library),
            "sysfs_root": str(self.sys),
            "proc_root": str(self.proc),
            "health_state_file": str(self.state_file),
            "nvml_timeout": 1.0,
            "health_interval": 0.2,
            "poll_interval": 0.3,
            **extra,
        }
