"""Container Device Interface specs: each resource's devices as a file container runtimes read.

One JSON spec per resource, ``<cdi_dir>/dpkit-<vendor>-<resource>.json``, with kind
``vendor.cdi_kind(resource)`` (the resource name by default) and one CDI device per advertised
device ID, whose ``containerEdits`` come from ``vendor.container_spec(resource, [device])``. The
file is replaced atomically whenever that content changes and removed when the resource goes
away or the plugin stops.

CDI applies each device's edits separately, and a later device's env value replaces an
earlier one, so device-list variables such as ``NVIDIA_VISIBLE_DEVICES`` cannot be merged by
the runtime. An env name whose value differs between the resource's devices is therefore left
out of the spec; with ``cdi_allocate`` the Allocate answer carries it (merged over the
allocated devices), together with the fully qualified CDI names in place of device nodes and
mounts. A device whose edits would be empty is left out too: CDI rejects empty devices.
"""

from __future__ import annotations

import json
import os
import re
import stat
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dpkit.core.engine.state import PluginState, StatusFields
from dpkit.core.engine.vendor_calls import VendorCalls, VendorTimeout
from dpkit.core.support.files import RetryTimer, remove_quietly, write_atomic
from dpkit.core.support.logs import get_logger, kv
from dpkit.core.vendorapi.device import ContainerSpec, Device
from dpkit.core.vendorapi.errors import ValidationError

log = get_logger("cdi")

DEFAULT_CDI_DIR = "/var/run/cdi"
_KIND_PART = re.compile(r"^[A-Za-z]([A-Za-z0-9_.-]*[A-Za-z0-9])?$")
_DEVICE_NAME = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9_.:-]*[A-Za-z0-9])?$")


def check_kind(kind: str) -> str:
    """A CDI kind ``vendor/class``: each part starts with a letter and ends alphanumeric."""
    vendor, slash, cls = kind.partition("/") if isinstance(kind, str) else ("", "", "")
    if not slash or not _KIND_PART.match(vendor) or not _KIND_PART.match(cls):
        raise ValidationError(f"CDI kind {kind!r} must look like 'vendor.com/class' (letters, digits, "
                              "'.', '-', '_'; each part starting with a letter and ending alphanumeric)")
    return kind


def check_device_name(name: str) -> str:
    """CDI device names are stricter than device IDs: they must also end alphanumeric."""
    if not _DEVICE_NAME.match(name):
        raise ValidationError(f"device ID {name!r} is not a valid CDI device name "
                              "(letters, digits, '_', '.', ':', '-'; first and last alphanumeric)")
    return name


def qualified_name(kind: str, device_id: str) -> str:
    return f"{kind}={device_id}"


def container_edits(spec: ContainerSpec, skip_env: frozenset[str] = frozenset()) -> dict[str, Any]:
    """The CDI ``containerEdits`` for a spec; empty keys are left out."""
    edits: dict[str, Any] = {}
    env = []
    for name, value in sorted(spec.env.items()):
        if name in skip_env:
            continue
        if "\x00" in value:
            raise ValidationError(f"env {name}: value contains a NUL byte")
        env.append(f"{name}={value}")
    if env:
        edits["env"] = env
    nodes = []
    for node in spec.devices:
        entry = {"path": node.container_path, "permissions": node.permissions}
        if node.host_path != node.container_path:
            entry["hostPath"] = node.host_path
        nodes.append(entry)
    if nodes:
        edits["deviceNodes"] = nodes
    mounts = [
        {"hostPath": m.host_path, "containerPath": m.container_path,
         "options": ["rbind", "ro" if m.read_only else "rw"]}
        for m in spec.mounts
    ]
    if mounts:
        edits["mounts"] = mounts
    return edits


def allocation_env(specs: Mapping[str, ContainerSpec]) -> frozenset[str]:
    """Env names set to different values by different devices (device lists, ranks...)."""
    values: dict[str, set[str]] = {}
    for spec in specs.values():
        for name, value in spec.env.items():
            values.setdefault(name, set()).add(value)
    return frozenset(name for name, seen in values.items() if len(seen) > 1)


_VERSIONS = ("0.3.0", "0.5.0", "0.6.0")  # the ones these rules pick, oldest first


def _kind_version(kind: str) -> str:
    return "0.6.0" if "." in kind.partition("/")[2] else "0.3.0"  # 0.6.0 allowed dots in the class part


