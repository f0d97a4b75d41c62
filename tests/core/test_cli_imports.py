"""The CLI's cheap commands load only what they use (issue 13): counted in modules, not timed.

Each command runs in a fresh interpreter, which reports the modules it ended with; a heavy module
(grpc, protobuf, zmq, yaml) there means an import crept back onto a path that does not need it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from child_process import loaded_after

from dpkit.core.tools import cli

HEAVY = ("grpc", "google.protobuf", "zmq", "yaml")

# runs a command like `dpkit ARGS`, then prints the top-level packages it imported on stderr's last line
RUNNER = """
import atexit, json, sys
atexit.register(lambda: print(json.dumps(sorted(sys.modules)), file=sys.stderr))
from dpkit.core.tools.cli import main
sys.exit(main(sys.argv[1:]))
"""


def modules_after(*args: str) -> tuple[subprocess.CompletedProcess[str], set[str]]:
    env = {**os.environ, "COLUMNS": "200"}  # help lines unwrapped
    result = subprocess.run([sys.executable, "-c", RUNNER, *args], capture_output=True, text=True, timeout=60,
                            env=env)
    return result, set(json.loads(result.stderr.strip().splitlines()[-1]))


def heavy(modules: set[str]) -> list[str]:
    return sorted(m for m in modules if any(m == h or m.startswith(h + ".") for h in HEAVY))


@pytest.mark.parametrize("args", [("--help",), ("vendors",), ("vendors", "--json"), ("run", "--help"),
                                  ("status", "--help"), ("discover", "--help")])
def test_help_and_vendors_load_no_grpc_protobuf_zmq_or_yaml(args: tuple[str, ...]) -> None:
    result, modules = modules_after(*args)
    assert result.returncode == 0, result.stderr
    assert heavy(modules) == []
    assert "dpkit.core.tools.kubelet" not in modules and "dpkit.core.engine.manager" not in modules


def test_help_still_lists_vendors_and_the_kubelet_command() -> None:
    result, _ = modules_after("--help")
    assert "vendors: sim, " in result.stdout
    assert any(line.split()[:1] == ["kubelet"] and line.endswith(cli.KUBELET_HELP)
               for line in result.stdout.splitlines())


def test_vendors_does_not_load_vendor_packages() -> None:
    result, modules = modules_after("vendors")
    assert "sim\tdpkit.core.tools.sim:SimulatedVendor" in result.stdout
    assert not any(m.startswith(("dpkit.nvidia", "dpkit.sfc", "dpkit.cex", "dpkit.kvm_vfio")) for m in modules)


def test_status_loads_neither_zmq_grpc_nor_yaml_when_given_the_state_dir(tmp_path: Path) -> None:
    result, modules = modules_after("status", "--state-dir", str(tmp_path), "--timeout", "0.1")
    assert result.returncode == 2 and "no control socket" in result.stderr
    assert heavy(modules) == []


def test_kubelet_help_is_the_emulators_full_parser() -> None:
    result, modules = modules_after("kubelet", "--help")
    assert result.returncode == 0
    assert "allocate" in result.stdout and "restart" in result.stdout
    assert "grpc" in modules  # the one command that needs it


def test_the_kubelet_stub_help_matches_the_emulators_own() -> None:
    full = cli.build_parser(command="kubelet")
    stub = cli.build_parser()
    assert _choice_help(full, "kubelet") == _choice_help(stub, "kubelet") == cli.KUBELET_HELP


def _choice_help(parser: object, name: str) -> str | None:
    import argparse

    assert isinstance(parser, argparse.ArgumentParser)
    for action in parser._subparsers._group_actions:  # type: ignore[union-attr]
        for choice in getattr(action, "_choices_actions", []):
            if choice.dest == name:
                return str(choice.help)
    return None


def test_the_entry_point_scan_agrees_with_importlib_metadata() -> None:
    """registry reads entry_points.txt itself (2.7 MB less in a serving process): same answers, every group."""
    from importlib import metadata

    from dpkit.core.tools import registry

    groups = {ep.group for dist in metadata.distributions() for ep in dist.entry_points}
    assert {"dpkit.vendors", "dpkit.commands", "console_scripts"} <= groups
    for group in groups:
        ours = {name: target.value for name, target in registry.entry_points(group).items()}
        assert ours == {ep.name: ep.value for ep in metadata.entry_points(group=group)}, group


def test_loading_an_installed_vendor_does_not_import_importlib_metadata() -> None:
    code = ("from dpkit.core.tools.registry import load_vendor_class\n"
            "assert load_vendor_class('kvm_vfio').__name__ == 'KvmVfioVendor'")
    assert loaded_after(code, ("importlib.metadata", "email")) == []


def test_an_entry_point_with_extras_loads_as_importlib_does() -> None:
    """`name = module:object [extra]` is PyPA's form for an entry point that needs an extra."""
    from dpkit.core.tools import registry

    assert registry.load("json:dumps [speedups]") is json.dumps
    assert registry.load("os.path:join") is os.path.join
