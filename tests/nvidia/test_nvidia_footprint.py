"""The serving process loads no driver library (issue 13): discovery runs NVML in a subprocess with a
deadline, health in the probe; devices are still served and health transitions still reach the kubelet."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from fakenvml import FakeNode, gpu_uuid

from dpkit.core.vendorapi.errors import ConfigError, VendorError
from dpkit.nvidia.vendor import NvidiaVendor

GPU = "nvidia.com/gpu"
CHILD = Path(__file__).with_name("footprint_child.py")


def test_serving_process_holds_no_nvml_while_devices_are_served_and_marked(fake_library, short_tmp, capsys):
    out = short_tmp / "seen.json"
    env = {k: v for k, v in os.environ.items() if k not in ("CONFIG_FILE", "DP_DISABLE_HEALTHCHECKS")}
    env["FAKENVML_CONFIG"] = str(short_tmp / "host" / "fakenvml.txt")
    result = subprocess.run([sys.executable, str(CHILD), str(out), str(short_tmp), str(fake_library)],
                            env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    seen = json.loads(out.read_text())
    assert seen["served"] and seen["probe_beats"], "devices were not served"
    assert seen["xid_unhealthy"] and seen["other_healthy"], "the probe's XID mark did not reach the kubelet"
    assert not seen["pynvml_loaded"] and seen["nvml_modules"] == []
    assert seen["nvml_mapped"] == [], "the serving process mapped the driver library"
    assert seen["probe_maps_nvml"], "the probe process is where NVML is loaded"
    with capsys.disabled():  # the figures docs/nvidia.md records
        print(f"\nfake NVML, 2 GPUs: serving VmRSS {seen['serving_rss_kb']} kB, probe {seen['probe_rss_kb']} kB")


def test_a_hung_discovery_subprocess_is_killed_at_its_deadline(host):
    node = host.apply(FakeNode.with_gpus(2))
    vendor = NvidiaVendor(host.vendor_config(nvml_timeout=60.0, discovery_timeout=1.0), environ={})
    try:
        assert sorted(d.id for d in vendor.discover()[GPU]) == [gpu_uuid(0), gpu_uuid(1)]
        node.hangs = [("nvmlDeviceGetName", 0)]  # each call would hang for a minute (nvml_timeout)
        node.write()
        started = time.monotonic()
        with pytest.raises(VendorError, match=r"did not return within 1\.0s"):
            vendor.discover()  # had GPUs: the last list is kept (the core keeps serving it)
        assert time.monotonic() - started < 10, "discovery was not cut at its deadline"
        pid = vendor.reader.last_pid
        assert pid is not None
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)  # killed and reaped
        assert any("NVML hangs" in f.reason for f in vendor.explain())
        node.hangs = []
        node.write()
        assert len(vendor.discover()[GPU]) == 2
    finally:
        vendor.close()


def test_a_hung_first_discovery_advertises_nothing_and_says_why(host):
    node = FakeNode.with_gpus(1)
    node.hangs = [("nvmlSystemGetDriverVersion", -1)]
    host.apply(node)
    vendor = NvidiaVendor(host.vendor_config(nvml_timeout=60.0, discovery_timeout=1.0), environ={})
    try:
        started = time.monotonic()
        assert vendor.discover() == {GPU: ()}
        assert time.monotonic() - started < 10
        assert any("NVML hangs" in f.reason for f in vendor.explain())
    finally:
        vendor.close()


def test_discovery_timeout_must_be_positive(host):
    with pytest.raises(ConfigError, match=r"vendor\.discovery_timeout"):
        NvidiaVendor(host.vendor_config(discovery_timeout=0), environ={})
