"""The vendor without a kubelet: snapshots, findings, container specs, metrics, labels, doctor."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from cex.aptree import STANDARD_SETS, ApTree, FakeZcryptKernel, mask, write_sets
from dpkit.cex.shadow import ShadowError
from dpkit.cex.vendor import CexError, CexVendor
from dpkit.core.tools.discovery import explain
from dpkit.core.tools.doctor import vendor_checks
from dpkit.core.tools.registry import load_vendor_class
from dpkit.core.vendorapi.device import Device, Health
from dpkit.core.vendorapi.errors import ConfigError

CCA, EP11, GREEN = "cex.s390.ibm.com/cca-blue", "cex.s390.ibm.com/ep11-red", "cex.s390.ibm.com/any-green"


def _ids(vendor: CexVendor, resource: str) -> list[str]:
    return [d.id for d in vendor.discover()[resource]]


def _devices(vendor: CexVendor, resource: str, *ids: str) -> list[Device]:
    by_id = {d.id: d for d in vendor.discover()[resource]}
    return [by_id[i] for i in ids]


def test_the_entry_point_loads_this_vendor() -> None:
    assert load_vendor_class("cex") is CexVendor


def test_each_set_is_a_resource_and_each_apqn_is_advertised_overcommit_times(
        make_vendor: Callable[..., CexVendor]) -> None:
    vendor = make_vendor()
    snapshot = vendor.discover()
    assert sorted(snapshot) == [GREEN, CCA, EP11]
    assert _ids(vendor, CCA) == ["apqn-1-5-0", "apqn-1-5-1", "apqn-2-5-0", "apqn-2-5-1", "apqn-1-6-0", "apqn-1-6-1"]
    assert _ids(vendor, EP11) == ["apqn-3-5-0"]
    assert snapshot[GREEN] == ()                       # registered, advertises zero
    first = snapshot[CCA][0]
    assert first.healthy and dict(first.attributes) == {
        "apqn": "01.0005", "adapter": "1", "domain": "5", "type": "CEX7C", "mode": "cca",
        "generation": "cex7", "set": "cca-blue", "project": "blue"}


def test_the_cluster_overcommit_fills_sets_without_one(make_vendor: Callable[..., CexVendor]) -> None:
    vendor = make_vendor(environ={"APQN_OVERCOMMIT_LIMIT": "3"})
    assert _ids(vendor, EP11) == ["apqn-3-5-0", "apqn-3-5-1", "apqn-3-5-2"]
    assert len(_ids(vendor, CCA)) == 6                 # the set's own overcommit (2) wins


def test_held_back_apqns_are_logged_once_and_explained(make_vendor: Callable[..., CexVendor],
                                                       caplog: pytest.LogCaptureFixture) -> None:
    vendor = make_vendor()
    with caplog.at_level(logging.INFO, logger="dpkit.cex"):
        vendor.discover()
        vendor.discover()
    held = [r for r in caplog.records if r.getMessage() == "APQN not advertised"]
    reasons = {r.fields["apqn"]: r.fields["reason"] for r in held}  # type: ignore[attr-defined]
    assert len(held) == 4 == len(reasons)                          # once each, not once per scan
    assert reasons["APQN 05.0005"] == "adapter card05 is cex5; set cca-blue needs cex6 or newer"
    assert reasons["APQN 04.0005"] == "adapter card04 (CEX6A) is in accel mode; set ep11-red needs ep11"
    assert "not a usage domain" in reasons["APQN 06.0007"]
    assert reasons["APQN 09.0005"] == "not on this node's AP bus"
    report = explain(vendor)                                       # what `dpkit discover cex` prints
    shown = {(f["subject"], f["resource"]): f for f in report["findings"]}
    assert not shown[("APQN 04.0005", EP11)]["advertised"]
    assert shown[("APQN 01.0005", CCA)]["reason"] == "advertised 2x (healthy)"
    assert "not part of any crypto config set" in shown[("APQN 02.0006", "")]["reason"]
    assert report["errors"] == []


@pytest.mark.parametrize(("where", "attr", "value", "reason"), [
    ("01.0005", "online", "0", "APQN 01.0005 is offline"),
    ("01.0005", "config", "0", "APQN 01.0005 is configured off (config=0)"),
    ("01.0005", "chkstop", "1", "APQN 01.0005 is checkstopped"),
    ("card01", "online", "0", "adapter card01 is offline"),
])
def test_an_unusable_apqn_is_unhealthy_with_its_reason_and_recovers(
        tree: ApTree, make_vendor: Callable[..., CexVendor], where: str, attr: str, value: str, reason: str) -> None:
    vendor = make_vendor()
    healthy = "0" if attr == "chkstop" else "1"
    tree.set(where, attr, value)
    sick = {d.id: d for d in vendor.discover()[CCA]}
    assert sick["apqn-1-5-0"].health is Health.UNHEALTHY and sick["apqn-1-5-1"].reason == reason
    assert sick["apqn-2-5-0"].healthy
    assert all(d.healthy for d in vendor.discover()[CCA] if d.id.startswith("apqn-1-6")) == (where != "card01")
    tree.set(where, attr, healthy)
    assert all(d.healthy for d in vendor.discover()[CCA])


def test_garbage_and_hot_unplug_never_break_discovery(tree: ApTree, make_vendor: Callable[..., CexVendor]) -> None:
    vendor = make_vendor()
    tree.set("card01", "type", "\x00garbage\xff" * 20)
    tree.set("card01", "ap_functions", "not hex")
    tree.set("02.0005", "online", "maybe")
    tree.remove("03.0005")
    snapshot = vendor.discover()
    assert _ids(vendor, CCA) == ["apqn-2-5-0", "apqn-2-5-1"]      # card01 can no longer be identified
    assert not snapshot[CCA][0].healthy and "holds 'maybe'" in snapshot[CCA][0].reason
    assert snapshot[EP11] == ()
    reasons = {f.subject: f.reason for f in vendor.explain() if f.resource == CCA}
    assert "unrecognised type" in reasons["APQN 01.0005"]


def test_a_missing_or_bad_config_file_is_a_config_error(make_vendor: Callable[..., CexVendor], tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"vendor.config_file: cannot read"):
        make_vendor(config_file=str(tmp_path / "absent.json"))
    (tmp_path / "bad.json").write_text('{"cryptoconfigsets": [{"setname": "x"}]}')
    with pytest.raises(ConfigError, match=r"cryptoconfigsets\[0\].project': required: expected a non-empty string"):
        make_vendor(config_file=str(tmp_path / "bad.json"))


def test_config_changes_are_picked_up_and_bad_ones_rejected(make_vendor: Callable[..., CexVendor],
                                                            config_file: Path) -> None:
    vendor = make_vendor()
    assert not vendor.reload_config()                                  # unchanged
    new = {"setname": "new", "project": "p", "apqns": [{"adapter": 2, "domain": 6}]}
    write_sets(config_file, [*STANDARD_SETS[:2], new])
    assert vendor.reload_config()
    assert sorted(vendor.discover()) == [CCA, EP11, "cex.s390.ibm.com/new"]
    dup = {"setname": "dup", "project": "p", "apqns": [{"adapter": 1, "domain": 5}]}
    write_sets(config_file, [*STANDARD_SETS[:2], new, dup])
    assert not vendor.reload_config() and not vendor.reload_config()   # rejected once, not re-read each time
    assert "appears in sets 'cca-blue' and 'dup'" in vendor.config_error
    assert sorted(vendor.discover()) == [CCA, EP11, "cex.s390.ibm.com/new"]
    assert any("newest version rejected" in f.reason for f in vendor.explain())
    write_sets(config_file, [*STANDARD_SETS[:2], new])                 # back to the version in use
    assert not vendor.reload_config() and vendor.config_error == ""
    config_file.unlink()                                               # a ConfigMap mid-update
    assert not vendor.reload_config() and "cannot read" in vendor.config_error
    write_sets(config_file, STANDARD_SETS)
    assert vendor.reload_config() and vendor.config_error == ""


def test_machine_pinned_apqns_follow_sysinfo(make_vendor: Callable[..., CexVendor], config_file: Path,
                                             tmp_path: Path) -> None:
    (tmp_path / "sysinfo").write_text("Manufacturer: IBM\nType: 3931\nSequence Code: 00000000000A1B2C\n")
    write_sets(config_file, [{"setname": "pinned", "project": "p", "apqns": [
        {"adapter": 1, "domain": 5, "machineid": "IBM-3931-00000000000A1B2C"},
        {"adapter": 2, "domain": 5, "machineid": "IBM-3931-0000000000099999"}]}])
    vendor = make_vendor()
    assert _ids(vendor, "cex.s390.ibm.com/pinned") == ["apqn-1-5-0"]
    reasons = {f.subject: f.reason for f in vendor.explain()}
    assert reasons["APQN 02.0005"] == "pinned to machine IBM-3931-0000000000099999; this is IBM-3931-00000000000A1B2C"


def test_container_spec_describes_an_isolated_node_that_pre_start_makes(
        tree: ApTree, kernel: FakeZcryptKernel, make_vendor: Callable[..., CexVendor], tmp_path: Path) -> None:
    vendor = make_vendor()
    devices = _devices(vendor, CCA, "apqn-2-5-1", "apqn-1-5-0")
    spec = vendor.container_spec(CCA, devices)
    node = spec.devices[0]
    assert (node.host_path, node.container_path, node.permissions) == (
        str(tmp_path / "dev" / "zcrypt-apqn-1-5-0"), "/dev/z90crypt", "rw")
    assert dict(spec.env) == {"CEX_APQNS": "01.0005,02.0005", "CEX_MODE": "cca", "CEX_CONFIGSET": "cca-blue"}
    shadow_root = tmp_path / "shadow" / "sysfs-apqn-1-5-0"
    assert [(m.host_path, m.container_path, m.read_only) for m in spec.mounts] == [
        (str(shadow_root / "bus" / "ap"), "/sys/bus/ap", True),
        (str(shadow_root / "devices" / "ap"), "/sys/devices/ap", True),
        (str(tree.devices / "card01" / "01.0005"), "/sys/bus/ap/devices/01.0005", True),
        (str(tree.devices / "card02" / "02.0005"), "/sys/bus/ap/devices/02.0005", True),
    ]
    assert kernel.created == [] and not shadow_root.exists()          # a description only
    vendor.pre_start(CCA, devices)
    assert kernel.created == ["zcrypt-apqn-1-5-0"] and Path(node.host_path).exists()
    assert (kernel.node("zcrypt-apqn-1-5-0") / "apmask").read_text() == mask({1, 2}) + "\n"
    assert (kernel.node("zcrypt-apqn-1-5-0") / "aqmask").read_text() == mask({5}) + "\n"
    assert all(Path(m.host_path).is_dir() for m in spec.mounts)
    vendor.pre_start(CCA, devices)                                     # a restart: same node, no new one
    assert kernel.created == ["zcrypt-apqn-1-5-0"]


def test_a_reused_key_gets_a_node_and_tree_for_its_new_apqns(
        kernel: FakeZcryptKernel, make_vendor: Callable[..., CexVendor], tmp_path: Path) -> None:
    vendor = make_vendor()
    node = kernel.node("zcrypt-apqn-1-5-0")
    cards = tmp_path / "shadow" / "sysfs-apqn-1-5-0" / "devices" / "ap"
    vendor.pre_start(CCA, _devices(vendor, CCA, "apqn-1-5-0"))
    assert sorted(os.listdir(cards)) == ["card01"]
    assert (node / "apmask").read_text() == mask({1}) + "\n"
    # that container ends; within the grace period its device ID goes to one with two APQNs
    two = _devices(vendor, CCA, "apqn-1-5-0", "apqn-2-5-0")
    spec = vendor.container_spec(CCA, two)
    vendor.pre_start(CCA, two)
    assert kernel.created == ["zcrypt-apqn-1-5-0"]                      # the node is reused ...
    assert (node / "apmask").read_text() == mask({1, 2}) + "\n"        # ... restricted anew
    assert (node / "aqmask").read_text() == mask({5}) + "\n"
    assert sorted(os.listdir(cards)) == ["card01", "card02"]            # and the tree rebuilt
    assert all(Path(m.host_path).is_dir() for m in spec.mounts)
    assert all((tmp_path / "shadow" / "sysfs-apqn-1-5-0" / m.container_path.removeprefix("/sys/")).is_dir()
               for m in spec.mounts if m.container_path.startswith("/sys/bus/ap/devices/"))  # live mount targets
    # and back to a single APQN of another domain: nothing of the last container shows
    vendor.pre_start(CCA, _devices(vendor, CCA, "apqn-1-5-0"))
    assert sorted(os.listdir(cards)) == ["card01"] and (node / "apmask").read_text() == mask({1}) + "\n"
    vendor.pre_start(CCA, _devices(vendor, CCA, "apqn-1-5-0", "apqn-1-6-0"))
    assert (node / "aqmask").read_text() == mask({5, 6}) + "\n"
    assert sorted(os.listdir(cards / "card01")).count("01.0006") == 1


def test_a_restart_keeps_the_tree_and_a_new_node_gets_a_fresh_one(
        kernel: FakeZcryptKernel, make_vendor: Callable[..., CexVendor], tmp_path: Path) -> None:
    vendor = make_vendor()
    devices = _devices(vendor, CCA, "apqn-1-5-0")
    root = tmp_path / "shadow" / "sysfs-apqn-1-5-0"
    vendor.pre_start(CCA, devices)
    first = root.stat().st_ino
    vendor.pre_start(CCA, devices)                                       # same container restarting
    assert root.stat().st_ino == first
    assert vendor.zcrypt.destroy("zcrypt-apqn-1-5-0")                    # a node reboot took the node
    vendor.pre_start(CCA, devices)
    assert root.stat().st_ino != first and kernel.created == ["zcrypt-apqn-1-5-0"] * 2


def test_doctor_and_cdi_style_calls_make_no_nodes(kernel: FakeZcryptKernel, make_vendor: Callable[..., CexVendor],
                                                 tmp_path: Path) -> None:
    vendor = make_vendor()
    checks = {c.name: c for c in vendor_checks(vendor)}                # asks container_spec for every device
    assert "container specs valid" not in checks                       # every spec could be made
    assert kernel.created == [] and not (tmp_path / "shadow").exists()


def test_live_and_shadow_sysfs_can_be_switched_off(
        kernel: FakeZcryptKernel, make_vendor: Callable[..., CexVendor], config_file: Path) -> None:
    sets = json.loads(json.dumps(STANDARD_SETS))
    sets[1]["livesysfs"] = 0
    write_sets(config_file, sets)
    vendor = make_vendor()
    spec = vendor.container_spec(EP11, _devices(vendor, EP11, "apqn-3-5-0"))
    assert [m.container_path for m in spec.mounts] == ["/sys/bus/ap", "/sys/devices/ap"]
    plain = make_vendor(shadow_sysfs=False)
    spec = plain.container_spec(EP11, _devices(plain, EP11, "apqn-3-5-0"))
    assert spec.mounts == () and spec.env["CEX_MODE"] == "ep11"
    plain.pre_start(EP11, _devices(plain, EP11, "apqn-3-5-0"))
    assert kernel.created == ["zcrypt-apqn-3-5-0"] and not (Path(plain.settings.shadow_dir)).exists()


def test_apqns_that_would_open_others_are_refused(kernel: FakeZcryptKernel,
                                                  make_vendor: Callable[..., CexVendor]) -> None:
    vendor = make_vendor()
    devices = _devices(vendor, CCA, "apqn-2-5-0", "apqn-1-6-0")
    for call in (vendor.container_spec, vendor.pre_start):
        with pytest.raises(CexError, match=r"01\.0006, 02\.0005 cannot share one zcrypt node: it would also open "
                                           r"01\.0005, 02\.0006"):
            call(CCA, devices)
    assert kernel.created == []
    with pytest.raises(CexError, match="not a cex APQN device"):
        vendor.container_spec(CCA, [Device("gpu-0")])
    with pytest.raises(CexError, match="no longer a crypto config set"):
        vendor.container_spec("cex.s390.ibm.com/gone", devices)


def test_an_apqn_gone_before_allocate_is_refused_cleanly(
        tree: ApTree, kernel: FakeZcryptKernel, make_vendor: Callable[..., CexVendor]) -> None:
    vendor = make_vendor()
    devices = _devices(vendor, EP11, "apqn-3-5-0")
    tree.remove("03.0005")
    for call in (vendor.container_spec, vendor.pre_start):
        with pytest.raises(CexError, match=r"03\.0005 vanished"):
            call(EP11, devices)
    assert kernel.created == []


def test_a_failed_shadow_build_destroys_the_new_node(
        kernel: FakeZcryptKernel, make_vendor: Callable[..., CexVendor], tmp_path: Path) -> None:
    (tmp_path / "blocker").write_text("")
    vendor = make_vendor(shadow_dir=str(tmp_path / "blocker" / "shadow"))
    with pytest.raises(ShadowError, match="cannot create a shadow sysfs"):
        vendor.pre_start(EP11, _devices(vendor, EP11, "apqn-3-5-0"))
    assert kernel.created == kernel.destroyed == ["zcrypt-apqn-3-5-0"]


def test_preferred_allocation_spreads_and_keeps_one_domain(make_vendor: Callable[..., CexVendor]) -> None:
    vendor = make_vendor()
    pool = vendor.discover()[CCA]
    free = [d for d in pool if d.id != "apqn-1-5-0"]         # one slot of 01.0005 already taken
    assert vendor.preferred_allocation(CCA, free, [], 1) == ["apqn-1-6-0"]
    two = vendor.preferred_allocation(CCA, free, [], 2)
    assert two is not None and {i.rsplit("-", 1)[0] for i in two} == {"apqn-1-5", "apqn-2-5"}
    must = [d for d in pool if d.id == "apqn-1-6-0"]
    assert vendor.preferred_allocation(CCA, free, must, 2) is None    # no other adapter has domain 6 here
    assert vendor.preferred_allocation(CCA, free, must, 1) is None    # already satisfied: the core decides


def test_metrics_are_per_apqn_request_counters(tree: ApTree, make_vendor: Callable[..., CexVendor]) -> None:
    tree.set("01.0005", "request_count", "4711")
    tree.set("01.0006", "online", "0")
    samples = make_vendor().metric_samples()
    requests = {s.labels["apqn"]: s for s in samples if s.name == "dpkit_cex_apqn_requests_total"}
    assert requests["01.0005"].value == 4711 and requests["01.0005"].kind == "counter"
    assert dict(requests["01.0005"].labels) == {"apqn": "01.0005", "adapter": "1", "domain": "5", "set": "cca-blue"}
    assert requests["02.0006"].labels["set"] == ""
    usable = {s.labels["apqn"]: s.value for s in samples if s.name == "dpkit_cex_apqn_usable"}
    assert usable["01.0006"] == 0.0 and usable["01.0005"] == 1.0 and len(usable) == 8


def test_node_labels_describe_the_adapters(tree: ApTree, make_vendor: Callable[..., CexVendor]) -> None:
    tree.set("card03", "chkstop", "1")
    vendor = make_vendor()
    assert vendor.node_labels(vendor.discover()) == {
        "cex.s390.ibm.com/adapters": "5", "cex.s390.ibm.com/cca": "true", "cex.s390.ibm.com/ep11": "false",
        "cex.s390.ibm.com/accel": "true", "cex.s390.ibm.com/generation": "cex7"}


def test_doctor_says_what_is_missing(make_vendor: Callable[..., CexVendor], tree: ApTree, tmp_path: Path) -> None:
    (tmp_path / "dev").mkdir()
    (tmp_path / "shadow").mkdir()
    checks = {c.name: c for c in make_vendor().doctor()}
    assert all(checks[n].ok for n in ("AP bus present", "crypto config valid", "zcrypt node creation",
                                      "usage domains known", "device directory", "APQNs advertised",
                                      "shadow sysfs directory"))
    pod_resources = checks["pod-resources API"]
    assert not pod_resources.ok and "mount /var/lib/kubelet/pod-resources" in pod_resources.hint
    (tree.zcrypt_class / "create").unlink()
    checks = {c.name: c for c in make_vendor(sysfs_root=str(tmp_path / "nothing")).doctor()}
    assert not checks["AP bus present"].ok and not checks["zcrypt node creation"].ok
    assert not checks["APQNs advertised"].ok and "dpkit discover cex" in checks["APQNs advertised"].hint
