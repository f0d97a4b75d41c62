"""The generated stubs are current and wire-compatible with the kubelet's Device Plugin API."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from google.protobuf.descriptor import FieldDescriptor

from dpkit.core.api.v1beta1 import api_pb2

ROOT = Path(__file__).resolve().parents[2]
# The kubelet's wire format (from k8s.io/kubelet deviceplugin/v1beta1), kept as data in the tests.
TABLE = json.loads((Path(__file__).parent / "data" / "deviceplugin_v1beta1.json").read_text())
TYPES = {FieldDescriptor.TYPE_BOOL: "bool", FieldDescriptor.TYPE_STRING: "string",
         FieldDescriptor.TYPE_INT64: "int64", FieldDescriptor.TYPE_INT32: "int32"}


def test_generated_stubs_are_not_stale():
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "gen_protos.py"), "--check"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def _kind(field: FieldDescriptor) -> str:
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        if field.message_type.GetOptions().map_entry:
            return "map:string,string"
        return f"message:{field.message_type.name}"
    return TYPES[field.type]


def test_messages_match_the_kubelet_field_for_field():
    fd = api_pb2.DESCRIPTOR
    assert fd.package == TABLE["package"]
    for name, fields in TABLE["messages"].items():
        message = fd.message_types_by_name[name]
        assert len(message.fields) == len(fields), name
        for field_name, number, kind, _label in fields:
            field = message.fields_by_number[number]
            assert (field.name, _kind(field)) == (field_name, kind), f"{name}.{field_name}"


def test_services_match_the_kubelet():
    fd = api_pb2.DESCRIPTOR
    for service, methods in TABLE["services"].items():
        for method, spec in methods.items():
            m = fd.services_by_name[service].methods_by_name[method]
            assert (m.input_type.name, m.output_type.name, m.server_streaming) == (
                spec["input"], spec["output"], spec["server_streaming"])


def test_constants_match():
    from dpkit.core.engine.registration import VERSION
    from dpkit.core.support.config import DEFAULT_PLUGIN_DIR
    from dpkit.core.vendorapi.device import Health

    constants = TABLE["constants"]
    assert VERSION == constants["Version"]
    assert DEFAULT_PLUGIN_DIR + "/" == constants["DevicePluginPath"]
    assert (Health.HEALTHY, Health.UNHEALTHY) == (constants["Healthy"], constants["Unhealthy"])


def test_shared_conformance_checker_when_available():
    checker = ROOT.parent / "shared" / "conformance" / "check_deviceplugin_proto.py"
    if not checker.exists():
        pytest.skip("../shared/conformance is not beside this checkout")
    result = subprocess.run([sys.executable, str(checker), "dpkit.core.api.v1beta1.api_pb2"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout
    assert "0 mismatches" in result.stdout
