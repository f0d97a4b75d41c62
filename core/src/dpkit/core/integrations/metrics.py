"""Prometheus metrics on ``metrics_address`` (``host:port``; port 0 picks a free one).

RPC counters and the latency histogram are updated as RPCs are served. Everything else (devices,
health, registrations, probes, pod holders) is computed at scrape time from a PluginState the
manager builds for that scrape (or the last one published, when its loop does not answer), so it
never goes stale and a vanished device leaves no series behind. Registration and probe counters
are the state's own counts: they start over when a resource or probe comes back, which Prometheus
reads as a counter reset. Vendor samples (:meth:`Vendor.metric_samples`) are collected at scrape time too; a
failing or malformed vendor sample is dropped and counted, never fatal. docs/operations.md
lists every metric.
"""

from __future__ import annotations

import math
import re
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from dpkit.core.engine.state import PluginState, StatusFields
from dpkit.core.engine.vendor_calls import VendorCalls, VendorTimeout
from dpkit.core.support.config import parse_address
from dpkit.core.support.logs import get_logger, kv
from dpkit.core.vendorapi.vendor import MetricSample

if TYPE_CHECKING:
    from dpkit.core.integrations.podresources import PodResourcesView

log = get_logger("metrics")

_METRIC_NAME = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")
_LABEL_NAME = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


def check_sample(sample: MetricSample, reserved: Iterable[str]) -> None:
    """Raise ValueError unless a vendor sample can be exported as is."""
    if not isinstance(sample, MetricSample):
        raise ValueError(f"expected a MetricSample, got {type(sample).__name__}")
    if not _METRIC_NAME.match(sample.name) or sample.name.startswith("__"):
        raise ValueError(f"metric name {sample.name!r} is not a valid Prometheus name")
    if sample.name.removesuffix("_total") in {r.removesuffix("_total") for r in reserved}:
        raise ValueError(f"metric name {sample.name!r} belongs to the core")
    if sample.kind not in ("gauge", "counter"):
        raise ValueError(f"metric {sample.name}: kind must be 'gauge' or 'counter', got {sample.kind!r}")
    for label in sample.labels:
        if not _LABEL_NAME.match(label) or label.startswith("__"):
            raise ValueError(f"metric {sample.name}: label name {label!r} is not valid")
    if isinstance(sample.value, bool) or not isinstance(sample.value, int | float):
        raise ValueError(f"metric {sample.name}: value {sample.value!r} is not a number")
    if sample.kind == "counter" and (math.isnan(sample.value) or sample.value < 0):
        raise ValueError(f"metric {sample.name}: a counter cannot be {sample.value}")


