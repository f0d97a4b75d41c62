"""The ``dpkit`` command: run a vendor, list vendors, explain discovery, show status, demo, doctor,
the kubelet emulator and the vendor scaffold; plus any command a package registers.

This is the one place that turns errors into exit codes; library code only raises.

Imports are deferred to the command that needs them: ``dpkit --help`` and ``dpkit vendors`` load
neither yaml, zmq, grpc nor protobuf, and ``dpkit status`` only zmq (and yaml when it must read a
config file for the state_dir). tests/core/test_cli_imports.py keeps it so.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dpkit.core.tools.registry import (
    SIM_TARGET,
    EntryTarget,
    entry_points,
    installed_vendors,
    load,
    load_vendor_class,
    metadata_entry_points,
)
from dpkit.core.vendorapi.errors import ConfigError, DpkitError, VendorError

if TYPE_CHECKING:

    from dpkit.core.support.config import Config
    from dpkit.core.vendorapi.vendor import Vendor

#: entry-point group for extra subcommands: name = subcommand, value = ``main(argv: list[str]) -> int``
COMMANDS_GROUP = "dpkit.commands"
BUILTIN_COMMANDS = ("run", "vendors", "discover", "status", "doctor", "demo", "kubelet", "new-vendor")
#: seconds `dpkit run` waits for something to register before it exits 1 (env DPKIT_EMPTY_GRACE)
DEFAULT_EMPTY_GRACE = 60.0
#: the one-line help of ``dpkit kubelet``; its full parser (which needs grpc) is built only for that command
KUBELET_HELP = "the kubelet emulator: serve it, or ask the one serving --dir"

VendorFactory = Callable[[Mapping[str, Any]], "Vendor"]


def _log() -> Any:
    from dpkit.core.support.logs import get_logger

    return get_logger("cli")


def _config(args: argparse.Namespace) -> Config:
    from dpkit.core.support.config import load_config

    config = load_config(args.config)
    if getattr(args, "log_json", False):
        config = config.replace(log_format="json")
    return config


def vendor_error(source: str, message: str) -> str:
    """A vendor's config error as ``<file>: vendor: <key path>: <message>``.

    Vendors name keys as ``vendor.key`` or ``vendor: ...``; the file is only known here. An error
    about an environment variable already names its variable and is left as it is.
    """
    if message.startswith("environment "):
        return message
    if message.startswith("vendor."):
        message = "vendor: " + message[len("vendor."):]
    elif not message.startswith("vendor: "):
        message = "vendor: " + message
    return message if source == "<defaults>" else f"{source}: {message}"


def vendor_factory(name: str, config: Config, devices: Path | None = None) -> VendorFactory:
    """How ``run``, ``discover`` and ``doctor`` build the vendor (and ``run`` rebuilds it on SIGHUP).

    For ``sim``: ``--devices`` sets ``devices_file``, and the scripted story stays off unless the
    config asks for it (``script: true``): a scripted failure is for ``dpkit demo``, not a test run.
    """
    if devices is not None and name != "sim":
        raise ConfigError(f"--devices is an option of the sim vendor only (not of {name!r})")
    vendor_class = load_vendor_class(name)

    def make(section: Mapping[str, Any]) -> Vendor:
        section = dict(section)
        if name == "sim":
            section.setdefault("script", False)
            if devices is not None:
                section["devices_file"] = str(devices)
        try:
            return vendor_class(section)
        except ConfigError as exc:
            raise ConfigError(vendor_error(config.source, str(exc))) from exc

    return make


def _empty_grace(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds (or inf), got {text!r}") from None
    if math.isnan(value) or value < 0:
        raise argparse.ArgumentTypeError(f"expected seconds >= 0 (or inf), got {text!r}")
    return value


def _default_empty_grace() -> float:
    raw = os.environ.get("DPKIT_EMPTY_GRACE")
    if raw is None:
        return DEFAULT_EMPTY_GRACE
    try:
        return _empty_grace(raw)
    except argparse.ArgumentTypeError as exc:
        raise ConfigError(f"environment DPKIT_EMPTY_GRACE: {exc}") from None


def _resource_count(manager: Any) -> int | None:
    """How many valid resources the vendor offers: the manager's current snapshot, replaced whole
    by its loop thread, so reading its size here is safe and costs nothing (``status()`` would
    build every device's entry and ask the kubelet each second)."""
    return len(manager.snapshot)


def cmd_run(args: argparse.Namespace) -> int:
    from dpkit.core.support.memory import tune_malloc

    tune_malloc()  # first, before any thread or large buffer (see support/memory.py)
    from dpkit.core.engine.manager import Manager
    from dpkit.core.integrations.observers import attach_observers
    from dpkit.core.support.logs import kv, setup_logging

    config = _config(args)
    grace = args.empty_grace if args.empty_grace is not None else _default_empty_grace()
    setup_logging(config.log_format, config.log_level)
    make = vendor_factory(args.vendor, config, args.devices)
    # Signals are taken synchronously by this thread: blocked here before any thread starts (threads
    # inherit the mask; the vendor's constructor and the metrics endpoint start some), so the kernel
    # cannot hand them to another thread, where SIGTERM's default action would kill the process
    # mid-stop and a Python handler would wait until the main thread next ran.
    signals = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP}
    signal.pthread_sigmask(signal.SIG_BLOCK, signals)
    try:
        # Vendor code runs in start-up (the constructor, the first scan), and may hang: it runs on a
        # thread of its own while this one keeps taking signals, so SIGTERM always ends the process.
        started: dict[str, Any] = {}

        def start() -> None:
            try:
                manager = started["manager"] = Manager(make(config.vendor), config, vendor_factory=make)
                attach_observers(manager)
                manager.start()
            except BaseException as exc:
                started["error"] = exc

        starter = threading.Thread(target=start, name="start-up", daemon=True)
        starter.start()
        reload_asked = False
        while starter.is_alive():
            info = signal.sigtimedwait(signals, 0.05)
            if info is not None and info.si_signo == signal.SIGHUP:
                reload_asked = True  # taken once start-up is done
            elif info is not None:
                _log().info("stopping during start-up", extra=kv(signal=signal.Signals(info.si_signo).name))
                if "manager" in started:
                    started["manager"].stop()
                    starter.join(5)  # a start-up past stop()'s wait removes what it made, then ends
                return 0
        if "error" in started:
            if "manager" in started:  # a half-started manager: its sockets and threads go first
                started["manager"].stop()
            raise started["error"]
        manager = started["manager"]
        if reload_asked:
            manager.request_reload()
        _log().info("running; SIGTERM stops, SIGHUP reloads the config", extra=kv(vendor=args.vendor))
        code = _serve(manager, signals, grace)
        manager.stop()
    finally:
        while signal.sigtimedwait(signals, 0) is not None:  # a second SIGTERM during stop: already stopping
            pass
        signal.pthread_sigmask(signal.SIG_UNBLOCK, signals)
    return code


