"""Shared umockdev helpers: run real udev/sysfs code against a fake device tree.

umockdev (Debian ``umockdev`` + ``gir1.2-umockdev-1.0``) preloads a library that redirects
``/sys`` (and the udev netlink socket) of a process into a testbed directory, so pyudev and plain
``open("/sys/...")`` see fake devices. That only works for a *whole process*, so tests run a
small child script under it and read back a JSON result. Two ways to start one:

* :func:`run_device_file` — ``umockdev-run --device FILE -- python SCRIPT``: a static tree,
  written from Python with :func:`write_device_file`.
* :func:`run_wrapped` — ``umockdev-wrapper python SCRIPT``: the child builds its tree itself
  with :func:`testbed` / :func:`add_device` and emits uevents with :func:`uevent`, which a
  ``pyudev.Monitor`` in the same child receives.

In both, ``$UMOCKDEV_DIR`` is the testbed directory: :func:`write_sys_file` /
:func:`symlink_sys` add files outside ``/sys/devices`` (e.g. ``sys/kernel/iommu_groups``).
The child reports with :func:`write_result` (one JSON object); the parent gets it back as a dict.

Parent side (pytest)::

    pytestmark = umock.skip_unless_available()
    result = umock.run_device_file(devices, CHILD, tmp_path, args=["--x"])

Child side (a plain script, never collected by pytest)::

    import umock
    tb = umock.testbed()
    path = umock.add_device(tb, "pci", "0000:00:04.0", attributes={"vendor": "0x10de"})
    umock.uevent(tb, path, "add")
    umock.write_result({"ok": True})
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

RESULT_ENV = "UMOCK_RESULT"
_TESTS_DIR = Path(__file__).resolve().parent


@dataclass(frozen=True)
class MockDevice:
    """One device of a ``.umockdev`` file.

    ``path`` is the sysfs path below ``/sys`` (``/devices/pci0000:00/0000:00:04.0``);
    ``properties`` are uevent properties (``SUBSYSTEM``, ``DRIVER``...), ``attributes`` sysfs
    files, ``links`` sysfs symlinks such as ``driver`` or ``iommu_group`` (relative targets,
    as the kernel writes them).
    """

    path: str
    properties: Mapping[str, str] = field(default_factory=dict)
    attributes: Mapping[str, str] = field(default_factory=dict)
    links: Mapping[str, str] = field(default_factory=dict)

    def record(self) -> str:
        """The device in umockdev's record format (``P:``, ``E:``, ``A:``, ``L:`` lines)."""
        lines = [f"P: {self.path}"]
        lines += [f"E: {k}={v}" for k, v in self.properties.items()]
        lines += [f"A: {k}={_escape(v)}" for k, v in self.attributes.items()]
        lines += [f"L: {k}={v}" for k, v in self.links.items()]
        return "\n".join(lines) + "\n"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n")


def write_device_file(path: Path, devices: Sequence[MockDevice]) -> Path:
    """Write ``devices`` as a ``.umockdev`` file (devices separated by blank lines)."""
    path.write_text("\n".join(d.record() for d in devices))
    return path


# -- availability -------------------------------------------------------------------------
@functools.cache
def missing() -> str:
    """Why umockdev tests cannot run here ("" when they can)."""
    for tool in ("umockdev-run", "umockdev-wrapper"):
        if shutil.which(tool) is None:
            return f"{tool} not found: apt-get install umockdev gir1.2-umockdev-1.0 (scripts/system_deps.py)"
    probe = ("import gi; gi.require_version('UMockdev', '1.0'); "
             "from gi.repository import UMockdev; import pyudev")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          timeout=60, check=False)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["unknown error"])[-1]
        return f"PyGObject with the UMockdev typelib, or pyudev, is unavailable: {last}"
    return ""


def skip_unless_available() -> pytest.MarkDecorator:
    """A ``pytestmark`` that skips, naming what to install, when umockdev cannot run."""
    reason = missing()
    return pytest.mark.skipif(bool(reason), reason=reason or "umockdev available")


