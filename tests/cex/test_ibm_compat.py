"""IBM's k8s-cex-dev-plugin documents and environment, fed as-is: what it accepts, dpkit accepts and acts on alike.

Written for this project from the upstream reference (ibm-s390-cloud/k8s-cex-dev-plugin):
``src/cex-device-plugin/cryptoconfigs.go`` (the JSON fields and ``Verify``), the cases of its
``cryptoconfigs_test.go`` (rewritten here as the JSON documents they stand for), ``plugin.go`` /
``podlister.go`` / ``shadowsysfs.go`` (environment variables, device IDs, Allocate's mounts) and the
docs' sample ConfigMap and ``livesysfs`` example. Where dpkit deliberately differs, the case says
so and docs/cex.md's "Differences from IBM's plugin" table gives the reason.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from cex.aptree import ApTree
from dpkit.cex.cryptoconfig import parse_crypto_config
from dpkit.cex.vendor import CexVendor
from dpkit.core.tools.cli import main
from dpkit.core.vendorapi.device import Device
from dpkit.core.vendorapi.errors import ConfigError


def doc(*sets: dict[str, Any]) -> str:
    return json.dumps({"cryptoconfigsets": list(sets)})


def cset(name: str = "set", project: str = "test", **fields: Any) -> dict[str, Any]:
    return {"setname": name, "project": project, **fields}


def apqn(adapter: int, domain: int, machineid: str | None = None) -> dict[str, Any]:
    return {"adapter": adapter, "domain": domain, **({"machineid": machineid} if machineid is not None else {})}


# Every shape IBM's parser and Verify accept: (document, {setname: (cexmode, mincexgen, overcommit, live, apqns)})
# with APQN_OVERCOMMIT_LIMIT 2 and APQN_LIVE_SYSFS 1 as the cluster defaults.
ACCEPTED: list[tuple[str, str, dict[str, tuple[str, int | None, int, bool, int]]]] = [
    # cryptoconfigs_test.go "everything fine": one APQN pinned to two machines, all three modes, cex4..cex7
    ("ibm-test-everything-fine", doc(
        cset("set1", cexmode="cca", mincexgen="cex7", overcommit=10,
             apqns=[apqn(0, 0, "1"), apqn(0, 0, "2")]),
        cset("set2", cexmode="ep11", mincexgen="cex6", overcommit=0, apqns=[apqn(0, 2)]),
        cset("set3", "other_test", cexmode="accel", mincexgen="cex4", overcommit=1, apqns=[apqn(1, 2)])),
     {"set1": ("cca", 7, 10, True, 2), "set2": ("ep11", 6, 2, True, 1), "set3": ("accel", 4, 1, True, 1)}),
    # the docs' livesysfs example: per-set 0 and 1 over the cluster default
    ("ibm-docs-livesysfs", doc(
        cset("CEX_config_set_1", "customer-1", cexmode="cca", overcommit=3, livesysfs=0, apqns=[apqn(1, 6)]),
        cset("Another_CEX_config_set", "customer-2", cexmode="ep11", overcommit=3, livesysfs=1,
             apqns=[apqn(2, 6)])),
     {"CEX_config_set_1": ("cca", None, 3, False, 1), "Another_CEX_config_set": ("ep11", None, 3, True, 1)}),
    # the sample ConfigMap's shape: machineid "" means any machine; a set may have no APQNs yet
    ("ibm-docs-sample", doc(
        cset("CCA_for_customer_1", "customer-1", cexmode="cca", overcommit=3,
             apqns=[apqn(1, 6, ""), apqn(2, 6, "")]),
        cset("EP11_for_customer_2", "customer-2", cexmode="ep11", apqns=[]),
        cset("Accel", "customer-3", cexmode="accel")),
     {"CCA_for_customer_1": ("cca", None, 3, True, 2), "EP11_for_customer_2": ("ep11", None, 2, True, 0),
      "Accel": ("accel", None, 2, True, 0)}),
    # Go's encoding/json: keys match case-insensitively, unknown keys are ignored, null is "not given"
    ("go-json-keys", json.dumps({"CryptoConfigSets": [
        {"SetName": "s", "Project": "p", "CexMode": None, "MinCexGen": None, "Overcommit": None,
         "LiveSysfs": None, "APQNs": [{"Adapter": 1, "Domain": 2, "MachineID": None}], "comment": "ignored"}],
        "version": 2}),
     {"s": ("", None, 2, True, 1)}),
    # negative overcommit / livesysfs: IBM's "not given" (the environment's value)
    ("negative-means-default", doc(cset("s", overcommit=-1, livesysfs=-1, apqns=[apqn(1, 2)])),
     {"s": ("", None, 2, True, 1)}),
    ("livesysfs-any-positive", doc(cset("s", livesysfs=5, apqns=[apqn(1, 2)])), {"s": ("", None, 2, True, 1)}),
    ("no-sets", doc(), {}),
    ("sets-null", '{"cryptoconfigsets": null}', {}),
    ("setname-63-chars-dots-dashes", doc(cset("a" * 61 + ".b")), {"a" * 61 + ".b": ("", None, 2, True, 0)}),
]


@pytest.mark.parametrize(("text", "expected"), [(t, e) for _, t, e in ACCEPTED], ids=[i for i, _, _ in ACCEPTED])
def test_documents_ibm_accepts_are_accepted_alike(
        text: str, expected: dict[str, tuple[str, int | None, int, bool, int]]) -> None:
    config = parse_crypto_config(text, "cex_resources.json", overcommit=2, livesysfs=True)
    got = {s.setname: (s.cexmode, s.mincexgen, s.overcommit, s.livesysfs, len(s.apqns)) for s in config.sets}
    assert got == expected


# Every document IBM's Verify (or Go's json.Unmarshal) refuses: cryptoconfigs_test.go's cases first.
REJECTED: list[tuple[str, str, str]] = [
    ("non-unique-set-names", doc(cset("set"), cset("set")), "used by more than one set"),
    ("empty-set-name", doc(cset("")), r"setname': expected a non-empty string"),
    ("omitted-set-name", doc({"project": "test"}), r"setname': required: expected a non-empty string"),
    ("empty-project", doc(cset(project="")), r"project': expected a non-empty string"),
    ("omitted-project", doc({"setname": "set"}), r"project': required: expected a non-empty string"),
    ("invalid-cexmode", doc(cset(cexmode="ignored")), r"cexmode': expected one of cca, ep11, accel"),
    ("invalid-mincexgen", doc(cset(mincexgen="cex456789")), r"mincexgen"),
    ("negative-adapter", doc(cset(apqns=[apqn(-1, 0)])), r"adapter': expected an integer from 0 to 255"),
    ("huge-adapter", doc(cset(apqns=[apqn(4711, 0)])), r"adapter': expected an integer from 0 to 255"),
    ("negative-domain", doc(cset(apqns=[apqn(0, -1)])), r"domain': expected an integer from 0 to 255"),
    ("huge-domain", doc(cset(apqns=[apqn(0, 4711)])), r"domain': expected an integer from 0 to 255"),
    ("duplicated-apqn", doc(cset(apqns=[apqn(0, 0), apqn(0, 0)])), r"appears twice in set 'set'"),
    ("apqn-in-two-sets", doc(cset("set1", apqns=[apqn(0, 0)]), cset("set2", apqns=[apqn(0, 0)])),
     r"appears in sets 'set1' and 'set2'"),
    # Verify's rule for pinned APQNs: the same machine twice, or pinned next to unpinned
    ("same-machine-twice", doc(cset(apqns=[apqn(0, 0, "m1"), apqn(0, 0, "m1")])), "sets must not overlap"),
    ("pinned-and-unpinned", doc(cset("a", apqns=[apqn(0, 0, "m1")]), cset("b", apqns=[apqn(0, 0)])),
     "sets must not overlap"),
    # IsQualifiedName: at most 63 characters, alphanumeric at both ends
    ("setname-64-chars", doc(cset("a" * 64)), "cannot name a resource"),
    ("setname-leading-dash", doc(cset("-a")), "cannot name a resource"),
    ("mincexgen-cex3", doc(cset(mincexgen="cex3")), "mincexgen"),
    # what Go's json.Unmarshal refuses for IBM's typed fields
    ("adapter-as-string", doc(cset(apqns=[{"adapter": "1", "domain": 0}])), "adapter': expected an integer, got str"),
    ("domain-as-float", doc(cset(apqns=[{"adapter": 1, "domain": 1.5}])), "domain': expected an integer, got float"),
    ("overcommit-as-string", doc(cset(overcommit="2")), "overcommit"),
    ("livesysfs-as-string", doc(cset(livesysfs="1")), "livesysfs"),
    ("setname-as-number", doc({"setname": 7, "project": "p"}), "setname"),
    ("sets-as-object", '{"cryptoconfigsets": {"setname": "s"}}', "cryptoconfigsets': expected a list"),
    ("top-level-array", "[]", "expected a mapping, got list"),
    ("not-json", "{cryptoconfigsets: []}", "not valid JSON"),
    ("int-beyond-go-int", '{"cryptoconfigsets": [{"setname": "s", "project": "p", "overcommit": 9223372036854775808}]}',
     "out of range"),
]


@pytest.mark.parametrize(("text", "message"), [(t, m) for _, t, m in REJECTED], ids=[i for i, _, _ in REJECTED])
def test_documents_ibm_rejects_are_rejected_with_a_clear_error(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=f"cex_resources.json: .*{message}"):
        parse_crypto_config(text, "cex_resources.json")


# Deliberate differences (docs/cex.md, "Differences from IBM's plugin"): the reason is in the table.
@pytest.mark.parametrize(("text", "ibm", "dpkit"), [
    (doc(cset(overcommit=1001)), "accepted", "overcommit': expected an integer of at most 1000"),
    (doc(cset(apqns=[{"domain": 6}])), "accepted as adapter 0", "adapter': required: expected an integer"),
    (doc(cset(apqns=[{"adapter": None, "domain": 6}])), "accepted as adapter 0",
     "adapter': required: expected an integer"),
    (doc(cset("example.com/set")), "accepted (a qualified name may have a prefix)", "cannot name a resource"),
])
def test_deliberate_differences_are_errors_that_say_why(text: str, ibm: str, dpkit: str) -> None:
    with pytest.raises(ConfigError, match=dpkit):
        parse_crypto_config(text, "cex_resources.json")


@pytest.mark.parametrize(("text", "sets"), [
    ("", 0),                                     # IBM: "unexpected end of JSON input"; dpkit: no sets yet
    (doc(cset(mincexgen="cex10")), 1),           # IBM's pattern stops at cex9; dpkit takes newer generations
    (doc(cset(livesysfs=True)), 1),              # Go refuses a bool for its int field; dpkit reads it as meant
])
def test_documents_dpkit_takes_more_leniently(text: str, sets: int) -> None:
    assert len(parse_crypto_config(text, "cex_resources.json").sets) == sets


def _ids(devices: tuple[Device, ...]) -> list[str]:
    return sorted(d.id for d in devices)


def test_ibm_environment_and_document_give_ibms_devices_and_mounts(
        tree: ApTree, make_vendor: Callable[..., CexVendor], config_file: Path, tmp_path: Path) -> None:
    """As IBM's DaemonSet runs it: env for overcommit and live sysfs, machineid pinning, per-set overrides."""
    (tmp_path / "sysinfo").write_text("Manufacturer:         IBM\nType:                 3931\n"
                                      "Sequence Code:        00000000000A1B2C\n")
    config_file.write_text(doc(
        cset("cca", "blue", cexmode="cca", apqns=[apqn(1, 5, ""), apqn(2, 5, "IBM-3931-00000000000A1B2C"),
                                                  apqn(2, 5, "IBM-3931-0000000000099999")]),
        cset("ep11", "red", cexmode="ep11", overcommit=1, livesysfs=0, apqns=[apqn(3, 5)])))
    environ = {"APQN_OVERCOMMIT_LIMIT": "3", "APQN_LIVE_SYSFS": "1", "APQN_CHECK_INTERVAL": "30",
               "CRYPTOCONFIG_CHECK_INTERVAL": "120", "PODLISTER_POLL_INTERVAL": "30",
               "RESOURCE_DELETE_UNUSED": "120", "RESOURCE_DELETE_NEVER_USED": "1800", "NODENAME": "node-1"}
    vendor = make_vendor(environ, **{"poll_interval": 0.2})  # the vendor key wins over APQN_CHECK_INTERVAL
    snapshot = vendor.discover()
    # IBM's device IDs apqn-<adapter>-<domain>-<n>, n < overcommit (env default for sets without one)
    assert _ids(snapshot["cex.s390.ibm.com/cca"]) == [f"apqn-{a}-5-{n}" for a in (1, 2) for n in range(3)]
    assert _ids(snapshot["cex.s390.ibm.com/ep11"]) == ["apqn-3-5-0"]
    cca = vendor.container_spec("cex.s390.ibm.com/cca", [d for d in snapshot["cex.s390.ibm.com/cca"]
                                                        if d.id == "apqn-2-5-1"])
    assert [(m.container_path, m.read_only) for m in cca.mounts] == [
        ("/sys/bus/ap", True), ("/sys/devices/ap", True), ("/sys/bus/ap/devices/02.0005", True)]  # live, as IBM
    assert [(d.host_path, d.container_path, d.permissions) for d in cca.devices] == [
        (str(tmp_path / "dev" / "zcrypt-apqn-2-5-1"), "/dev/z90crypt", "rw")]
    ep11 = vendor.container_spec("cex.s390.ibm.com/ep11", list(snapshot["cex.s390.ibm.com/ep11"]))
    assert [m.container_path for m in ep11.mounts] == ["/sys/bus/ap", "/sys/devices/ap"]  # livesysfs 0
    s = vendor.settings
    assert (s.config_check_interval, s.reconcile_interval, s.delete_unused_after, s.delete_never_used_after) == (
        120.0, 30.0, 120.0, 1800.0)


def test_discover_says_what_a_missing_crypto_config_file_is_and_where_to_read_more(
        tmp_path: Path, vendor_config: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    """Issue 15: not just 'cannot read': which file, where it is expected (the configured path), the docs."""
    missing = tmp_path / "elsewhere" / "cex_resources.json"
    config = tmp_path / "dpkit.yaml"
    config.write_text(json.dumps({"vendor": {**vendor_config, "config_file": str(missing)}}))
    assert main(["discover", "cex", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert f"cannot read {missing}" in err and "/config/" not in err            # the configured path only
    assert "crypto config sets" in err and "cex-resources-config ConfigMap" in err
    assert f"at {missing.parent}" in err and "docs/cex.md" in err
