"""CDI spec files: schema-valid, rewritten on change, removed on stop, and CDI Allocate answers."""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import grpc
import jsonschema
import pytest
from referencing import Registry
from referencing.jsonschema import DRAFT7
from scripted_vendor import RES, ScriptedVendor, widget

from dpkit.core.api.v1beta1 import api_pb2
from dpkit.core.integrations.cdi import CdiWriter, build_spec, check_kind, minimum_version, spec_file_name
from dpkit.core.integrations.observers import attach_observers
from dpkit.core.vendorapi.device import ContainerSpec, Device, DeviceNode, Mount
from dpkit.core.vendorapi.errors import ConfigError, ValidationError

SCHEMA_DIR = Path(__file__).parent / "cdi_schema"
SPEC_FILE = spec_file_name("scripted", RES)


def _validator() -> jsonschema.Draft7Validator:
    """The vendored upstream schema; its ``defs.json#/...`` references resolve to the vendored defs."""
    schema = json.loads((SCHEMA_DIR / "schema.json").read_text())
    defs = DRAFT7.create_resource(json.loads((SCHEMA_DIR / "defs.json").read_text()))
    return jsonschema.Draft7Validator(schema, registry=Registry().with_resource("defs.json", defs))


VALIDATOR = _validator()


def assert_valid_cdi(document: dict[str, Any]) -> None:
    """The upstream JSON schema, plus the rules the CDI Go validator adds on top of it."""
    VALIDATOR.validate(document)
    check_kind(document["kind"])
    names = [d["name"] for d in document["devices"]]
    assert names and len(names) == len(set(names)), "devices must be present and unique"
    for device in document["devices"]:
        edits = device["containerEdits"]
        assert any(edits.get(k) for k in ("env", "deviceNodes", "mounts", "hooks")), "CDI rejects empty edits"
        assert all(e.index("=") > 0 for e in edits.get("env", []))
        assert all(set(n.get("permissions", "")) <= set("rwm") for n in edits.get("deviceNodes", []))
    assert document["cdiVersion"] == minimum_version(document)


def read_spec(cdi_dir: Path, name: str = SPEC_FILE) -> dict[str, Any]:
    document: dict[str, Any] = json.loads((cdi_dir / name).read_text())
    return document


def test_spec_file_is_schema_valid_and_private_temp_files_are_gone(kubelet, run_ops, short_tmp):
    cdi_dir = short_tmp / "cdi"
    run_ops(ScriptedVendor(), cdi_dir=str(cdi_dir))
    document = read_spec(cdi_dir)
    assert_valid_cdi(document)
    assert document["kind"] == RES
    assert document["cdiVersion"] == "0.5.0"  # hostPath on device nodes needs 0.5.0
    by_name = {d["name"]: d["containerEdits"] for d in document["devices"]}
    assert sorted(by_name) == ["w0", "w1", "w2", "w3"]
    assert by_name["w2"]["deviceNodes"] == [{"path": "/dev/w2", "hostPath": "/dev/null", "permissions": "rw"}]
    # WIDGETS differs per device: CDI would keep only the last one, so it stays out of the spec
    assert "env" not in by_name["w2"]
    assert stat.S_IMODE((cdi_dir / SPEC_FILE).stat().st_mode) == 0o644
    assert sorted(p.name for p in cdi_dir.iterdir()) == [SPEC_FILE]


def test_spec_follows_hotplug_and_resources_and_is_removed_on_stop(kubelet, run_ops, short_tmp, eventually):
    cdi_dir = short_tmp / "cdi"
    vendor = ScriptedVendor()
    manager = run_ops(vendor, cdi_dir=str(cdi_dir))
    vendor.push({RES: (*vendor.current[RES], widget(7, 1)), "example.com/gadget": (widget(9),)})
    eventually(lambda: "w7" in {d["name"] for d in read_spec(cdi_dir)["devices"]})
    gadget = spec_file_name("scripted", "example.com/gadget")
    eventually(lambda: (cdi_dir / gadget).exists())
    # a single device keeps its env: nothing to merge it with
    assert read_spec(cdi_dir, gadget)["devices"][0]["containerEdits"]["env"] == ["WIDGETS=w9"]
    vendor.push({RES: vendor.current[RES]})
    eventually(lambda: not (cdi_dir / gadget).exists())
    assert_valid_cdi(read_spec(cdi_dir))
    manager.stop()
    assert list(cdi_dir.iterdir()) == []


