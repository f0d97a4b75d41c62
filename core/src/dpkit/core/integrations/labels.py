"""Node labels through node-feature-discovery's local source: one feature file per vendor.

NFD's worker reads every non-hidden file in ``features.d`` (lines ``name=value``, at most
64 KiB) and nfd-master turns them into node labels. A name without a ``domain/`` prefix gets
``feature.node.kubernetes.io/``; vendor domains (``nvidia.com/gpu.product``) are kept as they
are, while other ``kubernetes.io`` domains are refused by nfd-master, so they are refused here
first. The file is replaced atomically when the labels change and removed at shutdown, so a
node never advertises hardware nobody serves.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from dpkit.core.engine.state import PluginState, StatusFields
from dpkit.core.engine.vendor_calls import VendorCalls, VendorTimeout
from dpkit.core.support.files import RetryTimer, remove_quietly, write_atomic
from dpkit.core.support.logs import get_logger, kv
from dpkit.core.vendorapi.device import Device
from dpkit.core.vendorapi.errors import ValidationError

log = get_logger("labels")

DEFAULT_FEATURES_DIR = "/etc/kubernetes/node-feature-discovery/features.d"
NFD_PREFIX = "feature.node.kubernetes.io"
MAX_FILE_BYTES = 65536  # NFD ignores larger feature files
_ALLOWED_K8S = ("feature.node.kubernetes.io", "profile.node.kubernetes.io")
_DNS_LABEL = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?"
_DNS_SUBDOMAIN = re.compile(rf"^{_DNS_LABEL}(\.{_DNS_LABEL})*$")
_NAME = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$")
_VALUE = re.compile(r"^([A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?)?$")


def check_label(key: str, value: str) -> None:
    """Raise ValidationError unless nfd-master would publish ``key=value`` as a node label."""
    prefix, slash, name = key.rpartition("/")
    if slash:
        if len(prefix) > 253 or not _DNS_SUBDOMAIN.match(prefix):
            raise ValidationError(f"label {key!r}: prefix {prefix!r} is not a DNS subdomain")
        k8s = any(prefix == d or prefix.endswith("." + d) for d in ("kubernetes.io", "k8s.io"))
        if k8s and not any(prefix == a or prefix.endswith("." + a) for a in _ALLOWED_K8S):
            raise ValidationError(f"label {key!r}: nfd-master refuses the {prefix} domain; use the "
                                  f"vendor's domain or {NFD_PREFIX}")
    if len(name) > 63 or not _NAME.match(name):
        raise ValidationError(f"label {key!r}: name must be 1-63 letters, digits, '-', '_' or '.', "
                              "starting and ending alphanumeric")
    if not isinstance(value, str) or len(value) > 63 or not _VALUE.match(value):
        raise ValidationError(f"label {key!r}: value {value!r} must be at most 63 letters, digits, "
                              "'-', '_' or '.', starting and ending alphanumeric")


def label_value(text: object) -> str:
    """Turn hardware text (``NVIDIA A100-SXM4-40GB``) into a valid label value (``NVIDIA-A100-SXM4-40GB``)."""
    value = re.sub(r"[^A-Za-z0-9_.-]+", "-", str(text))[:63]
    return re.sub(r"^[^A-Za-z0-9]+|[^A-Za-z0-9]+$", "", value)


def render(labels: Mapping[str, str], vendor: str) -> str:
    lines = [f"# written by dpkit ({vendor}); rewritten on device changes, removed when the plugin stops"]
    lines += [f"{key}={value}" for key, value in sorted(labels.items())]
    return "\n".join(lines) + "\n"


def valid_labels(labels: Any) -> tuple[dict[str, str], list[str]]:
    """The publishable labels of a vendor's answer, and why each other one was refused."""
    if not isinstance(labels, Mapping):
        return {}, [f"node_labels returned {type(labels).__name__}, not a mapping"]
    good: dict[str, str] = {}
    refused: list[str] = []
    for key, value in labels.items():
        try:
            if not isinstance(key, str):
                raise ValidationError(f"label key {key!r} is not a string")
            check_label(key, value)
        except ValidationError as exc:
            refused.append(str(exc))
            continue
        good[key] = value
    return good, refused


