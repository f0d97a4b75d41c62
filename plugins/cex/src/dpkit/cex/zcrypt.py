"""zcrypt device nodes restricted to some APQNs: the isolation a container gets.

The zcrypt driver (``CONFIG_ZCRYPT_MULTIDEVNODES``) makes extra ``z90crypt``-like nodes on
request: writing a name to ``<sysfs>/class/zcrypt/create`` registers the device
``<sysfs>/devices/virtual/zcrypt/<name>`` with empty ``apmask``/``aqmask``/``ioctlmask``, and
udev makes ``/dev/<name>``. Through such a node only the adapters in ``apmask`` and the
domains in ``aqmask`` are reachable; a container gets it as ``/dev/z90crypt``. Writing the name
to ``destroy`` removes it. Masks are written whole (``0x`` + 64 hex digits), so rewriting
them is idempotent.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from dpkit.cex.apbus import format_mask
from dpkit.core import DpkitError, get_logger, kv

log = get_logger("cex.zcrypt")

NODE_PREFIX = "zcrypt-"
MAX_NAME = 32  # the driver's ZCDN_MAX_NAME
_NAME = re.compile(r"^zcrypt-apqn-[0-9]{1,3}-[0-9]{1,3}-[0-9]{1,4}$")
ALL_IOCTLS = frozenset(range(256))


class ZcryptError(DpkitError):
    """A zcrypt node could not be made or removed; the message says which step failed."""


def _wait(predicate: Callable[[], bool], timeout: float) -> bool:
    """Poll ``predicate`` with a short backoff (udev and sysfs give nothing to block on)."""
    deadline = time.monotonic() + timeout
    delay = 0.002
    while True:
        if predicate():
            return True
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        time.sleep(min(delay, remaining))
        delay = min(delay * 2, 0.05)


class ZcryptNodes:
    """Create, restrict, list and destroy zcrypt nodes below one sysfs root and /dev."""

    def __init__(self, sysfs_root: str | Path, dev_dir: str | Path, timeout: float = 5.0,
                 class_dir: str | Path | None = None) -> None:
        # class_dir: IBM's ZCRYPT_CLASSDIR; the nodes themselves are always below sysfs_root
        self.class_dir = Path(class_dir) if class_dir is not None else Path(sysfs_root) / "class" / "zcrypt"
        self.nodes_dir = Path(sysfs_root) / "devices" / "virtual" / "zcrypt"
        self.dev_dir = Path(dev_dir)
        self.timeout = timeout

    def supported(self) -> bool:
        """Whether the kernel offers extra zcrypt nodes (``create`` exists)."""
        return (self.class_dir / "create").exists()

    def dev_path(self, name: str) -> Path:
        return self.dev_dir / name

    def exists(self, name: str) -> bool:
        return (self.nodes_dir / name).is_dir()

    def names(self) -> list[str]:
        """Nodes of the ``zcrypt-apqn-*`` family (ours, or an IBM plugin's before us)."""
        try:
            entries = os.listdir(self.nodes_dir)
        except OSError:
            return []
        return sorted(n for n in entries if _NAME.match(n))

    @staticmethod
    def check_name(name: str) -> str:
        if len(name) > MAX_NAME or not _NAME.match(name):
            raise ZcryptError(f"invalid zcrypt node name {name!r}")
        return name

    def _write(self, path: Path, text: str, step: str) -> None:
        try:
            with open(path, "w") as f:
                f.write(text)
        except OSError as exc:
            raise ZcryptError(f"{step}: cannot write {path}: {exc.strerror or exc}") from None

    def ensure(self, name: str, adapters: Iterable[int], domains: Iterable[int]) -> Path:
        """Make (or re-restrict) node ``name`` for exactly these adapters x domains; its /dev path.

        On failure a node this call created is destroyed again, so nothing half-made stays.
        """
        self.check_name(name)
        created = False
        if not self.exists(name):
            if not self.supported():
                raise ZcryptError(f"the kernel offers no extra zcrypt nodes ({self.class_dir / 'create'} "
                                  "is missing; needs CONFIG_ZCRYPT_MULTIDEVNODES)")
            self._write(self.class_dir / "create", name, f"create {name}")
            created = True
            if not _wait(lambda: self.exists(name), self.timeout):
                raise ZcryptError(f"create {name}: {self.nodes_dir / name} did not appear within {self.timeout} s")
        try:
            node = self.nodes_dir / name
            self._write(node / "apmask", format_mask(set(adapters)) + "\n", f"restrict {name} adapters")
            self._write(node / "aqmask", format_mask(set(domains)) + "\n", f"restrict {name} domains")
            self._write(node / "ioctlmask", format_mask(ALL_IOCTLS) + "\n", f"allow {name} ioctls")
            dev = self.dev_path(name)
            if not _wait(dev.exists, self.timeout):
                raise ZcryptError(f"create {name}: udev made no {dev} within {self.timeout} s")
            os.chmod(dev, 0o666)  # the container user need not be root, as with IBM's plugin
        except (ZcryptError, OSError) as exc:
            if created:
                self.destroy(name)
            if isinstance(exc, ZcryptError):
                raise
            raise ZcryptError(f"create {name}: {exc}") from None
        if created:
            log.info("zcrypt node created", extra=kv(node=name))
        return self.dev_path(name)

    def destroy(self, name: str) -> bool:
        """Remove node ``name``; False (logged) when it stays."""
        self.check_name(name)
        if not self.exists(name):
            return True
        try:
            self._write(self.class_dir / "destroy", name, f"destroy {name}")
        except ZcryptError as exc:
            log.error("cannot destroy zcrypt node", extra=kv(node=name, error=str(exc)))
            return False
        if not _wait(lambda: not self.exists(name), self.timeout):
            log.error("zcrypt node still present after destroy", extra=kv(node=name))
            return False
        log.info("zcrypt node destroyed", extra=kv(node=name))
        return True