def _serve(manager: Any, signals: set[signal.Signals], grace: float) -> int:
    """Wait for signals; exit 1 once nothing has been registrable for ``grace`` seconds."""
    from dpkit.core.support.logs import kv

    log = _log()
    empty_since: float | None = None
    while True:
        info = signal.sigtimedwait(signals, 1.0)
        if info is not None:
            if info.si_signo == signal.SIGHUP:
                manager.request_reload()
                continue
            log.info("stopping", extra=kv(signal=signal.Signals(info.si_signo).name))
            return 0
        count = _resource_count(manager)
        if count is None:
            continue
        if count:
            if empty_since is not None:
                log.info("resources to register again; not exiting", extra=kv(resources=count))
            empty_since = None
            continue
        now = time.monotonic()
        if empty_since is None:
            empty_since = now
            log.error("nothing to register: the vendor reports no resources, or only invalid resource names "
                      "(see `dpkit discover`); exiting with code 1 unless some appear",
                      extra=kv(vendor=manager.vendor.name, grace_s=grace))
        if now - empty_since >= grace:
            log.error("nothing registered; exiting with code 1", extra=kv(after_s=round(now - empty_since, 1)))
            return 1


def cmd_vendors(args: argparse.Namespace) -> int:
    vendors = {"sim": SIM_TARGET, **installed_vendors()}
    if args.json:
        print(json.dumps(vendors, indent=2, sort_keys=True))
        return 0
    for name, target in sorted(vendors.items()):
        print(f"{name}\t{target}" + ("  (built in: simulated devices)" if name == "sim" else ""))
    return 0


