"""Client side of the read-only control socket, and the ``dpkit status`` table.

zmq is imported by :func:`query` only: ``dpkit discover`` uses :func:`collapse` and should not
pay for it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from dpkit.core.vendorapi.errors import DpkitError


def query(state_dir: str | Path, command: str = "status", timeout: float = 3.0) -> dict[str, Any]:
    """Ask a running manager; raises DpkitError when nothing answers in ``timeout`` seconds."""
    import zmq

    from dpkit.core.support.files import private_state_dir

    path = private_state_dir(state_dir, create=False) / "control.sock"  # where the manager bound it
    if not path.exists():
        raise DpkitError(f"no control socket at {path}: is `dpkit run` running with this state_dir?")
    context: zmq.Context[Any] = zmq.Context()
    sock = context.socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVTIMEO, int(timeout * 1000))
    sock.setsockopt(zmq.SNDTIMEO, int(timeout * 1000))
    try:
        sock.connect(f"ipc://{path}")
        sock.send(json.dumps({"cmd": command}).encode())
        reply: dict[str, Any] = json.loads(sock.recv())
    except zmq.Again:
        raise DpkitError(f"the manager at {path} did not answer within {timeout:g}s") from None
    finally:
        sock.close(0)
        context.term()
    if not reply.get("ok"):
        raise DpkitError(str(reply.get("error", "control request failed")))
    return reply


def collapse(
    devices: list[dict[str, Any]], holders: dict[str, str] | None = None, min_run: int = 4
) -> list[tuple[str, str, int, dict[str, Any]]]:
    """Fold runs of devices that look alike (shared slots such as 1000 kvm slots) into one row.

    Returns (first id, last id, count, representative) per row; runs shorter than ``min_run``
    stay one row per device.
    """
    holders = holders or {}

    def look(dev: dict[str, Any]) -> tuple[Any, ...]:
        return (dev["health"], tuple(dev["numa"]) if isinstance(dev["numa"], list) else dev["numa"],
                dev["reason"], tuple(sorted(dev.get("attributes", {}).items())), holders.get(dev["id"]))

    rows: list[tuple[str, str, int, dict[str, Any]]] = []
    run: list[dict[str, Any]] = []
    for dev in [*devices, None]:
        if dev is not None and run and look(dev) == look(run[0]):
            run.append(dev)
            continue
        if len(run) >= min_run:
            rows.append((run[0]["id"], run[-1]["id"], len(run), run[0]))
        else:
            rows.extend((d["id"], d["id"], 1, d) for d in run)
        run = [dev] if dev is not None else []
    return rows


def format_status(status: dict[str, Any]) -> str:
    """A table for people; ``--json`` gives the same data to machines."""
    lines = [
        f"vendor {status['vendor']}  pid {status['pid']}  up {status['uptime_s']}s  "
        f"kubelet {'present' if status['kubelet']['present'] else 'ABSENT'} "
        f"(restarts seen: {status['kubelet']['restarts_seen']})",
    ]
    if not status["resources"]:
        lines.append("")
        lines.append("NOTHING TO REGISTER: the vendor reports no resources, or only invalid resource names "
                     "(`dpkit discover` says why); `dpkit run` exits 1 after its grace period")
    for res in status["resources"]:
        reg = "registered" if res["registered"] else "NOT registered"
        holders = res.get("holders", {})
        # "healthy", not "allocatable": a healthy device a pod holds is not free
        held = f", {sum(1 for d in res['devices'] if d['id'] in holders)} held" if holders else ""
        lines.append("")
        lines.append(f"{res['name']}: {res['allocatable']}/{res['capacity']} healthy{held}, {reg} "
                     f"({res['registrations']}x), streams {res['streams']}, allocations {res['allocations']}")
        if res["last_error"]:
            lines.append(f"  last error: {res['last_error']}")
        rows = [(first if count == 1 else f"{first}..{last} ({count})", dev)
                for first, last, count, dev in collapse(res["devices"], holders)]
        width = max([len(name) for name, _ in rows] + [6])
        lines.append(f"  {'DEVICE':<{width}}  {'HEALTH':<9}  {'NUMA':<5}  {'HELD BY':<24}  REASON")
        for name, dev in rows:
            numa = ",".join(str(n) for n in dev["numa"]) or "-"
            lines.append(f"  {name:<{width}}  {dev['health']:<9}  {numa:<5}  "
                         f"{holders.get(dev['id'], '-'):<24}  {dev['reason']}".rstrip())
    if status.get("probes"):
        lines.append("")
        for probe in status["probes"]:
            state = "SILENT" if probe["silent"] else ("alive" if probe["alive"] else "starting")
            lines.append(f"probe {probe['name']}: {state}, pid {probe['pid']}, heartbeats {probe['heartbeats']}, "
                         f"restarts {probe['restarts']}")
    if status.get("errors"):
        lines.append("")
        lines.append("recent warnings and errors:")
        for err in status["errors"][-10:]:
            lines.append(f"  [{err['level']}] {err['msg']}" + "".join(
                f" {k}={v}" for k, v in err.items() if k not in ("ts", "level", "msg")))
    return "\n".join(lines)
