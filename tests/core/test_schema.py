"""The declarative configuration layer: every error names where, the full key path and what was expected."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Annotated, Any

import pytest

from dpkit.cex.settings import load_settings as cex_settings
from dpkit.core import Invalid, Meta, Section, load_section, setting
from dpkit.core.support.config import load_config
from dpkit.core.tools.sim import SimulatedVendor
from dpkit.core.vendorapi.errors import ConfigError
from dpkit.kvm_vfio.config import parse_config as kvm_config
from dpkit.nvidia.config import load_settings as nvidia_settings
from dpkit.sfc.config import parse_config as sfc_config


class Item(Section, frozen=True):
    name: str
    replicas: Annotated[int, Meta(ge=2, le=16)] = 2
    kind: str = setting(default="", name="class")

    def __post_init__(self) -> None:
        if self.name == "taken":
            raise Invalid("is taken", "name")


class Doc(Section, frozen=True):
    items: tuple[Item, ...] = ()
    timeout: Annotated[float, Meta(gt=0, description="a number of seconds")] = 1.0
    enabled: bool = False
    labels: dict[str, str] = {}


def error(raw: Any, **kwargs: Any) -> str:
    with pytest.raises(ConfigError) as info:
        load_section(raw, Doc, **kwargs)
    return str(info.value)


def test_a_valid_document_converts_with_defaults_and_renamed_keys() -> None:
    doc = load_section({"items": [{"name": "a", "class": "x"}], "timeout": 3}, Doc, source="f.yaml")
    assert doc == Doc(items=(Item("a", 2, "x"),), timeout=3.0)
    assert load_section(None, Doc) == Doc()


@pytest.mark.parametrize(("raw", "message"), [
    ({"items": [{"name": "a"}, {"name": "b", "replicas": "3"}]},
     "f.yaml: key 'items[1].replicas': expected an integer, got str '3'"),
    ({"items": [{"name": "a", "replicas": 17}]},
     "f.yaml: key 'items[0].replicas': expected an integer from 2 to 16, got 17"),
    ({"items": [{"replicas": 3}]}, "f.yaml: key 'items[0].name': required: expected a string"),
    ({"items": [{"name": "taken"}]}, "f.yaml: key 'items[0].name': is taken"),
    ({"items": {"name": "a"}}, "f.yaml: key 'items': expected a list, got dict"),
    ({"timeout": 0}, "f.yaml: key 'timeout': expected a positive number of seconds, got 0"),
    ({"timeout": "soon"}, "f.yaml: key 'timeout': expected a number of seconds, got str 'soon'"),
    ({"enabled": "false"}, "f.yaml: key 'enabled': expected true or false, got str 'false' (quoted, so a string"),
    ({"labels": {"a": 1}}, "f.yaml: key 'labels"),
    ([1, 2], "f.yaml: expected a mapping, got list"),
])
def test_errors_name_the_file_the_full_key_path_and_the_expected_type(raw: Any, message: str) -> None:
    assert message in error(raw, source="f.yaml")


def test_a_section_without_a_file_is_named_by_its_root() -> None:
    assert error({"items": [{"name": "a", "replicas": 1}]}, root="vendor").startswith(
        "vendor.items[0].replicas: expected an integer from 2 to 16, got 1")


def test_unknown_keys_get_a_did_you_mean_at_their_full_path() -> None:
    assert error({"items": [{"name": "a", "replicass": 3}]}, source="f.yaml") == (
        "f.yaml: key 'items[0].replicass': unknown key (did you mean 'replicas'?)")
    assert "unknown key (known keys: items, timeout, enabled, labels)" in error({"zzz": 1}, source="f.yaml")


def test_an_environment_override_wins_and_its_errors_name_the_variable() -> None:
    env = {"T": "timeout", "ON": "enabled"}
    doc = load_section({"timeout": 1}, Doc, source="f.yaml", environ={"T": "2.5", "ON": "yes"}, env=env)
    assert (doc.timeout, doc.enabled) == (2.5, True)
    assert error({}, source="f.yaml", environ={"T": "-1"}, env=env) == (
        "environment T: key 'timeout': expected a positive number of seconds, got -1.0")
    assert error({}, environ={"ON": "maybe"}, env=env) == (
        "environment ON: key 'enabled': expected true or false, got str 'maybe'")
    assert load_section({}, Doc, environ={"ON": " "}, env=env).enabled is False, "empty: unset"


@pytest.mark.parametrize(("load", "raw", "message"), [
    (lambda raw: load_config(raw, environ={}), "plugn_dir: /x\n",
     "key 'plugn_dir': unknown key (did you mean 'plugin_dir'?)"),
    (lambda raw: SimulatedVendor(raw), {"devics_file": "x"},
     "vendor.devics_file: unknown key (did you mean 'devices_file'?)"),
    (lambda raw: nvidia_settings({"config": raw}, environ={}), {"flags": {"plugin": {"passDeviceSpec": True}}},
     "vendor.config: key 'flags.plugin.passDeviceSpec': unknown key (did you mean 'passDeviceSpecs'?)"),
    (lambda raw: nvidia_settings(raw, environ={}), {"poll_intervall": 3},
     "vendor.poll_intervall: unknown key (did you mean 'poll_interval'?)"),
    (kvm_config, {"pci_host_devices": [{"pci_vendor_selectr": "10de:1eb8"}]},
     "vendor.pci_host_devices[0].pci_vendor_selectr: unknown key (did you mean 'pci_vendor_selector'?)"),
    (sfc_config, {"onload": {"preloaded": True}}, "vendor.onload.preloaded: unknown key (did you mean 'preload'?)"),
    (lambda raw: cex_settings(raw, {}), {"pol_interval": 3},
     "vendor.pol_interval: unknown key (did you mean 'poll_interval'?)"),
])
def test_every_section_says_did_you_mean(tmp_path: Path, load: Any, raw: Any, message: str) -> None:
    if isinstance(raw, str):
        path = tmp_path / "dpkit.yaml"
        path.write_text(raw)
        raw, message = path, f"{path}: {message}"
    with pytest.raises(ConfigError) as info:
        load(raw)
    assert str(info.value) == message


@pytest.mark.parametrize(("load", "message"), [
    (lambda: nvidia_settings({"config": {"sharing": {"mps": {"resources": [{"name": "gpu", "replicas": 2000}]}}}},
                             environ={}),
     "vendor.config: key 'sharing.mps.resources[0].replicas': expected a number of replicas per GPU from 2 to 1024"),
    (lambda: kvm_config({"health_interval": 0.01}),
     "vendor.health_interval: expected a number of seconds from 0.05 to"),
    (lambda: sfc_config({"pools": [{"resource": "a.com/b", "interfaces": ["x"], "slots": 2000}]}),
     "vendor.pools[0].slots: expected a whole number of slots from 1 to 1024, got 2000"),
    (lambda: cex_settings({"overcommit": 101}, {}), "vendor.overcommit: expected an integer from 1 to 100, got 101"),
    (lambda: load_config(None, environ={"DPKIT_VENDOR_CALL_TIMEOUT": "1e9"}),
     "environment DPKIT_VENDOR_CALL_TIMEOUT: key 'vendor_call_timeout': expected a positive number of seconds up to"),
])
def test_ranges_are_declared_and_named(load: Any, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load()
    assert str(info.value).startswith(message)


RUNNER = """
import atexit, json, sys
atexit.register(lambda: print(json.dumps(sorted(sys.modules)), file=sys.stderr))
from dpkit.core.tools.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("args", [("--help",), ("vendors",), ("status", "--state-dir", "{tmp}", "--timeout", "0.1")])
def test_cheap_commands_do_not_load_the_config_library(tmp_path: Path, args: tuple[str, ...]) -> None:
    argv = [a.format(tmp=tmp_path) for a in args]
    result = subprocess.run([sys.executable, "-c", RUNNER, *argv], capture_output=True, text=True, timeout=60)
    modules = json.loads(result.stderr.strip().splitlines()[-1])
    assert not [m for m in modules if m == "msgspec" or m.startswith("msgspec.")]


class Flags(Section, frozen=True):
    strategy: str = "none"
    other: str = ""


class WithFlags(Section, frozen=True):
    flags: Flags = Flags()


def test_a_variable_never_hides_a_broken_part_of_the_file() -> None:
    """Setting flags.strategy from the environment must not turn a list under `flags` into {}."""
    env = {"STRATEGY": "flags.strategy"}
    with pytest.raises(ConfigError, match=r"f\.yaml: key 'flags'"):
        load_section({"flags": ["strategy: mixed"]}, WithFlags, source="f.yaml", environ={"STRATEGY": "x"}, env=env)
    kept = load_section({"flags": {"other": "y"}}, WithFlags, source="f.yaml", environ={"STRATEGY": "x"}, env=env)
    assert kept.flags == Flags("x", "y")