def test_cdi_allocate_answers_with_qualified_names_and_merged_env(kubelet, run_ops, short_tmp):
    cdi_dir = short_tmp / "cdi"
    manager = run_ops(ScriptedVendor(), cdi_dir=str(cdi_dir), cdi_allocate=True)
    assert kubelet.wait_for(lambda k: k.allocatable(RES) == 4, 10)
    ids, response = kubelet.allocate(RES, 2)
    assert [c.name for c in response.cdi_devices] == [f"{RES}={i}" for i in ids]
    assert not response.devices and not response.mounts, "CDI carries device nodes and mounts"
    assert sorted(response.envs["WIDGETS"].split(",")) == sorted(ids)
    names = {d["name"] for d in read_spec(cdi_dir)["devices"]}
    assert set(ids) <= names
    assert manager.status()["cdi"]["allocate"] is True


def test_raw_specs_without_cdi_allocate(kubelet, run_ops, short_tmp):
    run_ops(ScriptedVendor(), cdi_dir=str(short_tmp / "cdi"))
    assert kubelet.wait_for(lambda k: k.allocatable(RES) == 4, 10)
    _, response = kubelet.allocate(RES, 1)
    assert not response.cdi_devices, "no CDI names unless cdi_allocate is on: the runtime would inject twice"
    assert len(response.devices) == 1


def test_allocate_of_a_device_the_file_does_not_know_rewrites_it_first(kubelet, run_ops, short_tmp):
    cdi_dir = short_tmp / "cdi"
    manager = run_ops(ScriptedVendor(), cdi_dir=str(cdi_dir), cdi_allocate=True)
    writer = next(o for o in manager.observers if isinstance(o, CdiWriter))
    (cdi_dir / SPEC_FILE).unlink()
    writer.written.clear()  # as if the hotplug had not reached the file yet
    spec = writer.cdi_spec(RES, [manager.servers[RES].devices[0]])
    assert spec.cdi_devices == (f"{RES}=w0",)
    assert_valid_cdi(read_spec(cdi_dir))


class OddVendor(ScriptedVendor):
    """Device IDs the kubelet accepts but CDI does not, and an env-only device."""

    def __init__(self, kind: str = "example.com/widget") -> None:
        super().__init__(snapshot={RES: (
            widget(0),
            Device("w1-", spec=ContainerSpec(devices=(DeviceNode("/dev/null", "/dev/w1"),))),
            Device("envonly", spec=ContainerSpec(env={"WIDGETS": "envonly"})),
        )})
        self.kind = kind

    def cdi_kind(self, resource: str) -> str:
        return self.kind


def test_devices_cdi_cannot_name_are_left_out_and_refused_clearly(kubelet, run_ops, short_tmp):
    cdi_dir = short_tmp / "cdi"
    manager = run_ops(OddVendor(), cdi_dir=str(cdi_dir), cdi_allocate=True)
    document = read_spec(cdi_dir)
    assert_valid_cdi(document)
    assert [d["name"] for d in document["devices"]] == ["w0"]
    left_out = manager.status()["cdi"]["specs"][RES]["left_out"]
    assert "not a valid CDI device name" in left_out["w1-"]
    assert "nothing for CDI to inject" in left_out["envonly"]
    assert kubelet.wait_for(lambda k: k.allocatable(RES) == 3, 10)
    stub = kubelet.stub(RES)
    # the env-only device still works: its env travels in the Allocate answer
    reply = stub.Allocate(api_pb2.AllocateRequest(container_requests=[
        api_pb2.ContainerAllocateRequest(devices_ids=["envonly"])]), timeout=5)
    assert reply.container_responses[0].envs["WIDGETS"] == "envonly"
    with pytest.raises(grpc.RpcError) as err:
        stub.Allocate(api_pb2.AllocateRequest(container_requests=[
            api_pb2.ContainerAllocateRequest(devices_ids=["w1-"])]), timeout=5)
    assert err.value.code() == grpc.StatusCode.INTERNAL
    assert "w1-" in err.value.details() and "cdi_allocate" in err.value.details()