def cmd_discover(args: argparse.Namespace) -> int:
    from dpkit.core.support.logs import setup_logging
    from dpkit.core.tools.discovery import explain

    config = _config(args)
    setup_logging(config.log_format, "warning")
    from dpkit.core.engine.vendor_calls import VendorCalls

    calls = VendorCalls(vendor_factory(args.vendor, config, args.devices)(config.vendor), config.vendor_call_timeout,
                        config.vendor_scan_timeout)
    try:
        report = explain(calls)
    finally:
        calls.close()
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(format_discovery(report))
    return 0


def format_discovery(report: dict[str, Any]) -> str:
    from dpkit.core.engine.control import collapse

    lines = [f"vendor {report['vendor']}"]
    for res in report["resources"]:
        lines.append(f"{res['name']}: {res['healthy']}/{len(res['devices'])} healthy")
        for first, last, count, dev in collapse(res["devices"]):
            mark = "+" if dev["health"] == "Healthy" else "!"
            extra = f"  ({dev['reason']})" if dev["reason"] else ""
            attrs = " ".join(f"{k}={v}" for k, v in dev["attributes"].items())
            name = first if count == 1 else f"{first}..{last} ({count})"
            lines.append(f"  {mark} {name:<24} {dev['health']:<9} numa={dev['numa'] or '-'} {attrs}{extra}")
    if not report["resources"]:
        lines.append("no resources: `dpkit run` would register nothing (and exit 1 after its grace period)")
    for title, advertised in (("advertised:", True), ("not advertised / notes:", False)):
        findings = [f for f in report["findings"] if bool(f["advertised"]) is advertised]
        if not findings:
            continue
        lines.append(title)
        for f in findings:
            mark = "+" if advertised else "-"
            hint = f"\n      fix: {f['hint']}" if f["hint"] else ""
            where = f" [{f['resource']}]" if f["resource"] else ""
            lines.append(f"  {mark} {f['subject']}{where}: {f['reason']}{hint}")
    if report["errors"]:
        lines.append("errors:")
        lines.extend(f"  {e}" for e in report["errors"])
    return "\n".join(lines)


def cmd_status(args: argparse.Namespace) -> int:
    from dpkit.core.engine.control import format_status, query

    state_dir = args.state_dir
    if not state_dir:
        from dpkit.core.support.config import load_config

        state_dir = load_config(args.config).state_dir
    status = query(state_dir, timeout=args.timeout)["status"]
    print(json.dumps(status, indent=2) if args.json else format_status(status))
    return 0 if status["resources"] else 1


def cmd_doctor(args: argparse.Namespace) -> int:
    from dpkit.core.support.config import Config
    from dpkit.core.support.logs import setup_logging
    from dpkit.core.tools.doctor import run_checks

    make: VendorFactory | None = None
    try:
        config = _config(args)
        config_error = ""
    except DpkitError as exc:
        config, config_error = Config(), str(exc)
    setup_logging(config.log_format, "error")
    try:
        make = vendor_factory(args.vendor, config, args.devices)
    except VendorError as exc:
        load_error = str(exc)
    except ConfigError as exc:
        config_error, load_error = config_error or str(exc), ""
    else:
        load_error = ""
    checks = run_checks(args.vendor, config, config_error, make=make, load_error=load_error)
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
    from dpkit.core.support.logs import setup_logging
    from dpkit.core.tools.demo import run_demo

    setup_logging("json" if args.log_json else "human", "info" if args.verbose else "error")
    return run_demo(devices_file=args.devices, out=sys.stdout)


