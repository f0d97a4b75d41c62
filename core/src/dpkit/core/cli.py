"""The ``dpkit`` command: run a vendor, list vendors, explain discovery, show status, demo, doctor.

This is the one place that turns errors into exit codes; library code only raises.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dpkit.core.config import Config, load_config
from dpkit.core.control import collapse
from dpkit.core.errors import DpkitError
from dpkit.core.logs import get_logger, setup_logging
from dpkit.core.vendor import Vendor, installed_vendors, load_vendor_class

log = get_logger("cli")


def _config(args: argparse.Namespace) -> Config:
    config = load_config(args.config)
    if getattr(args, "log_json", False):
        config = config.replace(log_format="json")
    return config


def _vendor(name: str, config: Config) -> Vendor:
    return load_vendor_class(name)(config.vendor)


def cmd_run(args: argparse.Namespace) -> int:
    from dpkit.core.manager import Manager
    from dpkit.core.observers import attach_observers

    config = _config(args)
    setup_logging(config.log_format, config.log_level)
    vendor_class = load_vendor_class(args.vendor)
    manager = Manager(vendor_class(config.vendor), config, vendor_factory=vendor_class)
    attach_observers(manager)
    # Signals are taken synchronously by this thread: blocked here before any thread starts (threads
    # inherit the mask), so the kernel cannot hand them to a gRPC or zmq thread where a Python
    # handler would wait until the main thread next ran.
    signals = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP}
    signal.pthread_sigmask(signal.SIG_BLOCK, signals)
    try:
        manager.start()
        log.info("running; SIGTERM stops, SIGHUP reloads the config", extra={"fields": {"vendor": args.vendor}})
        while (received := signal.sigwait(signals)) == signal.SIGHUP:
            manager.request_reload()
        log.info("stopping", extra={"fields": {"signal": signal.Signals(received).name}})
        manager.stop()
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, signals)
    return 0


def cmd_vendors(args: argparse.Namespace) -> int:
    vendors = installed_vendors()
    if args.json:
        print(json.dumps(vendors, indent=2, sort_keys=True))
        return 0
    if not vendors:
        print("no vendor packages installed (the built-in 'sim' vendor is always available)")
    for name, target in sorted(vendors.items()):
        print(f"{name}\t{target}")
    return 0


def cmd_discover(args: argparse.Namespace) -> int:
    from dpkit.core.discovery import explain

    config = _config(args)
    setup_logging(config.log_format, "warning")
    report = explain(_vendor(args.vendor, config))
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(format_discovery(report))
    return 0


def format_discovery(report: dict[str, Any]) -> str:
    lines = [f"vendor {report['vendor']}"]
    for res in report["resources"]:
        lines.append(f"{res['name']}: {res['healthy']}/{len(res['devices'])} healthy")
        for first, last, count, dev in collapse(res["devices"]):
            mark = "+" if dev["health"] == "Healthy" else "!"
            extra = f"  ({dev['reason']})" if dev["reason"] else ""
            attrs = " ".join(f"{k}={v}" for k, v in dev["attributes"].items())
            name = first if count == 1 else f"{first}..{last} ({count})"
            lines.append(f"  {mark} {name:<24} {dev['health']:<9} numa={dev['numa'] or '-'} {attrs}{extra}")
    if report["findings"]:
        lines.append("not advertised / notes:")
        for f in report["findings"]:
            mark = "+" if f["advertised"] else "-"
            hint = f"\n      fix: {f['hint']}" if f["hint"] else ""
            where = f" [{f['resource']}]" if f["resource"] else ""
            lines.append(f"  {mark} {f['subject']}{where}: {f['reason']}{hint}")
    if report["errors"]:
        lines.append("errors:")
        lines.extend(f"  {e}" for e in report["errors"])
    return "\n".join(lines)


def cmd_status(args: argparse.Namespace) -> int:
    from dpkit.core.control import format_status, query

    state_dir = args.state_dir or load_config(args.config).state_dir
    reply = query(state_dir, timeout=args.timeout)
    print(json.dumps(reply["status"], indent=2) if args.json else format_status(reply["status"]))
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    from dpkit.core.doctor import run_checks

    try:
        config = _config(args)
        config_error = ""
    except DpkitError as exc:
        config, config_error = Config(), str(exc)
    setup_logging(config.log_format, "error")
    checks = run_checks(args.vendor, config, config_error)
    failed = 0
    for check in checks:
        mark = "ok  " if check.ok else "FAIL"
        print(f"[{mark}] {check.name}: {check.detail}")
        if not check.ok:
            failed += 1
            if check.hint:
                print(f"       fix: {check.hint}")
    print(f"{len(checks) - failed} passed, {failed} failed")
    return 1 if failed else 0


def cmd_demo(args: argparse.Namespace) -> int:
    from dpkit.core.demo import run_demo

    setup_logging("json" if args.log_json else "human", "info" if args.verbose else "error")
    return run_demo(devices_file=args.devices, out=sys.stdout)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dpkit", description="Kubernetes device plugins for many vendors.")
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--config", "-c", type=Path, help="YAML config file (env DPKIT_<KEY> overrides)")
        p.add_argument("--log-json", action="store_true", help="log one JSON object per line")

    p = sub.add_parser("run", help="serve a vendor's devices to the kubelet")
    p.add_argument("vendor")
    common(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("vendors", help="list installed vendor packages")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_vendors)

    p = sub.add_parser("discover", help="what would be advertised, and why not")
    p.add_argument("vendor")
    p.add_argument("--json", action="store_true")
    common(p)
    p.set_defaults(func=cmd_discover)

    p = sub.add_parser("status", help="ask a running plugin for its resources, devices and errors")
    p.add_argument("--json", action="store_true")
    p.add_argument("--state-dir", help="the running plugin's state_dir (default: from config)")
    p.add_argument("--timeout", type=float, default=3.0)
    p.add_argument("--config", "-c", type=Path)
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("doctor", help="check the node for everything a vendor needs; exit 1 on failure")
    p.add_argument("vendor")
    common(p)
    p.set_defaults(func=cmd_doctor)

    p = sub.add_parser("demo", help="emulated kubelet + simulated devices: the whole flow in seconds")
    p.add_argument("--devices", type=Path, help="YAML device file (default: embedded demo node)")
    p.add_argument("--log-json", action="store_true")
    p.add_argument("--verbose", "-v", action="store_true", help="show the plugin's info logs")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except DpkitError as exc:
        print(f"dpkit: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # an unusable plugin_dir or state_dir, a socket that cannot be bound
        where = f" ({exc.filename})" if exc.filename else ""
        print(f"dpkit: error: {exc.strerror or exc}{where}; check plugin_dir and state_dir", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