def test_invalid_kind_is_reported_and_devices_still_served(kubelet, run_ops, short_tmp):
    cdi_dir = short_tmp / "cdi"
    manager = run_ops(OddVendor(kind="Not A Kind"), cdi_dir=str(cdi_dir))
    assert kubelet.wait_for(lambda k: k.allocatable(RES) == 3, 10)
    assert not (cdi_dir / SPEC_FILE).exists()
    assert "CDI kind 'Not A Kind'" in manager.status()["cdi"]["errors"][RES]
    _, response = kubelet.allocate(RES, 1)
    assert response.devices or response.envs


def test_stale_specs_of_this_vendor_are_removed_and_others_kept(kubelet, run_ops, short_tmp):
    cdi_dir = short_tmp / "cdi"
    cdi_dir.mkdir()
    stale = cdi_dir / spec_file_name("scripted", "example.com/gone")
    stale.write_text("{}")
    foreign = cdi_dir / "nvidia.com-gpu.json"
    foreign.write_text("{}")
    run_ops(ScriptedVendor(), cdi_dir=str(cdi_dir))
    assert not stale.exists()
    assert foreign.exists() and (cdi_dir / SPEC_FILE).exists()


def test_unwritable_dir_is_an_error_in_status_then_recovers(kubelet, run_ops, short_tmp, eventually):
    cdi_dir = short_tmp / "cdi"
    cdi_dir.write_text("a file where the directory should be")
    vendor = ScriptedVendor()
    manager = run_ops(vendor, cdi_dir=str(cdi_dir))
    assert kubelet.wait_for(lambda k: k.allocatable(RES) == 4, 10), "devices are served regardless"
    assert "cannot write" in manager.status()["cdi"]["errors"][RES]
    cdi_dir.unlink()
    vendor.push({RES: (*vendor.current[RES], widget(5))})
    eventually(lambda: (cdi_dir / SPEC_FILE).exists())
    assert manager.status()["cdi"]["errors"] == {}


def test_cdi_allocate_without_a_dir_is_a_config_error(make_config):
    manager = SimpleNamespace(config=make_config(cdi_allocate=True, cdi_dir=""), observers=[])
    with pytest.raises(ConfigError, match="cdi_allocate"):
        attach_observers(manager)  # type: ignore[arg-type]
    assert manager.observers == []


class BrokenSpecVendor(ScriptedVendor):
    def container_spec(self, resource: str, devices: Sequence[Device]) -> ContainerSpec:
        if any(d.id == "w1" for d in devices):
            raise RuntimeError("sysfs vanished")
        return super().container_spec(resource, devices)


def test_vendor_container_spec_failure_leaves_that_device_out(kubelet, run_ops, short_tmp):
    cdi_dir = short_tmp / "cdi"
    manager = run_ops(BrokenSpecVendor(), cdi_dir=str(cdi_dir))
    assert [d["name"] for d in read_spec(cdi_dir)["devices"]] == ["w0", "w2", "w3"]
    assert "sysfs vanished" in manager.status()["cdi"]["specs"][RES]["left_out"]["w1"]


# -- pure functions ---------------------------------------------------------------------------------
def test_build_spec_mounts_env_and_versions():
    spec = ContainerSpec(devices=(DeviceNode("/dev/foo0"),), mounts=(Mount("/opt/lib"), Mount("/var/x", "/x", False)),
                         env={"MODE": "fast"})
    document, left_out = build_spec("acme.com/foo", {"a0": spec, "a1": spec})
    assert_valid_cdi(document)
    assert left_out == {}
    edits = document["devices"][0]["containerEdits"]
    assert edits["env"] == ["MODE=fast"]  # same value for every device: kept
    assert edits["deviceNodes"] == [{"path": "/dev/foo0", "permissions": "rw"}]
    assert edits["mounts"][1] == {"hostPath": "/var/x", "containerPath": "/x", "options": ["rbind", "rw"]}
    assert document["cdiVersion"] == "0.3.0"
    assert build_spec("acme.com/foo", {"0a": spec})[0]["cdiVersion"] == "0.5.0"  # leading digit
    assert build_spec("acme.com/foo.v2", {"a": spec})[0]["cdiVersion"] == "0.6.0"  # dot in class


