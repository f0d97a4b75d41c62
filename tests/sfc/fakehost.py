"""A fake Solarflare host in temp dirs: a sysfs-shaped tree, a dev root and an Onload library dir.

The layout is the kernel's: ``sys/devices/pci0000:00/<addr>`` holding ``vendor``, ``device``,
``numa_node``, a ``driver`` symlink into ``sys/bus/pci/drivers/<name>`` and ``net/<ifname>/``
with ``address``, ``operstate``, ``carrier`` and ``speed``; ``sys/bus/pci/devices/<addr>`` links
to it. Onload's device nodes are plain files (tests never create real nodes).

A module of its own (not only the conftest) so that code without pytest can build the same host:
bench/bench_footprint.py runs the sfc vendor on it in the bench env, which has no pytest.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any


class FakeHost:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.sys = root / "sys"
        self.dev = root / "dev"
        self.lib = root / "opt" / "onload" / "usr" / "lib64"
        for path in (self.sys / "bus" / "pci" / "devices", self.dev, self.lib):
            path.mkdir(parents=True, exist_ok=True)

    def function_dir(self, address: str) -> Path:
        return self.sys / "devices" / "pci0000:00" / address

    def add_nic(self, address: str, interfaces: Mapping[str, str] | None = None, *, vendor: str = "0x1924",
                device: str = "0x0b03", driver: str | None = "sfc", numa: str = "0",
                speed: str = "25000") -> Path:
        """A PCI function; ``interfaces`` maps name -> operstate (default: one 'up' interface)."""
        path = self.function_dir(address)
        path.mkdir(parents=True)
        (path / "vendor").write_text(vendor + "\n")
        (path / "device").write_text(device + "\n")
        (path / "numa_node").write_text(numa + "\n")
        (self.sys / "bus" / "pci" / "devices" / address).symlink_to(os.path.relpath(path, self.sys / "bus/pci/devices"))
        if driver:
            self.bind(address, driver)
        if interfaces is None:
            interfaces = {f"ens{int(address[5:7], 16)}f{address[-1]}": "up"}
        for n, (name, state) in enumerate(interfaces.items()):
            self.add_interface(address, name, state, mac=f"00:0f:53:00:{int(address[5:7], 16):02x}:{n:02x}",
                               speed=speed)
        return path

    def add_interface(self, address: str, name: str, operstate: str = "up", *, mac: str = "00:0f:53:00:00:01",
                      speed: str = "25000") -> Path:
        path = self.function_dir(address) / "net" / name
        path.mkdir(parents=True)
        (path / "address").write_text(mac + "\n")
        (path / "speed").write_text(speed + "\n")
        self.set_link(address, name, operstate)
        return path

    def set_link(self, address: str, name: str, operstate: str) -> None:
        path = self.function_dir(address) / "net" / name
        (path / "operstate").write_text(operstate + "\n")
        (path / "carrier").write_text(("1" if operstate == "up" else "0") + "\n")

    def bind(self, address: str, driver: str) -> None:
        (self.sys / "bus" / "pci" / "drivers" / driver).mkdir(parents=True, exist_ok=True)
        link = self.function_dir(address) / "driver"
        link.unlink(missing_ok=True)
        link.symlink_to(f"../../../bus/pci/drivers/{driver}")

    def unbind(self, address: str) -> None:
        """What the kernel does: the driver link and the netdevs go away."""
        (self.function_dir(address) / "driver").unlink()
        shutil.rmtree(self.function_dir(address) / "net", ignore_errors=True)

    def remove(self, address: str) -> None:
        (self.sys / "bus" / "pci" / "devices" / address).unlink()
        shutil.rmtree(self.function_dir(address))

    def set_module_version(self, module: str, version: str) -> None:
        path = self.sys / "module" / module
        path.mkdir(parents=True, exist_ok=True)
        (path / "version").write_text(version + "\n")

    def install_onload(self, version: str = "8.1.2.26") -> None:
        for name in ("onload", "onload_epoll", "sfc_char"):
            (self.dev / name).write_text("")
        (self.lib / "libonload.so.1").write_text("not really a library\n")
        (self.lib / "libonload.so").symlink_to("libonload.so.1")
        (self.lib / "libonload_ext.so.2").write_text("not really a library\n")
        (self.lib / "unrelated.so").write_text("must not be mounted\n")
        self.set_module_version("onload", version)

    def config(self, **overrides: Any) -> dict[str, Any]:
        """A vendor section pointing every root at this fake host."""
        config: dict[str, Any] = {"sys_root": str(self.sys), "dev_root": str(self.dev), "resync_interval": 0.05}
        onload = {"library_path": str(self.lib), **overrides.pop("onload", {})}
        config["onload"] = onload
        config.update(overrides)
        return config