def _device_version(device: Mapping[str, Any]) -> str:
    """0.5.0 added names starting with a digit and ``hostPath`` on device nodes."""
    if device["name"][:1].isdigit() or any("hostPath" in n for n in device["containerEdits"].get("deviceNodes", ())):
        return "0.5.0"
    return "0.3.0"


def minimum_version(document: Mapping[str, Any]) -> str:
    """The oldest CDI spec version that can express ``document`` (older runtimes accept it)."""
    return max([_kind_version(str(document["kind"])), *map(_device_version, document["devices"])],
               key=_VERSIONS.index)


def render_spec(kind: str, specs: Mapping[str, ContainerSpec]) -> tuple[str, frozenset[str], dict[str, str]]:
    """The CDI file for one resource ("" when no device can be described), the device names in it,
    and the devices left out with the reason for each.

    ``specs`` maps device ID to the single-device container spec. One device's entry exists at a
    time, encoded alone by the C JSON encoder: the whole document as objects was about 700 bytes a
    device at once, and a serving process keeps what such a peak touched (docs/performance.md).
    The text has its keys sorted, one line per key and one per device. Raises ValidationError when
    the kind itself is invalid.
    """
    check_kind(kind)
    skip_env = allocation_env(specs)
    version = _kind_version(kind)
    lines: list[str] = []
    names: list[str] = []
    left_out: dict[str, str] = {}
    for device_id, spec in specs.items():
        try:
            check_device_name(device_id)
            edits = container_edits(spec, skip_env)
        except ValidationError as exc:
            left_out[device_id] = str(exc)
            continue
        if not edits:
            left_out[device_id] = "nothing for CDI to inject (only per-allocation env)"
            continue
        entry = {"containerEdits": edits, "name": device_id}
        version = max(version, _device_version(entry), key=_VERSIONS.index)
        lines.append(f"    {json.dumps(entry, sort_keys=True)},")
        names.append(device_id)
    if not lines:
        return "", frozenset(), left_out
    lines[-1] = lines[-1][:-1]  # no comma after the last device
    head = f'{{\n  "cdiVersion": {json.dumps(version)},\n  "devices": [\n'
    return head + "\n".join(lines) + f"\n  ],\n  \"kind\": {json.dumps(kind)}\n}}\n", frozenset(names), left_out


def build_spec(kind: str, specs: Mapping[str, ContainerSpec]) -> tuple[dict[str, Any], dict[str, str]]:
    """:func:`render_spec`'s document as objects (what a CDI runtime reads), and the devices left out."""
    text, _, left_out = render_spec(kind, specs)
    document = json.loads(text) if text else {"cdiVersion": _kind_version(kind), "kind": kind, "devices": []}
    return document, left_out


def spec_file_name(vendor: str, resource: str) -> str:
    return f"dpkit-{vendor or 'vendor'}-{re.sub(r'[^A-Za-z0-9.-]', '_', resource)}.json"


def _own_file(path: Path) -> bool:
    """A regular file of ours (not a link, a directory or another user's file): safe to remove as stale."""
    try:
        st = path.lstat()
    except OSError:
        return False
    return stat.S_ISREG(st.st_mode) and st.st_uid == os.geteuid()


@dataclass
class _Written:
    """What the file of one resource holds now."""

    path: Path
    kind: str
    digest: tuple[int, int]  # of the text in the file, to tell a change (the text itself is 235 bytes a device)
    names: frozenset[str]  # device IDs in the file
    left_out: dict[str, str]  # device ID -> why it is not in the file
    raw_only: frozenset[str]  # left-out devices with device nodes or mounts: CDI cannot give them
    source: tuple[int, tuple[Device, ...]] = (-1, ())  # (vendor generation, devices) it was built from


def _digest(text: str) -> tuple[int, int]:
    """Length and 64-bit hash: compared only within this process, so no cryptographic digest (and
    no hashlib, about 0.8 MB in a serving process) is needed."""
    return len(text), hash(text)


def _same_source(a: tuple[int, tuple[Device, ...]], b: tuple[int, tuple[Device, ...]]) -> bool:
    return a[0] == b[0] and (a[1] is b[1] or a[1] == b[1])  # identity first: 100k devices compare in no time


