"""The lifetime of a container's zcrypt node and shadow tree: made at Allocate, removed when unused.

Both are named by a *key*, the first device ID the container was given (``apqn-1-6-0``). A
device ID is held by one container at a time, but a key outlives its container by the grace
period below, so the next container given that ID (maybe with other APQNs beside it) can find
the node and tree still there: :meth:`dpkit.cex.vendor.CexVendor.pre_start` then re-restricts
the node and rebuilds the tree for its own APQNs, and :meth:`NodeKeeper.provisioned` restarts
the key's clock. The kubelet never says a container ended, so :meth:`NodeKeeper.reconcile`
compares what exists with what the pod-resources API still lists, with IBM's two grace periods:
a node never seen in use (the pod may still be starting) lives ``never_used_after`` seconds, one
whose container is gone ``unused_after`` seconds. Nodes left by an earlier run count as new
when first seen.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path

from dpkit.cex import shadow
from dpkit.cex.zcrypt import NODE_PREFIX, ZcryptNodes
from dpkit.core import get_logger, kv

log = get_logger("cex.nodes")


@dataclass
class _Seen:
    since: float
    last_used: float | None = None


class NodeKeeper:
    """Tracks each key's age and last use; removes the node and shadow tree of expired keys."""

    def __init__(self, zcrypt: ZcryptNodes, shadow_base: Path | None, *, unused_after: float,
                 never_used_after: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.zcrypt = zcrypt
        self.shadow_base = shadow_base
        self.unused_after = unused_after
        self.never_used_after = never_used_after
        self.clock = clock
        self._seen: dict[str, _Seen] = {}

    def provisioned(self, key: str) -> None:
        """A container is about to use ``key`` (Allocate or pre-start): its grace starts now."""
        self._seen[key] = _Seen(self.clock())

    def present(self) -> set[str]:
        keys = {name[len(NODE_PREFIX):] for name in self.zcrypt.names()}
        if self.shadow_base is not None:
            keys |= set(shadow.keys(self.shadow_base))
        return keys

    def reconcile(self, in_use: Collection[str]) -> list[str]:
        """Remove what no container has used for its grace period; the keys removed."""
        now = self.clock()
        present = self.present()
        self._seen = {k: v for k, v in self._seen.items() if k in present}
        removed = []
        for key in sorted(present):
            seen = self._seen.setdefault(key, _Seen(now))
            if key in in_use:
                seen.last_used = now
                continue
            if seen.last_used is None:
                expired = now - seen.since >= self.never_used_after
            else:
                expired = now - seen.last_used >= self.unused_after
            if expired and self.remove(key):
                removed.append(key)
        return removed

    def remove(self, key: str) -> bool:
        """Destroy the key's node and shadow tree now; False when the node would not go."""
        if not self.zcrypt.destroy(NODE_PREFIX + key):
            return False
        if self.shadow_base is not None:
            shadow.remove(self.shadow_base, key)
        self._seen.pop(key, None)
        log.info("removed zcrypt node and shadow sysfs no container uses", extra=kv(key=key))
        return True