# -- parent side: run a child and read its result ----------------------------------------
def _run(command: list[str], workdir: Path, timeout: float, env: Mapping[str, str] | None) -> dict[str, Any]:
    result_file = workdir / "umock-result.json"
    result_file.unlink(missing_ok=True)
    child_env = dict(os.environ)
    child_env.update(env or {})
    child_env[RESULT_ENV] = str(result_file)
    child_env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(_TESTS_DIR), child_env.get("PYTHONPATH", "")) if p
    )
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout,
                              env=child_env, cwd=workdir, check=False)
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(f"umockdev child timed out after {timeout} s: {command}\n"
                             f"stderr: {exc.stderr!r}") from exc
    if done.returncode != 0 or not result_file.exists():
        raise AssertionError(f"umockdev child failed (rc {done.returncode}): {command}\n"
                             f"stdout:\n{done.stdout[-4000:]}\nstderr:\n{done.stderr[-4000:]}")
    data: dict[str, Any] = json.loads(result_file.read_text())
    data.setdefault("_stderr", done.stderr[-4000:])
    return data


def run_device_file(
    devices: Sequence[MockDevice], script: Path, workdir: Path, *, args: Sequence[str] = (),
    timeout: float = 60.0, env: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Run ``python script args`` under ``umockdev-run`` with ``devices``; return its result dict."""
    device_file = write_device_file(workdir / "devices.umockdev", devices)
    command = ["umockdev-run", "--device", str(device_file), "--", sys.executable, str(script), *args]
    return _run(command, workdir, timeout, env)


def run_wrapped(
    script: Path, workdir: Path, *, args: Sequence[str] = (), timeout: float = 60.0,
    env: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Run ``python script args`` under ``umockdev-wrapper`` (the child makes its own testbed)."""
    command = ["umockdev-wrapper", sys.executable, str(script), *args]
    return _run(command, workdir, timeout, env)


# -- child side -------------------------------------------------------------------------------
def testbed_dir() -> Path:
    """The running testbed's root (holds ``sys/`` and ``dev/``)."""
    root = os.environ.get("UMOCKDEV_DIR")
    if not root:
        raise RuntimeError("not running under umockdev-run / a umockdev testbed (UMOCKDEV_DIR unset)")
    return Path(root)


def testbed() -> Any:
    """A ``UMockdev.Testbed`` for this process (needs ``umockdev-wrapper``); sets ``UMOCKDEV_DIR``."""
    import gi  # type: ignore[import-untyped]

    gi.require_version("UMockdev", "1.0")
    from gi.repository import UMockdev  # type: ignore[import-untyped]

    tb = UMockdev.Testbed.new()
    # g_setenv does not reach os.environ: publish the root for testbed_dir() and children.
    os.environ["UMOCKDEV_DIR"] = tb.get_root_dir()
    return tb


def add_device(
    tb: Any, subsystem: str, name: str, *, parent: str | None = None,
    attributes: Mapping[str, str] | None = None, properties: Mapping[str, str] | None = None,
) -> str:
    """Add a device to the testbed (which emits its ``add`` uevent); returns its sysfs path."""
    attrs = [item for kv in (attributes or {}).items() for item in kv]
    props = [item for kv in (properties or {}).items() for item in kv]
    path: str = tb.add_device(subsystem, name, parent, attrs, props)
    return path


def uevent(tb: Any, sysfs_path: str, action: str) -> None:
    """Emit a uevent (``add``, ``remove``, ``change``, ``bind``...) for a testbed device."""
    tb.uevent(sysfs_path, action)


def write_sys_file(relative: str, content: str) -> Path:
    """Create ``/sys/<relative>`` in the testbed (parents included)."""
    path = testbed_dir() / "sys" / relative.lstrip("/")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(content)
    return path


def symlink_sys(relative: str, target: str) -> Path:
    """Create (or replace) the symlink ``/sys/<relative>`` -> ``target`` in the testbed.

    An absolute ``target`` under ``/sys`` is made relative, so it resolves inside the testbed.
    """
    link = testbed_dir() / "sys" / relative.lstrip("/")
    link.parent.mkdir(parents=True, exist_ok=True)
    if target.startswith("/sys/"):
        target = os.path.relpath(testbed_dir() / target.lstrip("/"), link.parent)
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(target)
    return link


def write_result(data: Mapping[str, Any]) -> None:
    """Hand the child's result (JSON-serialisable) back to the parent test."""
    target = os.environ.get(RESULT_ENV)
    if not target:
        raise RuntimeError(f"{RESULT_ENV} unset: start this script through umock.run_*")
    Path(target).write_text(json.dumps(data))