class CdiWriter:
    """Observer keeping one CDI spec file per served resource in ``spec_dir``.

    ``publish`` runs on the observer's thread and ``cdi_spec`` on gRPC threads (Allocate, when
    ``cdi_allocate`` is on); one lock serialises them. Specs come from the devices as the vendor
    offered them, so a health change rewrites nothing.
    """

    def __init__(self, calls: VendorCalls, spec_dir: str | Path, *, allocate: bool = False) -> None:
        self.calls = calls
        self.spec_dir = Path(spec_dir)
        self.allocate = allocate
        self.written: dict[str, _Written] = {}
        self.errors: dict[str, str] = {}  # resource -> why its file could not be written
        # resource -> (vendor generation, devices) whose spec timed out: asked again only when that changes
        self._timed_out: dict[str, tuple[int, tuple[Device, ...]]] = {}
        self._state: PluginState | None = None  # the last one published
        self._lock = threading.Lock()
        self._stale_checked = False
        # Files that could not be written (full or read-only disk) are retried until they are,
        # not only at the next device change: what each file is to become, and its text.
        self._pending: dict[str, tuple[_Written, str]] = {}
        self._retry = RetryTimer(self._retry_writes, name="cdi-retry")

    # -- observer hooks ------------------------------------------------------------------------
    def publish(self, state: PluginState) -> None:
        with self._lock:
            self._state = state
            if not self._stale_checked:
                self._remove_stale(state.vendor, set(state.resources))
            for resource in [r for r in {*self.written, *self.errors} if r not in state.resources]:
                self._drop(resource)
            for resource, served in state.resources.items():
                self._sync(resource, served.offered, state)

    def cdi_spec(self, resource: str, devices: Sequence[Device]) -> ContainerSpec:
        """Allocate's CDI answer: the qualified names of ``devices``, with the file up to date.

        A device the file does not know yet (hotplugged a moment ago) makes it rewrite now, so
        the runtime never gets a name it cannot resolve.
        """
        with self._lock:
            current = self.written.get(resource)
            state = self._state
            if state is not None and (current is None or any(d.id not in current.names and d.id not in current.left_out
                                                             for d in devices)):
                # the last published devices plus the new ones; the next publish brings the whole list
                served = state.resources.get(resource)
                known = served.offered if served is not None else ()
                ids = {d.id for d in known}
                self._sync(resource, known + tuple(d for d in devices if d.id not in ids), state)
                current = self.written.get(resource)
            if current is None:
                raise ValidationError(f"no CDI spec for {resource}: {self.errors.get(resource, 'not written yet')}")
            raw = [d.id for d in devices if d.id in current.raw_only
                   or (d.id not in current.names and d.id not in current.left_out)]
            if raw:
                why = "; ".join(f"{i}: {current.left_out.get(i, 'unknown to the CDI spec')}" for i in raw)
                raise ValidationError(f"cannot be given through CDI ({why}); turn cdi_allocate off for this vendor")
            return ContainerSpec(cdi_devices=tuple(qualified_name(current.kind, d.id)
                                                   for d in devices if d.id in current.names))

    def status_fields(self, state: PluginState) -> StatusFields:
        with self._lock:
            return {"cdi": {
                "dir": str(self.spec_dir),
                "allocate": self.allocate,
                "specs": {r: {"file": str(w.path), "kind": w.kind, "devices": len(w.names),
                              "left_out": dict(w.left_out)}
                          for r, w in sorted(self.written.items())},
                "errors": dict(self.errors),
                "retry_in_s": self._retry.next_in() if self._pending else None,
                "retry_attempts": self._retry.attempts,
            }}

    def close(self) -> None:
        self._retry.close()  # outside the lock: a running retry takes it
        with self._lock:
            for resource in list(self.written):
                self._drop(resource)

    # -- internals -------------------------------------------------------------------------
    def _remove_stale(self, vendor: str, resources: set[str]) -> None:
        """Files of this vendor left behind by a run that was killed (SIGKILL, node crash)."""
        self._stale_checked = True
        keep = {spec_file_name(vendor, r) for r in resources}
        for path in self.spec_dir.glob(f"dpkit-{vendor or 'vendor'}-*.json"):
            if path.name not in keep and _own_file(path):
                log.info("removing stale CDI spec", extra=kv(file=str(path)))
                remove_quietly(path, log)

    def _drop(self, resource: str) -> None:
        written = self.written.pop(resource, None)
        if written is not None:
            remove_quietly(written.path, log)
        self.errors.pop(resource, None)
        self._pending.pop(resource, None)
        self._timed_out.pop(resource, None)

    def _sync(self, resource: str, devices: tuple[Device, ...], state: PluginState) -> None:
        path = self.spec_dir / spec_file_name(state.vendor, resource)
        previous = self.written.get(resource)
        source = (state.vendor_generation, devices)
        if previous is not None and _same_source(previous.source, source):
            return  # health events do not change specs: skip rebuilding (and re-asking the vendor)
        hung = self._timed_out.get(resource)
        if hung is not None and _same_source(hung, source):
            return  # the vendor hung on exactly this: one deadline per change, not one per pass
        self._timed_out.pop(resource, None)
        try:
            kind = self.calls.cdi_kind(resource)
            specs, broken = self._device_specs(resource, devices)
            text, names, left_out = render_spec(kind, specs)
        except Exception as exc:  # an invalid kind or a vendor bug must not stop the plugin
            if isinstance(exc, VendorTimeout):
                self._timed_out[resource] = source
            elif not isinstance(exc, ValidationError):  # neither the kind's check nor a timeout: the vendor raised
                self.calls.report("cdi_kind", exc, "vendor cdi_kind failed; no CDI spec for this resource",
                                  resource=resource)
            self._pending.pop(resource, None)  # waits for a vendor fix, not for the disk
            self._fail(resource, path, str(exc))
            return
        left_out.update(broken)
        raw_only = frozenset(i for i in left_out if i not in specs or specs[i].devices or specs[i].mounts)
        if raw_only and (previous is None or previous.raw_only != raw_only):
            log.warning("devices left out of the CDI spec", extra=kv(
                resource=resource, devices=", ".join(sorted(raw_only)),
                reason=next(left_out[i] for i in sorted(raw_only))))
        del specs
        digest = _digest(text)
        if previous is not None and previous.digest == digest and (not text or path.exists()):
            previous.left_out, previous.raw_only, previous.source = left_out, raw_only, source
            return
        result = _Written(path, kind, digest, names, left_out, raw_only, source)
        try:
            if text:
                self._write(result.path, text)
            else:  # CDI rejects a spec without devices
                remove_quietly(path, log)
        except OSError as exc:
            self._fail(resource, path, f"cannot write {path}: {exc.strerror or exc}")
            self._pending[resource] = (result, text)
            self._retry.arm()
            return
        self.written[resource] = result
        self.errors.pop(resource, None)
        self._pending.pop(resource, None)
        log.info("CDI spec written" if text else "CDI spec removed: no device to describe",
                 extra=kv(resource=resource, kind=kind, devices=len(names), left_out=len(left_out), file=str(path)))

    def _write(self, path: Path, text: str) -> None:
        self.spec_dir.mkdir(parents=True, exist_ok=True)
        write_atomic(path, text)

    def _retry_writes(self) -> bool:
        """The retry thread's attempt at every file still unwritten; True when none is left."""
        with self._lock:
            for resource, (result, text) in list(self._pending.items()):
                try:
                    self._write(result.path, text)
                except OSError as exc:
                    self.errors[resource] = f"cannot write {result.path}: {exc.strerror or exc}"
                    continue
                del self._pending[resource]
                self.written[resource] = result
                self.errors.pop(resource, None)
                log.info("CDI spec written on retry", extra=kv(resource=resource, file=str(result.path),
                                                                 attempts=self._retry.attempts))
            return not self._pending

    def _device_specs(
        self, resource: str, devices: Sequence[Device]
    ) -> tuple[dict[str, ContainerSpec], dict[str, str]]:
        specs: dict[str, ContainerSpec] = {}
        broken: dict[str, str] = {}
        for device in devices:
            try:
                specs[device.id] = self.calls.container_spec(resource, [device])
            except VendorTimeout:
                raise  # the vendor hangs: give up this resource's spec for this pass, not N deadlines
            except Exception as exc:
                broken[device.id] = f"container_spec failed: {type(exc).__name__}: {exc}"
        return specs, broken

    def _fail(self, resource: str, path: Path, message: str) -> None:
        """Log once per new error; a stale file is worse than none, so it goes."""
        if self.errors.get(resource) != message:
            log.error("CDI spec not written", extra=kv(resource=resource, file=str(path), error=message))
        self.errors[resource] = message
        written = self.written.pop(resource, None)
        remove_quietly(written.path if written is not None else path, log)