class Metrics:
    """Observer exporting the core's metrics, the vendor's, and who holds each device."""

    def __init__(self, calls: VendorCalls, address: str, *, source: Callable[[], PluginState] | None = None,
                 pod_view: PodResourcesView | None = None) -> None:
        self.calls = calls
        self.source = source  # a fresh state per scrape; without it, the last one published
        self.pod_view = pod_view
        self._state: PluginState | None = None
        self.host, port = parse_address(address)
        self.registry = CollectorRegistry(auto_describe=False)
        # first, so the error counter a scrape bumps is exported in that same scrape
        self.registry.register(_StateCollector(self))
        self.allocations = Counter("dpkit_allocations", "Successful Allocate calls.", ["resource"],
                                   registry=self.registry)
        self.rpc_errors = Counter("dpkit_rpc_errors", "Failed device-plugin RPCs (Allocate, ListAndWatch, "
                                  "GetPreferredAllocation, PreStartContainer).", ["resource", "method"],
                                  registry=self.registry)
        self.rpc_seconds = Histogram("dpkit_rpc_duration_seconds", "Time to answer a unary device-plugin RPC.",
                                     ["resource", "method"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.list_and_watch_updates = Counter("dpkit_list_and_watch_updates", "Device lists sent on "
                                              "ListAndWatch streams.", ["resource"], registry=self.registry)
        self.vendor_errors = Counter("dpkit_vendor_metric_errors", "Vendor metric samples dropped, or "
                                     "metric_samples() calls that failed.", registry=self.registry)
        self.reserved = {"dpkit_allocations", "dpkit_rpc_errors", "dpkit_rpc_duration_seconds",
                         "dpkit_list_and_watch_updates", "dpkit_registrations", "dpkit_kubelet_restarts",
                         "dpkit_probe_heartbeats", "dpkit_probe_restarts", "dpkit_vendor_metric_errors",
                         *_StateCollector.NAMES}
        self._vendor_problems: set[str] = set()
        self.error = ""
        self.port = port
        self._server: Any = None
        self._thread: threading.Thread | None = None
        try:
            self._server, self._thread = start_http_server(port, self.host, registry=self.registry)
            self.port = int(self._server.server_port)
            log.info("metrics endpoint listening", extra=kv(address=f"{self.host}:{self.port}"))
        except OSError as exc:  # serving devices matters more than serving metrics
            self.error = f"cannot listen on {address}: {exc.strerror or exc}"
            log.error("metrics endpoint not started; devices are still served", extra=kv(error=self.error))

    # -- observer hooks ------------------------------------------------------------------------
    def rpc(self, resource: str, method: str, seconds: float, ok: bool) -> None:
        if not ok:
            self.rpc_errors.labels(resource, method).inc()
        if method == "ListAndWatch":
            if ok:
                self.list_and_watch_updates.labels(resource).inc()
            return
        self.rpc_seconds.labels(resource, method).observe(seconds)
        if ok and method == "Allocate":
            self.allocations.labels(resource).inc()

    def publish(self, state: PluginState) -> None:
        """Keep the newest state for scrapes when no fresh one can be had."""
        self._state = state

    def state(self) -> PluginState | None:
        """A fresh state for a scrape (on the HTTP server's thread), else the last one published."""
        if self.source is not None:
            try:
                return self.source()
            except Exception as exc:
                log.warning("no fresh state for this scrape; using the last one published", extra=kv(error=str(exc)))
        return self._state

    def status_fields(self, state: PluginState) -> StatusFields:
        return {"metrics": {"address": f"{self.host}:{self.port}", "serving": self._server is not None,
                            "error": self.error}}

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(5)

    # -- scrape side -------------------------------------------------------------------------
    def vendor_families(self) -> list[Metric]:
        try:
            samples = self.calls.metric_samples()
        except Exception as exc:
            self.vendor_errors.inc()
            if not isinstance(exc, VendorTimeout):  # a timeout is logged by the adapter
                self.calls.report("metric_samples", exc, "vendor metric_samples failed; its metrics are left out")
            self._vendor_problem(f"metric_samples() failed: {type(exc).__name__}: {exc}")
            return []
        families: dict[str, tuple[GaugeMetricFamily | CounterMetricFamily, tuple[str, ...], str]] = {}
        for sample in samples:
            try:
                check_sample(sample, self.reserved)
                names = tuple(sorted(sample.labels))
                family = families.get(sample.name)
                if family is None:
                    maker = CounterMetricFamily if sample.kind == "counter" else GaugeMetricFamily
                    family = (maker(sample.name, sample.help or sample.name, labels=names), names, sample.kind)
                    families[sample.name] = family
                elif family[1] != names or family[2] != sample.kind:
                    raise ValueError(f"metric {sample.name}: every sample needs the same kind and label names")
                family[0].add_metric([str(sample.labels[n]) for n in names], float(sample.value))
            except ValueError as exc:
                self.vendor_errors.inc()
                self._vendor_problem(str(exc))
        return [f for f, _, _ in families.values()]

    def _vendor_problem(self, problem: str) -> None:
        if problem not in self._vendor_problems:  # once per distinct problem, not once per scrape
            self._vendor_problems.add(problem)
            log.warning("vendor metric dropped", extra=kv(problem=problem))


class _StateCollector:
    """Gauges computed at scrape time."""

    NAMES = ("dpkit_info", "dpkit_vendor_call_errors", "dpkit_devices", "dpkit_device_healthy",
             "dpkit_resource_registered", "dpkit_probe_silent", "dpkit_device_allocated", "dpkit_pod_resources_up",
             "dpkit_resource_server_failures", "dpkit_health_reports", "dpkit_registrations",
             "dpkit_kubelet_restarts", "dpkit_probe_heartbeats", "dpkit_probe_restarts")

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        m = self.metrics
        state = m.state()
        if state is not None:
            yield from self._state_families(state)
            if m.pod_view is not None:
                yield from self._holders(m.pod_view, state)
        yield from m.vendor_families()
        # after the vendor's families: a metric_samples failure of this scrape is counted in it
        calls = CounterMetricFamily("dpkit_vendor_call_errors", "Vendor hook calls that raised ('error') or did not "
                                    "answer within vendor_call_timeout ('timeout'), by hook.", labels=["hook", "kind"])
        for (hook, kind), n in sorted(dict(m.calls.errors).items()):  # a copy: thread-safe
            calls.add_metric([hook, kind], n)
        yield calls

    @staticmethod
    def _state_families(state: PluginState) -> Iterator[Metric]:
        info = GaugeMetricFamily("dpkit_info", "The vendor this plugin serves.", labels=["vendor"])
        info.add_metric([state.vendor], 1)
        yield info
        count = GaugeMetricFamily("dpkit_devices", "Devices advertised, by health.", labels=["resource", "health"])
        healthy = GaugeMetricFamily("dpkit_device_healthy", "1 when the device is Healthy, 0 when not "
                                    "(see dpkit status for the reason).", labels=["resource", "device"])
        registered = GaugeMetricFamily("dpkit_resource_registered", "1 while the resource is registered "
                                       "with the current kubelet.", labels=["resource"])
        registrations = CounterMetricFamily("dpkit_registrations", "Successful registrations with the kubelet.",
                                            labels=["resource"])
        for resource, served in state.resources.items():
            ok = served.allocatable
            count.add_metric([resource, "Healthy"], ok)
            count.add_metric([resource, "Unhealthy"], served.capacity - ok)
            for device in served.devices:
                healthy.add_metric([resource, device.id], 1 if device.healthy else 0)
            registered.add_metric([resource], 1 if served.serving.registered else 0)
            registrations.add_metric([resource], served.serving.registrations)
        yield from (count, healthy, registered, registrations)
        restarts = CounterMetricFamily("dpkit_kubelet_restarts", "Kubelet restarts seen (kubelet.sock recreated).")
        restarts.add_metric([], state.kubelet.restarts_seen)
        yield restarts
        silent = GaugeMetricFamily("dpkit_probe_silent", "1 while a health probe is silent (its devices are "
                                   "marked Unhealthy).", labels=["probe"])
        beats = CounterMetricFamily("dpkit_probe_heartbeats", "Heartbeats received from health probes.",
                                    labels=["probe"])
        probe_restarts = CounterMetricFamily("dpkit_probe_restarts", "Health probe processes restarted after "
                                             "falling silent or dying.", labels=["probe"])
        for probe in sorted(state.probes, key=lambda p: p.name):
            silent.add_metric([probe.name], 1 if probe.silent else 0)
            beats.add_metric([probe.name], probe.heartbeats)
            probe_restarts.add_metric([probe.name], probe.restarts)
        yield from (silent, beats, probe_restarts)
        failing = GaugeMetricFamily("dpkit_resource_server_failures", "Consecutive failed attempts to start a "
                                    "resource's gRPC server (retried with backoff; 0 once it serves).",
                                    labels=["resource"])
        for resource, failure in state.server_failures.items():
            failing.add_metric([resource], failure.attempts)
        yield failing
        reports = CounterMetricFamily("dpkit_health_reports", "Health reports from in-process watchers; "
                                      "'coalesced' were replaced by a newer report before the manager read them.",
                                      labels=["outcome"])
        reports.add_metric(["received"], state.health.reports)
        reports.add_metric(["coalesced"], state.health.coalesced)
        yield reports

    @staticmethod
    def _holders(view: PodResourcesView, state: PluginState) -> Iterator[Metric]:
        found = view.holders(state.resources)
        up = GaugeMetricFamily("dpkit_pod_resources_up", "1 when the kubelet's pod-resources API answered.")
        up.add_metric([], 0 if found is None else 1)
        yield up
        allocated = GaugeMetricFamily("dpkit_device_allocated", "1 for each container holding a device.",
                                      labels=["resource", "device", "namespace", "pod", "container"])
        for resource, per_device in sorted((found or {}).items()):
            for device_id, holders in sorted(per_device.items()):
                for h in holders:
                    allocated.add_metric([resource, device_id, h.namespace, h.pod, h.container], 1)
        yield allocated
