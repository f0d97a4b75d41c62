"""Probe functions for the burst tests: they run in their own process, imported by module name."""

from __future__ import annotations

import time
from typing import Any

RES = "example.com/widget"


def flapping_probe(ctx: Any) -> None:
    """Flaps every device ``rounds`` times as fast as it can, then reports the final state once and beats."""
    count, rounds = ctx.config["count"], ctx.config["rounds"]
    for r in range(rounds):
        for i in range(count):
            ctx.health(RES, f"w{i}", "Unhealthy" if (r + i) % 2 else "Healthy", f"round {r}")
    for i in range(count):  # the last word: every third device stays Unhealthy
        ctx.health(RES, f"w{i}", "Unhealthy" if i % 3 == 0 else "Healthy", "final")
    while not ctx.should_stop():
        ctx.heartbeat()
        time.sleep(0.05)


def garbage_probe(ctx: Any) -> None:
    """Floods the event socket with malformed and hostile messages, then reports one real change."""
    sock = ctx._socket  # the raw socket: a broken or hostile probe is not bound to the context's API
    for i in range(ctx.config["count"]):
        sock.send(b"[" * 100_000 if i % 2 else b"{not json")
    ctx.health(RES, "w1", "Unhealthy", "after the garbage")
    while not ctx.should_stop():
        ctx.heartbeat()
        time.sleep(0.05)