def cmd_kubelet(args: argparse.Namespace) -> int:
    from dpkit.core.tools import kubelet

    return kubelet.command(args)


def cmd_new_vendor(args: argparse.Namespace) -> int:
    from dpkit.core.tools.scaffold import scaffold

    root = args.root.resolve()
    made = scaffold(args.name, root)
    for path in made.created:
        print(f"created {path.relative_to(root)}")
    for path in made.updated:
        print(f"updated {path.relative_to(root)}")
    for note in made.notes:
        print(f"note: {note}")
    print(f"\nnext: ./hatchw run test:python -m pytest tests/{args.name}   (docs: docs/{args.name}.md)")
    return 0


# -- the parser ----------------------------------------------------------------------------------
def _command_entry_points() -> dict[str, EntryTarget]:
    """Installed extra subcommands; a name a built-in command has is never shadowed."""
    return {name: ep for name, ep in entry_points(COMMANDS_GROUP).items() if name not in BUILTIN_COMMANDS}


def _described() -> tuple[str, dict[str, EntryTarget]]:
    """The vendor names and extra commands for the help, from one entry-point scan.

    Read here rather than through :mod:`dpkit.core.vendorapi.vendor`, which would load the device model
    for a help text.
    """
    vendors = ", ".join(["sim", *sorted(installed_vendors())])
    return vendors, _command_entry_points()


def _columns() -> int:
    """The terminal width as ``shutil.get_terminal_size`` gives it: ``$COLUMNS``, the terminal's, else 80."""
    try:
        columns = int(os.environ.get("COLUMNS", ""))
    except ValueError:
        columns = 0
    if columns <= 0 and sys.__stdout__ is not None:
        try:
            columns = os.get_terminal_size(sys.__stdout__.fileno()).columns
        except (ValueError, OSError):
            columns = 0
    return columns if columns > 0 else 80


class _Formatter(argparse.HelpFormatter):
    """argparse's help formatter with the width from :func:`_columns`.

    argparse's own imports shutil for the width, on every ``add_argument``: that brings shutil,
    bz2, lzma and fnmatch into every ``dpkit run`` process, which never prints help.
    """

    def __init__(self, prog: str, indent_increment: int = 2, max_help_position: int = 24,
                 width: int | None = None) -> None:
        super().__init__(prog, indent_increment, max_help_position, _columns() - 2 if width is None else width)


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser formatting with :class:`_Formatter` unless told otherwise; subparsers are one too."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", _Formatter)
        super().__init__(*args, **kwargs)


