"""cex_resources.json: IBM's file accepted unchanged, overlaps refused, every error names its key."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from dpkit.cex.cryptoconfig import (
    ApqnDef,
    file_digest,
    parse_crypto_config,
    read_crypto_config,
    read_machine_id,
)
from dpkit.core.vendorapi.errors import ConfigError

# As IBM documents it (appendix: sample CEX resource configuration map), fields and spacing kept.
IBM_SAMPLE = """
{
"cryptoconfigsets":
[
    {
        "setname":   "CCA_for_customer_1",
        "project":   "customer-1",
        "cexmode":   "cca",
        "overcommit": 3,
        "apqns":
        [
            { "adapter": 1, "domain": 6, "machineid": "" },
            { "adapter": 2, "domain": 6, "machineid": "" }
        ]
    },
    {
        "setname":   "EP11_for_customer_2",
        "project":   "customer-2",
        "cexmode":   "ep11",
        "mincexgen": "cex7",
        "livesysfs": 0,
        "apqns":
        [
            { "adapter": 3, "domain": 11, "machineid": "IBM-8561-0000000000012345" },
            { "adapter": 3, "domain": 11, "machineid": "IBM-8561-00000000000ABCDE" }
        ]
    },
    {
        "setname":   "Accel",
        "project":   "customer-3",
        "cexmode":   "accel",
        "apqns": []
    }
]
}
"""


def test_ibm_sample_is_accepted_unchanged() -> None:
    config = parse_crypto_config(IBM_SAMPLE, "cex_resources.json", overcommit=2, livesysfs=True)
    cca, ep11, accel = config.sets
    assert [s.resource for s in config.sets] == [
        "cex.s390.ibm.com/CCA_for_customer_1", "cex.s390.ibm.com/EP11_for_customer_2", "cex.s390.ibm.com/Accel"]
    assert (cca.cexmode, cca.overcommit, cca.livesysfs, cca.mincexgen) == ("cca", 3, True, None)
    assert cca.apqns == (ApqnDef(1, 6), ApqnDef(2, 6))
    # absent overcommit takes the cluster default; livesysfs 0 switches live sysfs off for the set
    assert (ep11.overcommit, ep11.livesysfs, ep11.mincexgen) == (2, False, 7)
    assert ep11.apqns[0].applies_to("IBM-8561-0000000000012345")
    assert not ep11.apqns[0].applies_to("IBM-8561-00000000000ABCDE")
    assert accel.apqns == ()
    assert config.uses_machine_ids() and config.ignored == ()
    assert config.by_resource("cex.s390.ibm.com/Accel") is accel


def _sets(*sets: dict[str, Any]) -> str:
    return json.dumps({"cryptoconfigsets": list(sets)})


def _set(name: str = "s1", **fields: Any) -> dict[str, Any]:
    return {"setname": name, "project": "p", "apqns": [{"adapter": 1, "domain": 5}], **fields}


def test_overlapping_sets_are_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"APQN \(1,5\) appears in sets 's1' and 's2'"):
        parse_crypto_config(_sets(_set("s1"), _set("s2")), "f.json")
    twice = _set("s1", apqns=[{"adapter": 1, "domain": 5}, {"adapter": 1, "domain": 5}])
    with pytest.raises(ConfigError, match="twice in set"):
        parse_crypto_config(_sets(twice), "f.json")
    pinned_and_free = _set("s2", apqns=[{"adapter": 1, "domain": 5, "machineid": "IBM-1-2"}])
    with pytest.raises(ConfigError, match="must not overlap"):
        parse_crypto_config(_sets(_set("s1"), pinned_and_free), "f.json")


def test_one_apqn_pinned_to_different_machines_may_serve_two_sets() -> None:
    a = _set("s1", apqns=[{"adapter": 1, "domain": 5, "machineid": "IBM-8561-1"}])
    b = _set("s2", apqns=[{"adapter": 1, "domain": 5, "machineid": "IBM-8561-2"}])
    assert len(parse_crypto_config(_sets(a, b), "f.json").sets) == 2


S = r"f.json: key 'cryptoconfigsets\[0\]"  # the schema layer's form: file, key path, expected, got


@pytest.mark.parametrize(("text", "message"), [
    ('{"cryptoconfigsets": [', r"f.json: not valid JSON at line 1"),
    ("[1, 2]", r"f.json: expected a mapping, got list"),
    ('{"cryptoconfigsets": {"a": 1}}', r"f.json: key 'cryptoconfigsets': expected a list, got dict"),
    (_sets("nope"), S + r"': expected a mapping, got str 'nope'"),
    (_sets(_set(apqns=[{"adapter": 256, "domain": 5}])), S + r".apqns\[0\].adapter': expected an integer from 0 to "
                                                             r"255, got 256"),
    (_sets(_set(apqns=[{"adapter": 1, "domain": "5"}])), S + r".apqns\[0\].domain': expected an integer, got str"),
    (_sets(_set(apqns=[{"adapter": 1}])), S + r".apqns\[0\].domain': required: expected an integer"),
    (_sets(_set(apqns=[{"adapter": 1, "domain": 5, "machineid": 7}])), S + r".apqns\[0\].machineid': expected a "
                                                                          r"string, got int 7"),
    (_sets(_set(apqns={"adapter": 1})), S + r".apqns': expected a list"),
    (_sets(_set(cexmode="fips")), S + r".cexmode': expected one of cca, ep11, accel, got 'fips'"),
    (_sets(_set(mincexgen="cex3")), S + r".mincexgen': expected 'cex4', 'cex5', \.\.\., got 'cex3'"),
    (_sets(_set(mincexgen="7")), S + r".mincexgen': expected 'cex4'"),
    (_sets(_set(overcommit=1001)), S + r".overcommit': expected an integer of at most 1000 \(dpkit's limit "
                                       r"per set; IBM's plugin has none\), got 1001"),
    (_sets(_set(overcommit=2.5)), S + r".overcommit': expected an integer, got float 2.5"),
    (_sets(_set(livesysfs="1")), S + r".livesysfs': expected an integer \(0 off, 1 on\), got str '1'"),
    (_sets(_set(project="")), S + r".project': expected a non-empty string"),
    (_sets(_set(name="Bad Name")), S + r".setname': 'Bad Name' cannot name a resource"),
    (_sets({"project": "p"}), S + r".setname': required: expected a non-empty string"),
    (_sets(_set("s1"), _set("s1", apqns=[])), r"setname 's1' is used by more than one set"),
])
def test_every_error_names_file_and_key(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_crypto_config(text, "f.json")


def test_empty_or_setless_files_mean_no_resources() -> None:
    for text in ("", "{}", "null", '{"cryptoconfigsets": null}'):
        assert parse_crypto_config(text, "f.json").sets == ()


def test_unknown_keys_are_ignored_and_reported() -> None:
    config = parse_crypto_config(json.dumps({"version": 2, "cryptoconfigsets": [
        _set(overcomit=3, apqns=[{"adapter": 1, "domain": 5, "domian": 6}])]}), "f.json")
    assert config.ignored == ("f.json: version", "f.json: cryptoconfigsets[0].overcomit (did you mean 'overcommit'?)",
                              "f.json: cryptoconfigsets[0].apqns[0].domian (did you mean 'domain'?)")
    assert config.sets[0].overcommit == 1


def test_a_misspelt_key_in_any_case_is_reported_with_the_key_it_resembles() -> None:
    """Go's parser drops a typo silently; dpkit still ignores it (as IBM's does) but says what was meant."""
    config = parse_crypto_config(json.dumps({"CryptoConfigSet": [], "cryptoconfigsets": [
        _set(OverComit=3, apqns=[{"Adaptor": 2, "adapter": 1, "domain": 5}])]}), "f.json")
    assert config.ignored == ("f.json: CryptoConfigSet (did you mean 'cryptoconfigsets'?)",
                              "f.json: cryptoconfigsets[0].OverComit (did you mean 'overcommit'?)",
                              "f.json: cryptoconfigsets[0].apqns[0].Adaptor (did you mean 'adapter'?)")
    assert config.sets[0].apqns == (ApqnDef(1, 5),)


def test_overcommit_zero_or_negative_means_the_default() -> None:
    config = parse_crypto_config(_sets(_set("a", overcommit=0), _set("b", overcommit=-1, apqns=[]),
                                       _set("c", overcommit=-7, apqns=[])), "f", overcommit=4)
    assert [s.overcommit for s in config.sets] == [4, 4, 4]
    assert parse_crypto_config(_sets(_set(overcommit=1000)), "f").sets[0].overcommit == 1000


def test_keys_match_ignoring_case_as_in_ibms_go_parser() -> None:
    text = json.dumps({"CryptoConfigSets": [{
        "SetName": "s1", "PROJECT": "p", "cexMode": "cca", "MinCexGen": "cex7", "OverCommit": 2, "LiveSysfs": 0,
        "Apqns": [{"Adapter": 1, "DOMAIN": 5, "MachineId": "IBM-1"}, {"adapter": 2, "domain": 5}]}]})
    config = parse_crypto_config(text, "f.json")
    assert config.ignored == ()
    s1 = config.sets[0]
    assert (s1.setname, s1.project, s1.cexmode, s1.mincexgen, s1.overcommit, s1.livesysfs) == (
        "s1", "p", "cca", 7, 2, False)
    assert s1.apqns == (ApqnDef(1, 5, "IBM-1"), ApqnDef(2, 5))
    # Go's bytes.EqualFold also folds the long s onto s (and the Kelvin sign onto k)
    folded = parse_crypto_config(json.dumps({"cryptoconfig\u017fets": [
        {"\u017fetname": "s2", "project": "p", "apqns": []}]}), "f.json")
    assert [s.setname for s in folded.sets] == ["s2"] and folded.ignored == ()


def test_of_two_keys_for_one_field_the_later_wins_and_the_earlier_is_reported() -> None:
    text = '{"cryptoconfigsets": [{"setname": "old", "project": "p", "SetName": "new", "apqns": []}]}'
    config = parse_crypto_config(text, "f.json")
    assert config.sets[0].setname == "new"
    assert config.ignored == ("f.json: cryptoconfigsets[0].setname (overridden by a later 'SetName')",)


def test_keys_that_only_look_alike_stay_unknown() -> None:
    # the dotless and the dotted I are not in the fold set of i (Go's unicode.SimpleFold)
    text = json.dumps({"cryptoconfigsets": [_set("s1", setname_=1, **{"l\u0131vesysfs": 0, "mach\u0130neid": ""})]})
    assert parse_crypto_config(text, "f.json").ignored == (
        "f.json: cryptoconfigsets[0].setname_ (did you mean 'setname'?)",
        "f.json: cryptoconfigsets[0].l\u0131vesysfs (did you mean 'livesysfs'?)",
        "f.json: cryptoconfigsets[0].mach\u0130neid")  # a set has no machineid: no hint


def test_reading_the_file_and_its_digest(tmp_path: Path) -> None:
    missing = tmp_path / "missing.json"
    with pytest.raises(ConfigError, match=r"vendor.config_file: cannot read .*missing.json"):
        read_crypto_config(missing)
    assert file_digest(missing) is None
    path = tmp_path / "cex_resources.json"
    path.write_text(IBM_SAMPLE)
    config = read_crypto_config(path)
    assert config.digest == file_digest(path) and config.source == str(path)
    path.write_text(IBM_SAMPLE + " ")
    assert file_digest(path) != config.digest


def test_machine_id_comes_from_sysinfo(tmp_path: Path) -> None:
    sysinfo = tmp_path / "sysinfo"
    sysinfo.write_text("Manufacturer:         IBM\nType:                 8561\nModel:                716\n"
                       "Sequence Code:        00000000000ABCDE\nPlant:                02\n"
                       "LPAR Number:          21\n")
    assert read_machine_id(sysinfo) == "IBM-8561-00000000000ABCDE"
    sysinfo.write_text("Manufacturer: IBM\nType: 8561\n")
    assert read_machine_id(sysinfo) is None
    assert read_machine_id(tmp_path / "absent") is None


def test_the_digest_notices_changes_and_the_vendor_loads_no_hashlib_or_difflib(tmp_path: Path) -> None:
    """hashlib starts OpenSSL's digest provider (about 0.6 MB resident in every node's serving process)
    and difflib is only for a mistake in the file: neither is loaded by the vendors' modules."""
    from child_process import loaded_after

    path = tmp_path / "cex_resources.json"
    path.write_text(IBM_SAMPLE)
    first = file_digest(path)
    path.write_text(IBM_SAMPLE.replace("1", "2", 1))  # same length, one byte changed
    assert file_digest(path) != first and file_digest(path) == file_digest(path)
    code = "import dpkit.core.engine.manager, dpkit.cex.vendor, dpkit.kvm_vfio.vendor, dpkit.sfc.vendor"
    assert loaded_after(code, ("hashlib", "_hashlib", "difflib")) == []
