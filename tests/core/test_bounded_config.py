"""Config and devices files are read with bounds: alias bombs, huge, deep or numeric-overflow files are clean errors."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from dpkit.core.engine.manager import Manager
from dpkit.core.support.config import MAX_DEPTH, MAX_FILE_BYTES, Config, load_config, parse_yaml
from dpkit.core.tools.sim import SimulatedVendor
from dpkit.core.vendorapi.errors import ConfigError

pytestmark = pytest.mark.timeout(60)


def bomb(levels: int, key: str = "plugin_dir") -> str:
    """The "billion laughs": each anchor is a list of ten aliases of the one before (10**levels strings)."""
    items = ["&a0 lol"] + [f"&a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, levels + 1)]
    return f"{key}: [{', '.join(items)}]\n"


HOSTILE = {
    "alias bomb": (bomb(6), "once aliases are expanded"),
    "deep nesting": ("plugin_dir: " + "[" * 500 + "]" * 500 + "\n", f"nested deeper than {MAX_DEPTH} levels"),
    "deeper nesting": ("plugin_dir: " + "[" * 5000 + "]" * 5000 + "\n", "nesting depth"),  # libyaml's own bound
    "deep block nesting": ("".join(f"{' ' * i}k{i}:\n" for i in range(300)), f"nested deeper than {MAX_DEPTH} levels"),
    "huge integer": ("probe_heartbeat_timeout: " + "7" * 5000 + "\n", "cannot read a value"),
    "oversized": ("#" + "x" * MAX_FILE_BYTES + "\n", "larger than 1024 KiB"),
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_config_is_a_short_config_error_naming_the_file(tmp_path: Path, name: str) -> None:
    text, message = HOSTILE[name]
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(path, environ={})
    assert str(err.value).startswith(f"{path}: ")
    assert message in str(err.value)
    assert len(str(err.value)) < 1000


def test_a_billion_laughs_is_refused_before_anything_is_built() -> None:
    started = time.monotonic()
    with pytest.raises(ConfigError, match="more than 250000 values once aliases are expanded at line 1"):
        parse_yaml(bomb(9), "bomb.yaml")
    assert time.monotonic() - started < 1.0
    assert len(bomb(9)) < 700


def test_a_few_aliases_are_fine() -> None:
    text = "defaults: &d {numa: 0, model: x}\nlist: [*d, *d, {<<: *d, numa: 1}]\n"
    assert parse_yaml(text, "f")["list"][2] == {"numa": 1, "model": "x"}


def test_sim_devices_file_has_the_same_bounds(tmp_path: Path) -> None:
    devices = tmp_path / "devices.yaml"
    devices.write_text("resources:\n  example.com/w: " + bomb(6, "x").split(": ", 1)[1])
    with pytest.raises(ConfigError, match=f"{devices}: more than 250000 values"):
        SimulatedVendor({"devices_file": str(devices)})


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_dpkit_run_prints_one_error_line_and_exits_2(tmp_path: Path, name: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(HOSTILE[name][0])
    proc = subprocess.run([sys.executable, "-m", "dpkit.core.tools.cli", "run", "sim", "-c", str(path)],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.startswith(f"dpkit: error: {path}: ")
    assert "Traceback" not in proc.stderr and len(proc.stderr) < 1000


def test_sighup_reload_of_an_alias_bomb_is_rejected_and_kept_short(
        short_tmp: Path, make_config: Callable[..., Config], run_manager: Callable[..., Manager]) -> None:
    base = make_config()
    path = short_tmp / "config.yaml"
    path.write_text(yaml.safe_dump({k: getattr(base, k) for k in (
        "plugin_dir", "state_dir", "cdi_dir", "nfd_features_dir", "pod_resources_socket")}))
    manager = run_manager(SimulatedVendor({"script": False}), load_config(path, environ={}))
    path.write_text(bomb(6))
    manager.request_reload()
    deadline = time.monotonic() + 10
    while not any("reload rejected" in e["msg"] for e in manager.status()["errors"]):
        assert time.monotonic() < deadline, "the reload was not rejected"
        time.sleep(0.02)
    assert "once aliases are expanded" in json.dumps(manager.status()["errors"])
    assert len(json.dumps(manager.status(), default=str)) < 50_000, "kept errors stay small"


# -- plain documents are built from the parser's events (issue 13: the loader's node tree is the peak) --
PLAIN_DOCUMENTS = [
    "",
    "---\n",
    "a: 1\nb: 0o17\nc: 0x1f\nd: 1_000\ne: -3\nf: 017\n",
    "f: 1.5\ng: .inf\nh: -.Inf\ni: 6.02e+23\nj: 1_000.5\n",
    "t: yes\nu: No\nv: on\nw: OFF\nx: true\ny: ~\nz: null\n? \n: empty key\n",
    "when: 2026-11-30\nat: 2026-11-30T12:30:00Z\nlocal: 2026-11-30 12:30:00.5\n",
    "s: '1'\nd: \"yes\"\nfold: >\n  one\n  two\nlit: |\n  keep\n   this\n",
    "flow: {a: [1, 2, {b: c}], 'q': []}\nlist: [x, 'y', \"z\", 3.0]\n",
    "resources:\n  example.com/gpu:\n  - id: gpu-0\n    numa: 0\n  - id: gpu-1\n    numa: 1\n",
    "dup: 1\ndup: 2\n\u00fcnicode: \u2713\n'1': one\n1: int one\n",
    "- a\n- - b\n  - c\n- {}\n- []\n",
    "plain scalar at the top\n",
]
NOT_PLAIN_DOCUMENTS = [
    "base: &b {x: 1}\nuse: *b\n",
    "base: &b {x: 1, y: 2}\nmerged:\n  <<: *b\n  y: 3\n",
    "tagged: !!str 123\n",
    "set: !!set {a, b}\n",
    "blob: !!binary aGVsbG8=\n",
    "? [a, b]\n: list key\n",
    "one: 1\n---\ntwo: 2\n",
]


def _same(a: object, b: object) -> bool:
    return repr(a) == repr(b) and type(a) is type(b)  # repr: nan, and 1 vs True vs 1.0 as keys


@pytest.mark.parametrize("text", PLAIN_DOCUMENTS)
def test_plain_documents_are_built_from_events_exactly_as_the_loader_builds_them(text: str) -> None:
    from dpkit.core.support import config

    built = config._read_document(text, "x.yaml")  # raises _NotPlain if it left it to the loader
    assert _same(built, yaml.load(text, Loader=config._LOADER))
    assert _same(parse_yaml(text, "x.yaml"), built)


@pytest.mark.parametrize("text", NOT_PLAIN_DOCUMENTS)
def test_anything_else_is_left_to_the_loader(text: str) -> None:
    from dpkit.core.support import config

    with pytest.raises(config._NotPlain):
        config._read_document(text, "x.yaml")
    try:
        expected: object = yaml.load(text, Loader=config._LOADER)
    except yaml.YAMLError as exc:
        with pytest.raises(ConfigError, match="not valid YAML"):
            parse_yaml(text, "x.yaml")
        assert exc is not None
        return
    assert _same(parse_yaml(text, "x.yaml"), expected)


def test_a_thousand_device_file_is_read_without_the_loaders_node_tree() -> None:
    """The loader's node tree for 1,000 devices peaks at about five times the data (2.3 MB): a
    serving process keeps what a peak touched. Built from events, the peak is the data itself."""
    import tracemalloc

    text = "resources:\n  example.com/dev:\n" + "".join(f"  - id: dev-{i:06d}\n    numa: {i % 2}\n"
                                                        for i in range(1000))
    parse_yaml(text, "warm.yaml")  # imports and caches out of the figure
    tracemalloc.start()
    try:
        data = parse_yaml(text, "devices.yaml")
        kept, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(data["resources"]["example.com/dev"]) == 1000
    assert peak < 2 * kept + 100_000, f"peak {peak} bytes for {kept} bytes of data"
