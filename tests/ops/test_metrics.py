"""Metrics, scraped over real HTTP from 127.0.0.1 on an ephemeral port."""

from __future__ import annotations

import socket
from collections.abc import Iterable
from pathlib import Path
from types import SimpleNamespace

import grpc
import pytest
from scripted_vendor import RES, ProbedVendor, ScriptedVendor

from dpkit.core.api.v1beta1 import api_pb2
from dpkit.core.engine import server as server_module
from dpkit.core.integrations.metrics import Metrics, parse_address
from dpkit.core.vendorapi.device import Health
from dpkit.core.vendorapi.errors import ConfigError
from dpkit.core.vendorapi.vendor import MetricSample, Probe

LOCAL = "127.0.0.1:0"


def metrics_of(manager) -> Metrics:  # type: ignore[no-untyped-def]
    return next(o for o in manager.observers if isinstance(o, Metrics))


def test_devices_allocations_latency_registrations_and_holders(kubelet, run_ops, scrape, metric):
    manager = run_ops(ScriptedVendor(), metrics_address=LOCAL)
    port = metrics_of(manager).port
    assert port > 0 and manager.status()["metrics"]["serving"] is True
    assert kubelet.wait_for(lambda k: k.allocatable(RES) == 4, 10)
    ids, _ = kubelet.allocate(RES, 2, pod="trainer", container="cuda", namespace="ml")
    samples = scrape(port)
    assert metric(samples, "dpkit_info", vendor="scripted") == 1
    assert metric(samples, "dpkit_devices", resource=RES, health="Healthy") == 4
    assert metric(samples, "dpkit_devices", resource=RES, health="Unhealthy") == 0
    assert metric(samples, "dpkit_resource_registered", resource=RES) == 1
    assert metric(samples, "dpkit_registrations_total", resource=RES) == 1
    assert metric(samples, "dpkit_allocations_total", resource=RES) == 1
    assert metric(samples, "dpkit_rpc_duration_seconds_count", resource=RES, method="Allocate") == 1
    assert metric(samples, "dpkit_rpc_duration_seconds_count", resource=RES, method="GetPreferredAllocation") == 1
    assert (metric(samples, "dpkit_list_and_watch_updates_total", resource=RES) or 0) >= 1
    assert metric(samples, "dpkit_pod_resources_up") == 1
    for device_id in ids:
        assert metric(samples, "dpkit_device_allocated", resource=RES, device=device_id,
                      namespace="ml", pod="trainer", container="cuda") == 1
    held = [k for k in samples if k[0] == "dpkit_device_allocated"]
    assert len(held) == 2


def test_health_changes_show_per_device(kubelet, run_ops, scrape, metric, eventually):
    vendor = ScriptedVendor()
    manager = run_ops(vendor, metrics_address=LOCAL)
    port = metrics_of(manager).port
    vendor.set_health("w2", Health.UNHEALTHY, "ECC error")
    eventually(lambda: metric(scrape(port), "dpkit_devices", resource=RES, health="Unhealthy") == 1)
    samples = scrape(port)
    assert metric(samples, "dpkit_device_healthy", resource=RES, device="w2") == 0
    assert metric(samples, "dpkit_device_healthy", resource=RES, device="w1") == 1
    vendor.push({})  # the resource goes away: its series go with it
    eventually(lambda: metric(scrape(port), "dpkit_devices", resource=RES, health="Healthy") is None)


def test_kubelet_restart_and_rpc_errors_are_counted(kubelet, run_ops, scrape, metric, eventually, monkeypatch):
    vendor = ScriptedVendor()
    manager = run_ops(vendor, metrics_address=LOCAL)
    port = metrics_of(manager).port
    assert kubelet.wait_for(lambda k: k.registered(RES) and k.updates(RES) > 0, 10)
    with pytest.raises(grpc.RpcError):
        kubelet.stub(RES).Allocate(api_pb2.AllocateRequest(container_requests=[
            api_pb2.ContainerAllocateRequest(devices_ids=["nope"])]), timeout=5)
    assert metric(scrape(port), "dpkit_rpc_errors_total", resource=RES, method="Allocate") == 1
    kubelet.restart()
    eventually(lambda: metric(scrape(port), "dpkit_kubelet_restarts_total") == 1)
    eventually(lambda: metric(scrape(port), "dpkit_registrations_total", resource=RES) == 2)
    # a ListAndWatch stream that fails while building its answer is counted too
    assert kubelet.wait_for(lambda k: k.registered(RES) and k.updates(RES) > 0, 10)

    def broken(device):  # type: ignore[no-untyped-def]
        raise RuntimeError("cannot encode")

    monkeypatch.setattr(server_module, "device_to_proto", broken)
    vendor.set_health("w0", Health.UNHEALTHY, "trigger an update")
    eventually(lambda: metric(scrape(port), "dpkit_rpc_errors_total", resource=RES, method="ListAndWatch") == 1)