def build_parser(describe: bool = False, command: str = "") -> argparse.ArgumentParser:
    """The parser of the built-in commands. ``describe``: also list the installed vendors and extra
    commands in the help (an entry-point scan, done only when help is shown). ``command``: the
    subcommand given; ``kubelet`` gets its full parser only then, since building it imports grpc."""
    vendors, extra = _described() if describe else ("see `dpkit vendors`", {})
    epilog = f"vendors: {vendors}" if describe else None
    parser = _Parser(prog="dpkit", description="Kubernetes device plugins for many vendors.", epilog=epilog)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    vendor_help = f"vendor to use: sim (built in, simulated devices) or an installed vendor package ({vendors})"

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--config", "-c", type=Path, help="YAML config file (env DPKIT_<KEY> overrides)")
        p.add_argument("--log-json", action="store_true", help="log one JSON object per line")
        p.add_argument("--devices", type=Path, metavar="FILE",
                       help="sim only: YAML devices file (format: docs/getting-started.md; default: a demo node)")

    p = sub.add_parser("run", help="serve a vendor's devices to the kubelet (SIGTERM stops, SIGHUP reloads)")
    p.add_argument("vendor", help=vendor_help)
    common(p)
    p.add_argument("--empty-grace", type=_empty_grace, metavar="SECONDS",
                   help="exit 1 after this long with nothing to register (default: env DPKIT_EMPTY_GRACE or "
                        f"{DEFAULT_EMPTY_GRACE:g}; inf: never)")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("vendors", help="list the vendors: sim and the installed vendor packages")
    p.add_argument("--json", action="store_true", help="print {name: module:class} as JSON")
    p.set_defaults(func=cmd_vendors)

    p = sub.add_parser("discover", help="what would be advertised, and why anything is not")
    p.add_argument("vendor", help=vendor_help)
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    common(p)
    p.set_defaults(func=cmd_discover)

    p = sub.add_parser("status", help="ask a running plugin for its resources, devices and errors; "
                                      "exit 1 when it has nothing to register")
    p.add_argument("--json", action="store_true", help="print the status as JSON")
    p.add_argument("--state-dir", help="the running plugin's state_dir (default: from config)")
    p.add_argument("--timeout", type=float, default=3.0, help="seconds to wait for an answer (default: 3)")
    p.add_argument("--config", "-c", type=Path, help="the running plugin's config file (for its state_dir)")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("doctor", help="check the node for everything a vendor needs; exit 1 on failure")
    p.add_argument("vendor", help=vendor_help)
    common(p)
    p.set_defaults(func=cmd_doctor)

    p = sub.add_parser("demo", help="emulated kubelet + simulated devices: the whole scripted flow in seconds")
    p.add_argument("--devices", type=Path, help="YAML device file (default: embedded demo node)")
    p.add_argument("--log-json", action="store_true", help="log one JSON object per line")
    p.add_argument("--verbose", "-v", action="store_true", help="show the plugin's info logs")
    p.set_defaults(func=cmd_demo)

    if command == "kubelet":
        from dpkit.core.tools.kubelet import add_parser as add_kubelet_parser

        add_kubelet_parser(sub, cmd_kubelet)
    else:  # listed in `dpkit --help` with the same line; never parsed as such (main picks the full one)
        sub.add_parser("kubelet", help=KUBELET_HELP)

    p = sub.add_parser("new-vendor", help="scaffold a vendor package under plugins/NAME (test, docs, image, deploy)")
    p.add_argument("name", help="vendor name: lower case letters, digits and '_' (the `dpkit run` name)")
    p.add_argument("--root", type=Path, default=Path("."), help="the dpkit checkout (default: current directory)")
    p.set_defaults(func=cmd_new_vendor)

    for name, ep in sorted(extra.items()):
        sub.add_parser(name, help=f"from {ep.distribution} ({ep.value}); `dpkit {name} --help` for its options",
                       add_help=False)
    return parser


def _run_entry_point(name: str, ep: EntryTarget, argv: list[str]) -> int:
    try:
        command = load(ep.value)
    except Exception as exc:  # an import error in a package must not kill the CLI with a traceback
        raise DpkitError(f"command {name!r} failed to load from {ep.value}: {exc}") from exc
    if not callable(command):
        raise DpkitError(f"command {name!r} entry point {ep.value} is not callable")
    return int(command(argv))


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        first = argv[0] if argv else ""
        if first and not first.startswith("-") and first not in BUILTIN_COMMANDS:
            # importlib.metadata only for a name the entry_points.txt scan does not know (a zipped egg, say)
            ep = _command_entry_points().get(first) or metadata_entry_points(COMMANDS_GROUP).get(first)
            if ep is not None:
                return _run_entry_point(first, ep, argv[1:])
        describe = first not in BUILTIN_COMMANDS or any(a in ("-h", "--help") for a in argv)
        args = build_parser(describe=describe, command=first).parse_args(argv)
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
