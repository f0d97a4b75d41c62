"""Issue 12 for cex: a malformed or huge cex_resources.json never costs health, config or a clean start.

A file written while the plugin runs is a *change*: if it cannot be used (nested too deep for the
JSON parser, a number past Go's int, plain garbage) the change is rejected, the last good version
keeps serving and APQN health keeps its pace. At start the same file is a one-line error. The
overlap check is linear, and the file is parsed on a thread of its own, off the health path.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from cex.aptree import STANDARD_SETS, ApTree, write_sets
from dpkit.cex import cryptoconfig
from dpkit.cex.cryptoconfig import ApqnDef, ConfigSet, parse_crypto_config
from dpkit.cex.vendor import CexVendor
from dpkit.core.engine.manager import Manager
from dpkit.core.tools.cli import main
from dpkit.core.tools.kubelet import Kubelet
from dpkit.core.vendorapi.errors import ConfigError

CCA, EP11 = "cex.s390.ibm.com/cca-blue", "cex.s390.ibm.com/ep11-red"
NESTED = "[" * 200_000 + "]" * 200_000            # RecursionError in Python's json parser
HUGE_INT = '{"cryptoconfigsets": [{"setname": "s", "project": "p", "overcommit": ' + "9" * 5000 + "}]}"
BAD_FILES = [NESTED, HUGE_INT, '{"cryptoconfigsets": [' + '{"a": ' * 50_000 + "1" + "}" * 50_000 + "]}"]


def _until(predicate: Callable[[], object], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return bool(predicate())


def _health(kubelet: Kubelet, resource: str, *ids: str) -> set[str]:
    devices = kubelet.devices(resource)
    return {devices[i].health for i in ids if i in devices}


@pytest.fixture
def start(make_vendor: Callable[..., CexVendor], run_manager: Callable[..., Manager], kubelet: Kubelet,
          short_tmp: Path) -> Callable[..., CexVendor]:
    def run(**overrides: Any) -> CexVendor:
        settings = {"pod_resources_socket": str(short_tmp / "pr" / "kubelet.sock"), **overrides}
        vendor = make_vendor(**settings)
        run_manager(vendor)
        assert kubelet.wait_for(lambda k: k.allocatable(CCA) == 6 and k.allocatable(EP11) == 1)
        return vendor

    return run


@pytest.mark.parametrize("text", BAD_FILES, ids=["nested-array", "5000-digit-int", "nested-object"])
def test_a_malformed_file_is_a_config_error_not_a_crash(text: str) -> None:
    with pytest.raises(ConfigError, match=r"cex_resources.json: .*(nested too deeply|out of range)"):
        parse_crypto_config(text, "cex_resources.json")


def test_an_oversized_file_is_refused_before_parsing(tmp_path: Path) -> None:
    path = tmp_path / "cex_resources.json"
    path.write_text('{"cryptoconfigsets": []}' + " " * cryptoconfig.MAX_FILE_BYTES)
    with pytest.raises(ConfigError, match="at most"):
        cryptoconfig.read_crypto_config(path)


def test_at_start_a_malformed_file_is_a_one_line_error(tmp_path: Path, vendor_config: dict[str, Any],
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    Path(vendor_config["config_file"]).write_text(NESTED)
    with pytest.raises(ConfigError, match="nested too deeply"):
        CexVendor(vendor_config, environ={})
    config = tmp_path / "dpkit.yaml"
    config.write_text(json.dumps({"vendor": vendor_config}))  # JSON is YAML
    assert main(["discover", "cex", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dpkit: error: ") and "nested too deeply" in err
    assert "Traceback" not in err and len(err.splitlines()) == 1


def test_a_malformed_file_written_while_running_is_a_rejected_change(
        start: Callable[..., CexVendor], kubelet: Kubelet, tree: ApTree, config_file: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    vendor = start(poll_interval=1.0, config_check_interval=0.1)
    for text, why in ((NESTED, "nested too deeply"), (HUGE_INT, "out of range")):
        config_file.write_text(text)
        assert _until(lambda why=why: why in vendor.config_error, timeout=10), vendor.config_error
    rejected = [r for r in caplog.records if "change rejected" in r.getMessage()]
    assert len(rejected) == 2                                       # once per bad version, not per check
    assert not [r for r in caplog.records if "watch failed" in r.getMessage()]   # the watch loop never died
    assert kubelet.allocatable(CCA) == 6 and kubelet.allocatable(EP11) == 1      # the last good version serves
    # APQN health keeps its 1 s pace (generous bound: 5 s per change, on a loaded 2-core machine)
    for value, want in (("0", {"Unhealthy"}), ("1", {"Healthy"}), ("0", {"Unhealthy"})):
        tree.set("01.0005", "online", value)
        assert _until(lambda want=want: _health(kubelet, CCA, "apqn-1-5-0", "apqn-1-5-1") == want, timeout=5)
    sets = json.loads(json.dumps(STANDARD_SETS))
    sets[0]["overcommit"] = 1
    write_sets(config_file, sets)                                    # a good version again is taken up
    assert kubelet.wait_for(lambda k: len(k.devices(CCA)) == 3, timeout=10) and vendor.config_error == ""


def test_parsing_the_file_never_holds_up_health(
        start: Callable[..., CexVendor], kubelet: Kubelet, tree: ApTree, config_file: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    start(poll_interval=0.2, config_check_interval=0.1)
    entered, release = threading.Event(), threading.Event()
    real = cryptoconfig.read_crypto_config

    def stuck(*args: Any, **kwargs: Any) -> Any:  # a parse that takes as long as the test likes
        entered.set()
        release.wait(30)
        return real(*args, **kwargs)

    monkeypatch.setattr("dpkit.cex.vendor.read_crypto_config", stuck)
    try:
        sets = json.loads(json.dumps(STANDARD_SETS))
        sets[0]["overcommit"] = 1
        write_sets(config_file, sets)
        assert entered.wait(10)                                       # a parse is under way, and stuck
        tree.set("01.0005", "online", "0")
        assert kubelet.wait_for(lambda k: _health(k, CCA, "apqn-1-5-0", "apqn-1-5-1") == {"Unhealthy"}, timeout=5)
    finally:
        release.set()
    assert kubelet.wait_for(lambda k: len(k.devices(CCA)) == 3, timeout=10)  # then the new version is used


class _CountingId(str):
    """A machine id that counts how often it is compared: the overlap check's work, without a clock."""

    compared = 0

    def __eq__(self, other: object) -> bool:
        _CountingId.compared += 1
        return str.__eq__(self, other)

    __hash__ = str.__hash__


