"""Which XID errors make a GPU Unhealthy, configured the way NVIDIA's plugin is.

``DP_DISABLE_HEALTHCHECKS``: ``all`` turns health checks off, ``xids`` turns XID checks off,
numbers add XIDs to ignore. ``DP_ENABLE_HEALTHCHECKS``: XIDs (or ``all``) that count as
critical even when ignored by default or by the disable list. XIDs that applications cause
(13, 31, 43, 45, 68, 109) are ignored by default, as NVIDIA does.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from dpkit.core import ConfigError

DISABLE_ENV = "DP_DISABLE_HEALTHCHECKS"
ENABLE_ENV = "DP_ENABLE_HEALTHCHECKS"

#: XIDs caused by applications, not by the GPU: graphics engine exception, GPU memory page
#: fault, GPU stopped processing, preemptive cleanup, video processor exception, context
#: switch timeout.
APPLICATION_XIDS = frozenset({13, 31, 43, 45, 68, 109})


@dataclass(frozen=True)
class XidPolicy:
    """The parsed health-check switches."""

    checks_disabled: bool = False  # DP_DISABLE_HEALTHCHECKS=all: no health probe at all
    xids_disabled: bool = False  # DP_DISABLE_HEALTHCHECKS=xids: every XID ignored unless enabled
    ignored: frozenset[int] = APPLICATION_XIDS
    enabled: frozenset[int] = field(default_factory=frozenset)
    enable_all: bool = False

    def is_critical(self, xid: int) -> bool:
        """Whether this XID marks the GPU Unhealthy."""
        if self.enable_all or xid in self.enabled:
            return True
        if self.checks_disabled or self.xids_disabled:
            return False
        return xid not in self.ignored

    @property
    def probe_wanted(self) -> bool:
        """Health checks stay on unless everything is disabled and nothing explicitly enabled."""
        return not self.checks_disabled or self.enable_all or bool(self.enabled)


def _tokens(name: str, value: str) -> tuple[set[str], set[int]]:
    words: set[str] = set()
    numbers: set[int] = set()
    for raw in value.lower().split(","):
        token = raw.strip()
        if not token:
            continue
        if token in ("all", "xids"):
            words.add(token)
        elif token.isdigit():
            numbers.add(int(token))
        else:
            raise ConfigError(f"environment {name}: {raw.strip()!r} is not 'all', 'xids' or an XID number")
    return words, numbers


def policy_from_env(environ: Mapping[str, str]) -> XidPolicy:
    """Parse the two NVIDIA variables; a malformed entry is a ConfigError naming the variable."""
    disable_words, disable_xids = _tokens(DISABLE_ENV, environ.get(DISABLE_ENV, ""))
    enable_words, enable_xids = _tokens(ENABLE_ENV, environ.get(ENABLE_ENV, ""))
    return XidPolicy(
        checks_disabled="all" in disable_words,
        xids_disabled="xids" in disable_words,
        ignored=APPLICATION_XIDS | disable_xids,
        enabled=frozenset(enable_xids),
        enable_all=bool(enable_words),
    )