@pytest.mark.parametrize("kind", ["foo", "acme.com/", "/foo", "acme.com/foo/bar", "1acme.com/foo", "acme.com/foo-"])
def test_invalid_kinds(kind):
    with pytest.raises(ValidationError):
        check_kind(kind)


def test_env_with_nul_leaves_the_device_out():
    bad = ContainerSpec(devices=(DeviceNode("/dev/foo0"),), env={"X": "a\x00b"})
    good = ContainerSpec(devices=(DeviceNode("/dev/foo1"),))
    document, left_out = build_spec("acme.com/foo", {"bad": bad, "good": good})
    assert [d["name"] for d in document["devices"]] == ["good"]
    assert "NUL" in left_out["bad"]
    assert os.sep not in spec_file_name("v", "a/b")


def test_unwritten_spec_is_retried_without_a_device_change(kubelet, run_ops, short_tmp, eventually):
    """Disk trouble clears (here: a file stood where the parent directory goes) and nothing else happens."""
    blocker = short_tmp / "blocker"
    blocker.write_text("a file where a directory should be")
    cdi_dir = blocker / "cdi"
    manager = run_ops(ScriptedVendor(), cdi_dir=str(cdi_dir))
    assert kubelet.wait_for(lambda k: k.allocatable(RES) == 4, 10)
    status = manager.status()["cdi"]
    assert "cannot write" in status["errors"][RES] and status["retry_in_s"] is not None
    blocker.unlink()
    blocker.mkdir()
    eventually(lambda: (cdi_dir / SPEC_FILE).exists(), timeout=15)  # first retries after 1 s, 2 s, 4 s
    assert_valid_cdi(read_spec(cdi_dir))
    status = manager.status()["cdi"]
    assert status["errors"] == {} and status["retry_in_s"] is None and RES in status["specs"]


def test_hard_link_at_a_temp_name_is_never_written_through(kubelet, run_ops, short_tmp):
    """The old temp name was ``.<spec>.<pid>.tmp``: a hard link planted there got truncated and overwritten."""
    cdi_dir = short_tmp / "cdi"
    cdi_dir.mkdir()
    victim = short_tmp / "victim"
    victim.write_text("precious\n")
    for name in (f".{SPEC_FILE}.{os.getpid()}.tmp", f".{SPEC_FILE}.tmp"):
        os.link(victim, cdi_dir / name)
    run_ops(ScriptedVendor(), cdi_dir=str(cdi_dir))
    assert_valid_cdi(read_spec(cdi_dir))
    assert victim.read_text() == "precious\n" and victim.stat().st_nlink == 3


def test_stale_cleanup_removes_only_our_regular_files(kubelet, run_ops, short_tmp):
    cdi_dir = short_tmp / "cdi"
    cdi_dir.mkdir()
    target = short_tmp / "target.json"
    target.write_text("{}")
    link = cdi_dir / spec_file_name("scripted", "example.com/linked")
    link.symlink_to(target)
    (cdi_dir / spec_file_name("scripted", "example.com/dir")).mkdir()
    run_ops(ScriptedVendor(), cdi_dir=str(cdi_dir))
    assert target.read_text() == "{}" and link.is_symlink(), "a link is not ours to remove"
    assert (cdi_dir / spec_file_name("scripted", "example.com/dir")).is_dir()


def test_a_thousand_device_spec_is_rendered_one_device_at_a_time():
    """The whole document as objects was about 700 bytes a device at once (issue 13: a serving
    process keeps what a peak touched); rendered device by device the peak is about the text."""
    import tracemalloc

    from dpkit.core.integrations.cdi import render_spec

    specs = {f"dev-{i:06d}": ContainerSpec(devices=(DeviceNode("/dev/null", f"/dev/sim/dev-{i:06d}"),),
                                          env={"SIM_VISIBLE_DEVICES": f"dev-{i:06d}"}) for i in range(1000)}
    render_spec("example.com/sim", specs)  # warm: caches and imports out of the figure
    tracemalloc.start()
    try:
        text, names, left_out = render_spec("example.com/sim", specs)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    document = json.loads(text)
    assert_valid_cdi(document)
    assert len(names) == len(document["devices"]) == 1000 and left_out == {}
    assert "env" not in document["devices"][0]["containerEdits"], "per-allocation env stays out"
    assert peak < 4 * len(text), f"peak {peak} bytes for a {len(text)}-byte file"
