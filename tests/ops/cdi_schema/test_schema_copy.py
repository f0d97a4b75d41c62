"""The vendored CDI schema is the current upstream one, not the lenient first draft.

The documents below are written for this project after the shapes in upstream's
``schema/testdata/{good,bad}`` (cncf-tags/container-device-interface): device cgroup rules
(major >= 1, minor >= -1), network devices, additional GIDs and the closed top-level and
device objects. An older copy of the schema accepts every one of the bad documents.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from referencing import Registry
from referencing.jsonschema import DRAFT7

HERE = Path(__file__).parent


def validator() -> jsonschema.Draft7Validator:
    schema = json.loads((HERE / "schema.json").read_text())
    defs = DRAFT7.create_resource(json.loads((HERE / "defs.json").read_text()))
    return jsonschema.Draft7Validator(schema, registry=Registry().with_resource("defs.json", defs))


def spec(**edits: Any) -> dict[str, Any]:
    return {"cdiVersion": "1.0.0", "kind": "example.com/nic",
            "devices": [{"name": "nic0", "containerEdits": {"env": ["A=1"], **edits}}]}


GOOD = [
    spec(),
    spec(deviceCgroupRules=[{"type": "c", "major": 226, "minor": -1, "permissions": "rwm"},
                            {"type": "b", "major": 8, "minor": 0}]),
    spec(netDevices=[{"hostInterfaceName": "ens3f0", "name": "net0"}]),
    spec(additionalGids=[0, 4294967295]),
    spec(intelRdt={"closID": "clos1", "schemata": ["L3:0=ff"], "enableMonitoring": True}),
]


def bad(path: str, value: Any) -> dict[str, Any]:
    """``spec()`` with the value at a dotted path replaced (a path ending in a new key adds it)."""
    document = copy.deepcopy(spec(deviceCgroupRules=[{"type": "c", "major": 1, "minor": 0}]))
    node: Any = document
    keys = path.split(".")
    for key in keys[:-1]:
        node = node[int(key)] if isinstance(node, list) else node[key]
    node[keys[-1]] = value
    return document


BAD = {
    "unknown top-level key": bad("containerSpec", {}),
    "unknown device key": bad("devices.0.ociEdits", {}),
    "cgroup rule major 0": bad("devices.0.containerEdits.deviceCgroupRules.0.major", 0),
    "cgroup rule minor -2": bad("devices.0.containerEdits.deviceCgroupRules.0.minor", -2),
    "cgroup rule minor as text": bad("devices.0.containerEdits.deviceCgroupRules.0.minor", "0"),
    "cgroup rule without major": bad("devices.0.containerEdits.deviceCgroupRules", [{"type": "c", "minor": 1}]),
    "cgroup rule type x": bad("devices.0.containerEdits.deviceCgroupRules.0.type", "x"),
    "cgroup rule permissions": bad("devices.0.containerEdits.deviceCgroupRules.0.permissions", "rx"),
    "net device without host name": bad("devices.0.containerEdits.netDevices", [{"name": "net0"}]),
    "negative additional gid": bad("devices.0.containerEdits.additionalGids", [-1]),
}


@pytest.mark.parametrize("document", GOOD)
def test_current_upstream_shapes_are_accepted(document: dict[str, Any]) -> None:
    validator().validate(document)


@pytest.mark.parametrize("name", sorted(BAD))
def test_current_upstream_rejections(name: str) -> None:
    with pytest.raises(jsonschema.ValidationError):
        validator().validate(BAD[name])