class NodeLabelWriter:
    """Observer keeping ``<features_dir>/dpkit-<vendor>`` equal to the vendor's node labels.

    The vendor is asked again only when the devices (or the vendor, after a reload) changed.
    """

    def __init__(self, calls: VendorCalls, features_dir: str | Path) -> None:
        self.calls = calls
        self.features_dir = Path(features_dir)
        self._asked: tuple[int, dict[str, tuple[Device, ...]]] | None = None  # what the vendor last saw
        self.path: Path | None = None
        self.labels: dict[str, str] = {}
        self.refused: list[str] = []
        self.last_error = ""
        self._text = ""
        self._lock = threading.Lock()  # the retry thread writes too
        # A file that could not be written (full or read-only disk) is retried until it is.
        self._pending: tuple[str, dict[str, str]] | None = None  # (text, labels) still to write
        self._retry = RetryTimer(self._retry_write, name="nfd-retry")

    def publish(self, state: PluginState) -> None:
        with self._lock:
            self._publish(state)

    def _publish(self, state: PluginState) -> None:
        # the effective device tuples the state shares with the manager, not copies
        snapshot = {r: served.devices for r, served in state.resources.items()}
        asked = (state.vendor_generation, snapshot)
        if self._asked is not None and self._asked[0] == asked[0] and self._asked[1].keys() == snapshot.keys() \
                and all(self._asked[1][r] is devices for r, devices in snapshot.items()):
            return  # a heartbeat or a registration: nothing the labels depend on
        self._asked = asked
        vendor = state.vendor
        self.path = self.features_dir / f"dpkit-{vendor or 'vendor'}"
        try:
            raw = self.calls.node_labels(snapshot)
        except Exception as exc:  # keep the last good file rather than publish nothing
            if not isinstance(exc, VendorTimeout):  # a timeout is logged by the adapter
                self.calls.report("node_labels", exc, "vendor node_labels failed; keeping the last label file")
            self._fail(f"vendor node_labels failed: {type(exc).__name__}: {exc}")
            return
        labels, refused = valid_labels(raw)
        if refused != self.refused:
            for problem in refused:
                log.error("node label refused", extra=kv(problem=problem))
        self.refused = refused
        self._pending = None
        if not labels:  # nothing to say: no file rather than an empty one
            self._remove()
            self.labels, self.last_error = {}, ""
            return
        text = render(labels, vendor)
        if len(text.encode()) > MAX_FILE_BYTES:
            self._fail(f"{len(labels)} labels take {len(text.encode())} bytes; NFD reads at most {MAX_FILE_BYTES}")
            return
        if text == self._text and self.path.exists():
            return
        if self._write(text, labels):
            log.info("node feature labels written", extra=kv(file=str(self.path), labels=len(labels)))
        else:
            self._pending = (text, labels)
            self._retry.arm()

    def _write(self, text: str, labels: dict[str, str]) -> bool:
        assert self.path is not None
        try:
            self.features_dir.mkdir(parents=True, exist_ok=True)
            write_atomic(self.path, text)
        except OSError as exc:
            self._fail(f"cannot write {self.path}: {exc.strerror or exc}")
            return False
        self._text, self.labels, self.last_error = text, labels, ""
        return True

    def _retry_write(self) -> bool:
        """The retry thread's attempt; True when nothing is left to write."""
        with self._lock:
            if self._pending is None:
                return True
            if not self._write(*self._pending):
                return False
            self._pending = None
            log.info("node feature labels written on retry", extra=kv(file=str(self.path), labels=len(self.labels)))
            return True

    def _fail(self, message: str) -> None:
        if message != self.last_error:
            log.error("node feature labels not written", extra=kv(error=message))
        self.last_error = message

    def status_fields(self, state: PluginState) -> StatusFields:
        with self._lock:
            return {"node_labels": {"file": str(self.path or self.features_dir), "labels": dict(self.labels),
                                    "refused": list(self.refused), "error": self.last_error,
                                    "retry_in_s": self._retry.next_in() if self._pending else None,
                                    "retry_attempts": self._retry.attempts}}

    def close(self) -> None:
        self._retry.close()  # outside the lock: a running retry takes it
        with self._lock:
            self._pending = None
            self._remove()

    def _remove(self) -> None:
        if self.path is not None and self._text:
            remove_quietly(self.path, log)
            self._text = ""
