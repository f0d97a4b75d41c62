"""The sfc overlay gives the plugin what AMD Onload compatibility (``mode: onload``) reads from the host.

In ``mode: onload`` the plugin hands the kubelet host paths under ``hostOnloadPath`` (default
``/opt/onload``): ``usr/lib64/libonload*.so*`` and, with ``mountOnload``, ``usr/bin/onload``. It
checks them in its own container before advertising healthy slots, so the DaemonSet must mount
``hostOnloadPath`` read-only at the same path. The test builds the container's view of a fake
host from the rendered hostPath mounts (each one a link to the host's directory) and runs the
vendor on that view, so a mount that leaves a needed path out shows up as Unhealthy slots.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from deploy.manifests import DEPLOY, Obj, mounts, render
from dpkit.sfc.vendor import SfcVendor

ONLOAD = "/opt/onload"  # AMD's default hostOnloadPath, and dpkit's onload.library_path parent


@pytest.fixture(scope="module")
def sfc() -> list[Obj]:
    return render(DEPLOY / "overlays" / "sfc")


def fake_host(root: Path) -> Path:
    """A host with Onload installed under /opt/onload, its device nodes (plain files) and no NIC."""
    lib = root / ONLOAD.lstrip("/") / "usr" / "lib64"
    lib.mkdir(parents=True)
    for name in ("libonload.so.1", "libonload_ext.so.2"):
        (lib / name).write_text("not really a library\n")
    (lib / "libonload.so").symlink_to("libonload.so.1")
    script = root / ONLOAD.lstrip("/") / "usr" / "bin" / "onload"
    script.parent.mkdir(parents=True)
    script.write_text("#!/bin/sh\n")
    (root / "dev").mkdir()
    for name in ("onload", "onload_epoll", "sfc_char"):
        (root / "dev" / name).write_text("")
    (root / "sys" / "bus" / "pci" / "devices").mkdir(parents=True)
    return root


def container_view(objs: list[Obj], host: Path, view: Path) -> Path:
    """The plugin container's file system as far as hostPath mounts go: mountPath -> the host's path."""
    for path, mount in sorted(mounts(objs).items()):
        host_path = mount["volume"].get("hostPath", {}).get("path")
        if host_path:
            link = view / path.lstrip("/")
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(host / host_path.lstrip("/"))
    return view


def onload_vendor(view: Path, *args: str) -> SfcVendor:
    return SfcVendor({"mode": "onload", "sys_root": str(view / "sys"), "dev_root": str(view / "dev"),
                      "args": [f"-hostOnloadPath={view}{ONLOAD}", "-needNic=false", *args]})


@pytest.mark.parametrize("args", [(), ("-setPreload=false", "-mountOnload")], ids=["preload", "mountOnload"])
def test_onload_mode_finds_everything_through_the_overlays_mounts(
        sfc: list[Obj], tmp_path: Path, args: tuple[str, ...]) -> None:
    view = container_view(sfc, fake_host(tmp_path / "host"), tmp_path / "container")
    vendor = onload_vendor(view, *args)
    try:
        devices = vendor.discover()["amd.com/onload"]
    finally:
        vendor.close()
    assert devices and all(d.healthy for d in devices), devices[0].reason
    wanted = {"libonload.so"} | ({"onload"} if "-mountOnload" in args else set())
    assert wanted <= {Path(m.container_path).name for m in devices[0].spec.mounts}


def test_host_onload_path_is_mounted_read_only_at_the_same_path(sfc: list[Obj]) -> None:
    by_path: dict[str, Any] = mounts(sfc)
    onload = by_path[ONLOAD]
    assert onload["volume"]["hostPath"]["path"] == ONLOAD, "host paths handed to the kubelet are the plugin's"
    assert onload.get("readOnly") is True
    # dpkit mode's default onload.library_path lies inside it: one mount serves every mode
    assert not [p for p in by_path if p.startswith(ONLOAD + "/")], "no second, overlapping Onload mount"