def test_probe_heartbeats_silence_and_restarts(kubelet, run_ops, scrape, metric, eventually, short_tmp, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", str(Path(__file__).resolve().parent.parent))  # the probe child imports it
    flag = short_tmp / "hang"
    probe = Probe("watchdog", "scripted_vendor:hanging_probe", {"hang_flag": str(flag)}, heartbeat_timeout=2.0)
    manager = run_ops(ProbedVendor(probe=probe), metrics_address=LOCAL)
    port = metrics_of(manager).port
    eventually(lambda: (metric(scrape(port), "dpkit_probe_heartbeats_total", probe="watchdog") or 0) >= 3)
    assert metric(scrape(port), "dpkit_probe_silent", probe="watchdog") == 0
    flag.touch()
    eventually(lambda: metric(scrape(port), "dpkit_probe_silent", probe="watchdog") == 1)
    samples = eventually(lambda: (s := scrape(port)) and
                         (metric(s, "dpkit_probe_restarts_total", probe="watchdog") or 0) >= 1 and s)
    assert metric(samples, "dpkit_devices", resource=RES, health="Unhealthy") == 4


class CountingVendor(ScriptedVendor):
    """Exports request counters the way the CEX vendor does, plus a few broken samples."""

    fail = False

    def metric_samples(self) -> Iterable[MetricSample]:
        if self.fail:
            raise OSError("sysfs counter vanished")
        return [
            MetricSample("dpkit_cex_requests_total", "Requests per card.", 12, {"card": "0"}, kind="counter"),
            MetricSample("dpkit_cex_requests_total", "Requests per card.", 3, {"card": "1"}, kind="counter"),
            MetricSample("dpkit_cex_temperature", "Card temperature.", 41.5, {"card": "0"}),
            MetricSample("bad name", "x", 1),
            MetricSample("dpkit_devices", "collides with the core", 1),
            MetricSample("dpkit_cex_temperature", "other labels", 1, {"slot": "2"}),
            MetricSample("dpkit_cex_requests_total", "negative counter", -1, {"card": "2"}, kind="counter"),
        ]


def test_vendor_samples_exported_and_bad_ones_dropped(kubelet, run_ops, scrape, metric):
    vendor = CountingVendor()
    manager = run_ops(vendor, metrics_address=LOCAL)
    port = metrics_of(manager).port
    samples = scrape(port)
    assert metric(samples, "dpkit_cex_requests_total", card="0") == 12
    assert metric(samples, "dpkit_cex_requests_total", card="1") == 3
    assert metric(samples, "dpkit_cex_temperature", card="0") == 41.5
    assert metric(samples, "dpkit_cex_temperature", slot="2") is None
    assert metric(samples, "dpkit_vendor_metric_errors_total") == 4
    vendor.fail = True
    samples = scrape(port)
    assert metric(samples, "dpkit_cex_requests_total", card="0") is None
    assert metric(samples, "dpkit_vendor_metric_errors_total") == 5
    assert metric(samples, "dpkit_devices", resource=RES, health="Healthy") == 4, "core metrics unaffected"


def test_port_in_use_keeps_the_plugin_running(kubelet, run_ops):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        manager = run_ops(ScriptedVendor(), metrics_address=f"127.0.0.1:{port}")
        assert kubelet.wait_for(lambda k: k.allocatable(RES) == 4, 10)
        status = manager.status()["metrics"]
        assert status["serving"] is False and "cannot listen" in status["error"]


def test_pod_resources_down_is_a_metric_not_a_failure(kubelet, run_ops, scrape, metric, short_tmp):
    manager = run_ops(ScriptedVendor(), metrics_address=LOCAL, pod_resources_socket=str(short_tmp / "none.sock"))
    samples = scrape(metrics_of(manager).port)
    assert metric(samples, "dpkit_pod_resources_up") == 0
    assert metric(samples, "dpkit_devices", resource=RES, health="Healthy") == 4


@pytest.mark.parametrize(("address", "expected"), [
    ("127.0.0.1:9400", ("127.0.0.1", 9400)),
    (":9400", ("0.0.0.0", 9400)),
    ("[::1]:0", ("::1", 0)),
])
def test_parse_address(address, expected):
    assert parse_address(address) == expected


@pytest.mark.parametrize("address", ["9400", "host:", "host:http", "::1:9400", "host:70000"])
def test_bad_address_is_a_config_error_naming_the_key(address):
    with pytest.raises(ConfigError, match="metrics_address"):
        parse_address(address)
    with pytest.raises(ConfigError, match="metrics_address"):
        Metrics(SimpleNamespace(), address)  # type: ignore[arg-type]