def test_the_overlap_check_is_linear() -> None:
    n = 3000
    apqns = tuple(ApqnDef(1, 5, _CountingId(f"IBM-8561-{i:016d}")) for i in range(n))
    sets = (ConfigSet("a", "p", "", None, 1, True, apqns[: n // 2]),
            ConfigSet("b", "p", "", None, 1, True, apqns[n // 2:]))
    _CountingId.compared = 0
    cryptoconfig._check_overlaps(sets, "f")
    assert _CountingId.compared <= n           # pairwise comparison would be n*(n-1)/2 = 4.5 million
    clash = (ConfigSet("c", "p", "", None, 1, True, (ApqnDef(1, 5, "IBM-8561-0000000000000007"),)),)
    with pytest.raises(ConfigError, match=r"APQN \(1,5\) appears in sets 'a' and 'c'"):
        cryptoconfig._check_overlaps(sets + clash, "f")


def test_forty_thousand_pinned_entries_of_one_apqn_parse_in_well_under_a_second_each_way() -> None:
    sets: list[dict[str, Any]] = [{"setname": f"s{j}", "project": "p",
             "apqns": [{"adapter": 1, "domain": 5, "machineid": f"IBM-8561-{j}{i:015d}"} for i in range(20_000)]}
            for j in range(2)]
    text = json.dumps({"cryptoconfigsets": sets})
    started = time.monotonic()
    config = parse_crypto_config(text, "f")
    assert time.monotonic() - started < 8.0    # generous: today's main takes ~28 s, this ~0.2 s
    assert sum(len(s.apqns) for s in config.sets) == 40_000
    sets[1]["apqns"].append({"adapter": 1, "domain": 5, "machineid": "IBM-8561-0000000000000000003"})
    sets[1]["apqns"].append({"adapter": 1, "domain": 5})       # unpinned: clashes with every pinned use
    with pytest.raises(ConfigError, match="sets must not overlap"):
        parse_crypto_config(json.dumps({"cryptoconfigsets": sets}), "f")
