"""The NVIDIA vendor: wires discovery, container specs, allocation policy, health and diagnostics.

Config: the ``vendor:`` section (see :mod:`dpkit.nvidia.config`) plus NVIDIA's own config file
and environment variables, so an existing NVIDIA device-plugin deployment keeps its settings.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace
from typing import Any

from dpkit.core import (
    AllocationError,
    Check,
    ContainerSpec,
    Device,
    Finding,
    MetricSample,
    Probe,
    Snapshot,
    Vendor,
    VendorError,
    get_logger,
    kv,
)
from dpkit.nvidia import diagnostics, inventory, mps, nodeinfo, sharing, spec, topology
from dpkit.nvidia.config import Settings, load_settings
from dpkit.nvidia.guard import Hung
from dpkit.nvidia.remote import RemoteReader

log = get_logger("nvidia")
CDI_SPEC_VENDOR = "dpkit.io"
HEALTH_PROBE = "nvml-health"
HEALTH_TARGET = "dpkit.nvidia.health:run"


class NvidiaVendor(Vendor):
    """NVIDIA GPUs (whole, MIG, time-sliced) through NVML.

    This process never loads the driver library: discovery runs in a subprocess
    (:class:`~dpkit.nvidia.remote.RemoteReader`), health in the probe process; everything here
    works on their plain answers (:mod:`dpkit.nvidia.nodeinfo`).
    """

    name = "nvidia"
    description = "NVIDIA GPUs through NVML; reads NVIDIA device-plugin config files and env"

    def __init__(self, config: Mapping[str, Any] | None = None, environ: Mapping[str, str] | None = None) -> None:
        super().__init__(config)
        self.settings: Settings = load_settings(self.config, environ)
        self.poll_interval = self.settings.poll_interval
        library = nodeinfo.library_path(self.settings.nvml_library, self.settings.driver_root)
        self.reader = RemoteReader(library, self.settings.sysfs_root, self.settings.nvml_timeout,
                                   self.settings.discovery_timeout)
        self._lock = threading.Lock()
        self._inventory: inventory.Inventory | None = None
        self._topology = topology.Topology((), ())
        self._nvml_error: nodeinfo.NvmlUnavailable | None = None
        self._failures = 0
        self._quiet = False  # discovery for explain/doctor: they print the reason themselves
        for note in self.settings.notes:
            log.info(note, extra=kv(source=self.settings.source))
        for warning in self.settings.warnings:
            log.warning(warning, extra=kv(source=self.settings.source))

    # -- discovery -------------------------------------------------------------------------
    def discover(self) -> Snapshot:
        """Every resource and device; when NVML fails after having worked, raise to keep the last list."""
        try:
            node = self.reader.read(topology=True)
        except nodeinfo.NvmlUnavailable as exc:
            self._nvml_error = exc
            return self._unavailable(diagnostics.unavailable_finding(exc))
        except Hung as exc:
            return self._unavailable(Finding("NVML", False, f"NVML hangs: {exc}",
                                             hint="the driver or a GPU is wedged; check dmesg for Xid errors"))
        except nodeinfo.NvmlQueryFailed as exc:
            return self._unavailable(Finding("NVML", False, str(exc)))
        except VendorError as exc:  # the discovery subprocess failed without an answer
            return self._unavailable(Finding("NVML", False, str(exc),
                                             hint="run `dpkit discover nvidia` on the node to see the error"))
        self._nvml_error = None
        built = inventory.build(self.settings, node)
        if self.settings.mps:
            built = replace(built, snapshot=mps.apply_daemon_health(self.settings, built.snapshot))
        if not node.gpus:
            built = replace(built, findings=(*built.findings, diagnostics.no_gpu_finding()))
        with self._lock:
            previous, self._inventory = self._inventory, built
            self._topology = topology.build(node.gpus, node.pcie)
        _log_changes(previous, built)
        return built.snapshot

    def _unavailable(self, finding: Finding) -> Snapshot:
        self._failures += 1
        with self._lock:
            had_gpus = self._inventory is not None and bool(self._inventory.gpus)
            if had_gpus:
                assert self._inventory is not None
                self._inventory = inventory.Inventory(self._inventory.snapshot, (finding,), self._inventory.gpus)
            else:
                self._inventory = inventory.empty(self.settings, (finding,))
            snapshot = self._inventory.snapshot
        if had_gpus:
            raise VendorError(f"{finding.subject}: {finding.reason}")
        if not self._quiet:
            log.warning("no GPUs advertised", extra=kv(reason=finding.reason, hint=finding.hint))
        return snapshot

    # -- allocation ---------------------------------------------------------------------------
    def container_spec(self, resource: str, devices: Sequence[Device]) -> ContainerSpec:
        """NVIDIA's answer; more than one replica fails under MPS always, under time-slicing when
        ``failRequestsGreaterThanOne`` says so, with NVIDIA's message."""
        limited = self.settings.fail_requests_greater_than_one
        if limited and len(devices) > 1 and any(sharing.is_replica(d.id) for d in devices):
            raise AllocationError(f'invalid allocation request for "{resource}": invalid request: maximum request '
                                  f"size for shared resources is 1; found {len(devices)}")
        with self._lock:
            channels = self._inventory.imex_channels if self._inventory else ()
        return spec.container_spec(self.settings, devices, resource, channels)

    def preferred_allocation(
        self, resource: str, available: Sequence[Device], must_include: Sequence[Device], size: int
    ) -> Sequence[str] | None:
        """Replicas: spread over GPUs as NVIDIA does. Whole GPUs: the best-connected set. MIG: NUMA packing."""
        if any(sharing.is_replica(d.id) for d in available):
            with self._lock:
                current = self._inventory.snapshot.get(resource, ()) if self._inventory else ()
            all_ids = [d.id for d in current] or [d.id for d in available]
            return sharing.distributed(all_ids, [d.id for d in available], [d.id for d in must_include], size,
                                       self.settings.allocation_policy)
        if any("mig_profile" in d.attributes for d in available):
            return None
        with self._lock:
            topo = self._topology
        return preferred_gpus(topo, available, must_include, size)

    # -- health -------------------------------------------------------------------------------
    def probes(self) -> Sequence[Probe]:
        if not self.settings.xids.probe_wanted:
            log.info("health checks disabled by DP_DISABLE_HEALTHCHECKS=all")
            return ()
        config = json.loads(json.dumps({"vendor": dict(self.config)}, default=str))
        return (Probe(HEALTH_PROBE, HEALTH_TARGET, config),)

    # -- diagnostics ----------------------------------------------------------------------------
    def _current(self) -> inventory.Inventory:
        with self._lock:
            current = self._inventory
        if current is None:
            self._quiet = True  # `dpkit discover` / `doctor` print the finding; a log line would say it twice
            try:
                self.discover()
            except Exception as exc:  # explain and doctor must report, not fail
                log.debug("discovery for diagnostics failed", extra=kv(error=str(exc)))
            finally:
                self._quiet = False
            with self._lock:
                current = self._inventory
        return current or inventory.empty(self.settings, ())

    def explain(self) -> Iterable[Finding]:
        current = self._current()
        s = self.settings
        summary = (f"driver {current.driver or '?'}, CUDA {current.cuda or '?'}, {len(current.gpus)} GPU(s); "
                   f"migStrategy {s.mig_strategy}, deviceListStrategy {','.join(s.list_strategies)}, "
                   f"deviceIDStrategy {s.id_strategy}, config {s.source}")
        findings = [Finding("nvidia", bool(current.gpus), summary)]
        findings += [Finding("config", True, note) for note in s.notes]
        findings += [Finding("config", False, warning) for warning in s.warnings]
        findings += current.findings
        return findings

    def doctor(self) -> Iterable[Check]:
        current = self._current()
        return diagnostics.checks(self.settings, current.gpus, self._nvml_error)

    def node_labels(self, snapshot: Snapshot) -> Mapping[str, str]:
        with self._lock:
            current = self._inventory
        if current is None or not current.gpus:
            return {}
        first = current.gpus[0]
        labels = {
            "nvidia.com/gpu.present": "true",
            "nvidia.com/gpu.count": str(len(current.gpus)),
            "nvidia.com/gpu.product": _label(first.name.replace(" ", "-")),
            "nvidia.com/gpu.memory": str(first.memory >> 20),
            "nvidia.com/mig.strategy": self.settings.mig_strategy,
            "nvidia.com/mig.capable": "true" if all(g.mig_capable for g in current.gpus) else "false",
            "nvidia.com/gpu.sharing-strategy": self.settings.sharing_strategy,
        }
        if self.settings.shared:
            labels["nvidia.com/gpu.replicas"] = str(max(s.replicas for s in self.settings.shared))
        for key, value in zip(("major", "minor", "rev"), current.driver.split("."), strict=False):
            labels[f"nvidia.com/cuda.driver.{key}"] = _label(value)
        for key, value in zip(("major", "minor"), current.cuda.split("."), strict=False):
            labels[f"nvidia.com/cuda.runtime.{key}"] = _label(value)
        return {k: v for k, v in labels.items() if v}

    def metric_samples(self) -> Iterable[MetricSample]:
        with self._lock:
            gpus = self._inventory.gpus if self._inventory else ()
        yield MetricSample("dpkit_nvidia_gpus", "GPUs NVML reports, by whether they can be read",
                           sum(1 for g in gpus if not g.problem), {"state": "ok"})
        yield MetricSample("dpkit_nvidia_gpus", "GPUs NVML reports, by whether they can be read",
                           sum(1 for g in gpus if g.problem), {"state": "problem"})
        yield MetricSample("dpkit_nvidia_discovery_failures_total", "Discoveries that could not use NVML",
                           self._failures, kind="counter")

    def cdi_kind(self, resource: str) -> str:
        """The kind of the spec file the core writes (``cdi_dir``): ``dpkit.io/nvidia.<name>``.

        Not ``nvidia.com/gpu``: that kind belongs to the spec the NVIDIA container toolkit
        generates (driver libraries, hooks), which the ``cdi-*`` strategies name; a second spec
        of the same kind with the same device names would conflict in the runtime's CDI registry.
        """
        return f"{CDI_SPEC_VENDOR}/nvidia.{resource.partition('/')[2]}"

    def close(self) -> None:
        self.reader.close()


