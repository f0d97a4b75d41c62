"""What a config library costs `dpkit run`: import time and RSS added to a process that already
imports the libraries `dpkit run` imports (docs/performance.md, "Configuration layer: library choice").

    for lib in msgspec pydantic jsonschema; do for i in $(seq 10); do python bench/config_library.py $lib; done; done

prints, per fresh interpreter: ms to import, ms to import + declare + convert one document, KiB of RSS added.
"""

import gc
import sys
import time


def rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0

# what `dpkit run` loads besides the config library (dpkit.core.engine itself now imports msgspec)
import ctypes  # noqa: E402, F401  # support/dirwatch's inotify (inotify_simple is no longer loaded)

import google.protobuf  # noqa: E402, F401
import grpc  # noqa: E402, F401
import prometheus_client  # noqa: E402, F401
import yaml  # noqa: E402, F401
import zmq  # noqa: E402, F401

gc.collect()
lib = sys.argv[1]
before = rss_kib()
t0 = time.perf_counter()
doc = {"plugin_dir": "/x", "probe_heartbeat_timeout": 3, "resources": [{"name": "gpu", "replicas": 4}]}
if lib == "msgspec":
    import msgspec
    t1 = time.perf_counter()
    class R(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
        name: str
        replicas: int
    class C(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
        plugin_dir: str = "/"
        probe_heartbeat_timeout: float = 10.0
        resources: tuple[R, ...] = ()
    msgspec.convert(doc, C)
elif lib == "pydantic":
    import pydantic
    t1 = time.perf_counter()
    class R(pydantic.BaseModel):
        model_config = pydantic.ConfigDict(extra="forbid", frozen=True, strict=True)
        name: str
        replicas: int
    class C(pydantic.BaseModel):
        model_config = pydantic.ConfigDict(extra="forbid", frozen=True, strict=True)
        plugin_dir: str = "/"
        probe_heartbeat_timeout: float = 10.0
        resources: list[R] = []
    C.model_validate(doc)
elif lib == "jsonschema":
    import jsonschema
    t1 = time.perf_counter()
    schema = {"type": "object", "additionalProperties": False, "properties": {
        "plugin_dir": {"type": "string"}, "probe_heartbeat_timeout": {"type": "number"},
        "resources": {"type": "array", "items": {
                      "type": "object", "additionalProperties": False, "required": ["name", "replicas"],
                      "properties": {"name": {"type": "string"}, "replicas": {"type": "integer"}}}}}}
    jsonschema.Draft202012Validator(schema).validate(doc)
else:
    t1 = time.perf_counter()
t2 = time.perf_counter()
gc.collect()
print(f"{(t1-t0)*1000:.2f} {(t2-t0)*1000:.2f} {rss_kib()-before}")
