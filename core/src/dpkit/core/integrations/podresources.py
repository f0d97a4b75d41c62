"""Which pod and container holds each device, from the kubelet's pod-resources API (v1).

The kubelet serves ``List`` (devices assigned to running containers) and
``GetAllocatableResources`` (devices it can hand out) on
``/var/lib/kubelet/pod-resources/kubelet.sock``. Each question opens a fresh channel with a
short deadline: a restarted kubelet recreates the socket, and a stale channel would sit in
gRPC's reconnect backoff. Nothing the kubelet says is used for decisions, only shown.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from dpkit.core.api.podresources_v1 import api_pb2 as pr_pb2
from dpkit.core.api.podresources_v1 import api_pb2_grpc as pr_grpc
from dpkit.core.engine.state import PluginState, StatusFields
from dpkit.core.support.logs import get_logger, kv
from dpkit.core.vendorapi.errors import DpkitError

log = get_logger("podresources")
MAX_FIELD = 253  # longest pod/namespace/container name Kubernetes allows


class PodResourcesError(DpkitError):
    """The kubelet's pod-resources API could not answer."""


@dataclass(frozen=True, order=True)
class Holder:
    """A container that holds a device."""

    namespace: str
    pod: str
    container: str

    def __str__(self) -> str:
        return f"{self.namespace}/{self.pod}/{self.container}"


def _text(value: str) -> str:
    """Names from the kubelet end up in tables and metric labels: printable and bounded."""
    return "".join(c if c.isprintable() else "?" for c in value[:MAX_FIELD])


class PodResourcesClient:
    """A client for the two v1 calls dpkit needs."""

    def __init__(self, socket_path: str | Path, timeout: float = 1.0) -> None:
        self.socket_path = Path(socket_path)
        self.timeout = timeout

    def _call(self, method: str, request: Any) -> Any:
        if not self.socket_path.exists():
            raise PodResourcesError(f"pod-resources socket {self.socket_path} does not exist: is "
                                    "/var/lib/kubelet/pod-resources mounted into the pod?")
        with grpc.insecure_channel(f"unix://{self.socket_path}") as channel:
            stub = pr_grpc.PodResourcesListerStub(channel)
            try:
                return getattr(stub, method)(request, timeout=self.timeout)
            except grpc.RpcError as exc:
                code = exc.code()
                detail = exc.details()
                hint = (" (the kubelet does not offer it: feature gate or version too old)"
                        if code == grpc.StatusCode.UNIMPLEMENTED else "")
                raise PodResourcesError(f"pod-resources {method} at {self.socket_path} failed: "
                                        f"{code.name}: {detail}{hint}") from None

    def holders(self, resources: Iterable[str] | None = None) -> dict[str, dict[str, list[Holder]]]:
        """resource -> device ID -> containers holding it (init and app containers may share one)."""
        wanted = None if resources is None else set(resources)
        response = self._call("List", pr_pb2.ListPodResourcesRequest())
        out: dict[str, dict[str, list[Holder]]] = {}
        for pod in response.pod_resources:
            for container in pod.containers:
                holder = Holder(_text(pod.namespace), _text(pod.name), _text(container.name))
                for devices in container.devices:
                    if wanted is not None and devices.resource_name not in wanted:
                        continue
                    per_device = out.setdefault(devices.resource_name, {})
                    for device_id in devices.device_ids:
                        per_device.setdefault(_text(device_id), []).append(holder)
        for per_device in out.values():
            for holders in per_device.values():
                holders.sort()
        return out

    def allocatable(self) -> dict[str, set[str]]:
        """resource -> device IDs the kubelet can hand out."""
        response = self._call("GetAllocatableResources", pr_pb2.AllocatableResourcesRequest())
        out: dict[str, set[str]] = {}
        for devices in response.devices:
            out.setdefault(devices.resource_name, set()).update(_text(i) for i in devices.device_ids)
        return out


class PodResourcesView:
    """Observer adding who-holds-what to ``dpkit status`` (and, through it, to the metrics).

    Asked on demand, so answers are fresh; a failing kubelet API is logged once per distinct
    error, so it shows among the status's recent warnings.
    """

    def __init__(self, socket_path: str | Path, timeout: float = 1.0) -> None:
        self.client = PodResourcesClient(socket_path, timeout)
        self.last_error = ""
        self._lock = threading.Lock()

    def holders(self, resources: Iterable[str]) -> dict[str, dict[str, list[Holder]]] | None:
        """Holders of our resources' devices, or None when the kubelet cannot say."""
        try:
            result = self.client.holders(resources)
        except PodResourcesError as exc:
            self._error(str(exc))
            return None
        self._error("")
        return result

    def _error(self, message: str) -> None:
        with self._lock:
            if message and message != self.last_error:
                log.warning("cannot tell which pods hold the devices", extra=kv(error=message))
            elif not message and self.last_error:
                log.info("pod-resources API answering again")
            self.last_error = message

    def publish(self, state: PluginState) -> None:
        """Nothing to keep: holders are asked when a status or a scrape wants them."""

    def close(self) -> None:
        """Nothing to release: every question opens and closes its own channel."""

    def status_fields(self, state: PluginState) -> StatusFields:
        resources = list(state.resources)
        found = self.holders(resources)
        kubelet_sees: dict[str, int] = {}
        if found is not None:
            try:
                allocatable = self.client.allocatable()
                kubelet_sees = {r: len(allocatable.get(r, ())) for r in resources}
            except PodResourcesError as exc:  # optional in older kubelets; List still answered
                log.debug("GetAllocatableResources unavailable", extra=kv(error=str(exc)))
        return {"pod_resources": {
            "socket": str(self.client.socket_path),
            "ok": found is not None,
            "error": self.last_error,
            "kubelet_allocatable": kubelet_sees,
            "holders": {r: {d: ", ".join(str(h) for h in hs) for d, hs in sorted(devs.items())}
                        for r, devs in (found or {}).items()},
        }}