def preferred_gpus(topo: topology.Topology, available: Sequence[Device], must_include: Sequence[Device],
                   size: int) -> list[str]:
    """The best-connected ``size`` whole GPUs; GPUs missing from the topology score zero."""
    position = topo.position()
    ids = [d.id for d in available]
    for d in must_include:
        if d.id not in ids:
            ids.append(d.id)
    uuid_of = {d.id: d.attributes.get("uuid", d.id) for d in (*available, *must_include)}
    n = len(ids)
    scores = [[0] * n for _ in range(n)]
    for a in range(n):
        pa = position.get(uuid_of[ids[a]])
        for b in range(a + 1, n):
            pb = position.get(uuid_of[ids[b]])
            if pa is not None and pb is not None:
                scores[a][b] = scores[b][a] = topo.scores[pa][pb]
    must = [ids.index(d.id) for d in must_include]
    chosen = topology.choose(scores, list(range(n)), must, size)
    return [ids[i] for i in chosen]


def _label(value: str) -> str:
    """A valid label value: alphanumerics, '-', '_', '.', at most 63, alphanumeric at both ends."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]", "-", value)[:63]
    return cleaned.strip("-_.")


def _log_changes(previous: inventory.Inventory | None, current: inventory.Inventory) -> None:
    """One line per GPU that went bad or came back since the last discovery."""
    before = {g.uuid: g for g in previous.gpus} if previous else {}
    for gpu in current.gpus:
        old = before.get(gpu.uuid)
        if gpu.problem and (old is None or old.problem != gpu.problem):
            log.warning("GPU unusable", extra=kv(gpu=gpu.uuid, index=gpu.index, why=gpu.problem))
        elif old is not None and old.problem and not gpu.problem:
            log.info("GPU answers NVML again; its devices are Healthy again", extra=kv(
                gpu=gpu.uuid, index=gpu.index, was=old.problem))
