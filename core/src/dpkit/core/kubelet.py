"""An in-process kubelet device manager, faithful to the real one, for tests and the demo.

It does what the kubelet's device manager does over the same sockets: serves ``Registration``
on ``kubelet.sock`` with the kubelet's validation, dials each plugin's endpoint, follows
ListAndWatch, keeps capacity (all devices) and allocatable (healthy devices), and allocates the
way the kubelet does: GetPreferredAllocation (when offered), Allocate, then PreStartContainer
(when required). :meth:`Kubelet.restart` wipes the plugin directory like a kubelet restart. It
also serves the pod-resources API so ``dpkit status`` can say which pod holds which device.

Vendor authors can use it to test their packages::

    with Kubelet(tmp_path / "plugins") as kubelet:
        ...start a Manager with plugin_dir=tmp_path / "plugins"...
        kubelet.wait_for(lambda k: k.allocatable("acme.com/widget") == 2)
        ids, response = kubelet.allocate("acme.com/widget", 1)
"""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from dpkit.core.api.podresources_v1 import api_pb2 as pr_pb2
from dpkit.core.api.podresources_v1 import api_pb2_grpc as pr_grpc
from dpkit.core.api.v1beta1 import api_pb2, api_pb2_grpc
from dpkit.core.errors import DpkitError, ValidationError
from dpkit.core.logs import get_logger, kv
from dpkit.core.validation import check_resource_name

log = get_logger("kubelet")
SUPPORTED_VERSIONS = ("v1beta1",)


class KubeletError(DpkitError):
    """What the kubelet would report as an admission or allocation failure."""


@dataclass
class DeviceState:
    health: str
    numa: tuple[int, ...]


@dataclass
class Endpoint:
    """A registered plugin as the kubelet sees it."""

    resource: str
    socket: Path
    options: api_pb2.DevicePluginOptions
    channel: grpc.Channel
    stub: api_pb2_grpc.DevicePluginStub
    devices: dict[str, DeviceState] = field(default_factory=dict)
    connected: bool = True
    updates: int = 0
    last_update: float = 0.0
    stream: Any = None


@dataclass
class Allocation:
    pod: str
    namespace: str
    container: str
    resource: str
    device_ids: tuple[str, ...]
    response: api_pb2.ContainerAllocateResponse


class _Registration(api_pb2_grpc.RegistrationServicer):
    def __init__(self, kubelet: Kubelet) -> None:
        self.kubelet = kubelet

    def Register(self, request: api_pb2.RegisterRequest, context: grpc.ServicerContext) -> api_pb2.Empty:
        try:
            self.kubelet._register(request)
        except KubeletError as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        return api_pb2.Empty()


class _PodResources(pr_grpc.PodResourcesListerServicer):
    def __init__(self, kubelet: Kubelet) -> None:
        self.kubelet = kubelet

    def List(self, request: Any, context: Any) -> pr_pb2.ListPodResourcesResponse:
        pods: dict[tuple[str, str], dict[str, list[Allocation]]] = {}
        for alloc in self.kubelet.allocations:
            pods.setdefault((alloc.namespace, alloc.pod), {}).setdefault(alloc.container, []).append(alloc)
        response = pr_pb2.ListPodResourcesResponse()
        for (namespace, pod), containers in sorted(pods.items()):
            entry = response.pod_resources.add(name=pod, namespace=namespace)
            for container, allocs in sorted(containers.items()):
                c = entry.containers.add(name=container)
                for alloc in allocs:
                    c.devices.add(resource_name=alloc.resource, device_ids=list(alloc.device_ids))
        return response

    def GetAllocatableResources(self, request: Any, context: Any) -> pr_pb2.AllocatableResourcesResponse:
        response = pr_pb2.AllocatableResourcesResponse()
        with self.kubelet._cond:
            for resource, ep in sorted(self.kubelet.endpoints.items()):
                for device_id, state in sorted(ep.devices.items()):
                    d = response.devices.add(resource_name=resource, device_ids=[device_id])
                    d.topology.nodes.extend(pr_pb2.NUMANode(ID=n) for n in state.numa)
        return response

    def Get(self, request: Any, context: Any) -> pr_pb2.GetPodResourcesResponse:
        for pod in self.List(pr_pb2.ListPodResourcesRequest(), context).pod_resources:
            if pod.name == request.pod_name and pod.namespace == request.pod_namespace:
                return pr_pb2.GetPodResourcesResponse(pod_resources=pod)
        context.abort(grpc.StatusCode.NOT_FOUND, f"pod {request.pod_namespace}/{request.pod_name} not found")
        raise AssertionError("unreachable")


class Kubelet:
    """The emulated kubelet. Thread-safe; every wait takes a timeout."""

    def __init__(self, plugin_dir: str | Path, *, pod_resources_socket: str | Path | None = None) -> None:
        self.plugin_dir = Path(plugin_dir)
        self.socket = self.plugin_dir / "kubelet.sock"
        self.pod_resources_socket = Path(pod_resources_socket) if pod_resources_socket else None
        self.endpoints: dict[str, Endpoint] = {}
        self.allocations: list[Allocation] = []
        self.registrations: list[tuple[float, str]] = []  # (time, resource), every Register seen
        self.rejections: list[str] = []
        self._cond = threading.Condition()
        self._server: grpc.Server | None = None
        self._pr_server: grpc.Server | None = None

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> Kubelet:
        """Wipe the plugin directory's contents and serve kubelet.sock, as the kubelet does at start."""
        self.plugin_dir.mkdir(parents=True, exist_ok=True)
        for entry in self.plugin_dir.iterdir():
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=8, thread_name_prefix="kubelet"))
        api_pb2_grpc.add_RegistrationServicer_to_server(_Registration(self), server)
        server.add_insecure_port(f"unix://{self.socket}")
        server.start()
        self._server = server
        if self.pod_resources_socket is not None and self._pr_server is None:
            self.pod_resources_socket.parent.mkdir(parents=True, exist_ok=True)
            self.pod_resources_socket.unlink(missing_ok=True)
            pr = grpc.server(futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="podres"))
            pr_grpc.add_PodResourcesListerServicer_to_server(_PodResources(self), pr)
            pr.add_insecure_port(f"unix://{self.pod_resources_socket}")
            pr.start()
            self._pr_server = pr
        return self

    def stop(self, *, pod_resources: bool = True) -> None:
        if self._server is not None:
            self._server.stop(0).wait(2)
            self._server = None
        with self._cond:
            endpoints = list(self.endpoints.values())
            self.endpoints.clear()
            self._cond.notify_all()
        for ep in endpoints:
            ep.connected = False
            if ep.stream is not None:
                ep.stream.cancel()
            ep.channel.close()
        self.socket.unlink(missing_ok=True)
        if pod_resources and self._pr_server is not None:
            self._pr_server.stop(0).wait(2)
            self._pr_server = None

    def restart(self) -> None:
        """A kubelet restart: connections dropped, plugin directory wiped, kubelet.sock recreated."""
        self.stop(pod_resources=False)
        self.start()

    def __enter__(self) -> Kubelet:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- registration ------------------------------------------------------------------------
    def _register(self, request: api_pb2.RegisterRequest) -> None:
        if request.version not in SUPPORTED_VERSIONS:
            self._reject(f"unsupported API version {request.version!r}; supported: {', '.join(SUPPORTED_VERSIONS)}")
        try:
            check_resource_name(request.resource_name)
        except ValidationError as exc:
            self._reject(f"invalid resource name: {exc}")
        if not request.endpoint or "/" in request.endpoint:
            self._reject(f"invalid endpoint {request.endpoint!r}: must be a socket file name in the plugin dir")
        socket = self.plugin_dir / request.endpoint
        channel = grpc.insecure_channel(f"unix://{socket}")
        stub = api_pb2_grpc.DevicePluginStub(channel)
        try:
            options = stub.GetDevicePluginOptions(api_pb2.Empty(), timeout=5)
        except grpc.RpcError as exc:
            channel.close()
            self._reject(f"cannot reach plugin at {socket}: {exc.code().name}")
        endpoint = Endpoint(request.resource_name, socket, options, channel, stub)
        with self._cond:
            old = self.endpoints.get(request.resource_name)
            self.endpoints[request.resource_name] = endpoint
            self.registrations.append((time.monotonic(), request.resource_name))
            self._cond.notify_all()
        if old is not None:  # the kubelet replaces an endpoint re-registering under the same name
            old.connected = False
            if old.stream is not None:
                old.stream.cancel()
            old.channel.close()
        follower = threading.Thread(target=self._follow, args=(endpoint,), name=f"law-{request.resource_name}",
                                    daemon=True)
        follower.start()
        log.debug("plugin registered", extra=kv(resource=request.resource_name, endpoint=request.endpoint))

    def _reject(self, message: str) -> None:
        self.rejections.append(message)
        raise KubeletError(message)

    def _follow(self, ep: Endpoint) -> None:
        try:
            ep.stream = ep.stub.ListAndWatch(api_pb2.Empty())
            for response in ep.stream:
                with self._cond:
                    ep.devices = {
                        d.ID: DeviceState(d.health, tuple(n.ID for n in d.topology.nodes)) for d in response.devices
                    }
                    ep.updates += 1
                    ep.last_update = time.monotonic()
                    self._cond.notify_all()
        except grpc.RpcError:
            pass
        finally:
            with self._cond:
                # The kubelet marks a disconnected plugin's devices unhealthy until it comes back.
                if self.endpoints.get(ep.resource) is ep:
                    ep.connected = False
                    for state in ep.devices.values():
                        state.health = "Unhealthy"
                self._cond.notify_all()

    # -- views -------------------------------------------------------------------------------
    def devices(self, resource: str) -> dict[str, DeviceState]:
        with self._cond:
            ep = self.endpoints.get(resource)
            return dict(ep.devices) if ep else {}

    def capacity(self, resource: str) -> int:
        return len(self.devices(resource))

    def allocatable(self, resource: str) -> int:
        return sum(1 for d in self.devices(resource).values() if d.health == "Healthy")

    def registered(self, resource: str) -> bool:
        with self._cond:
            ep = self.endpoints.get(resource)
            return bool(ep and ep.connected)

    def updates(self, resource: str) -> int:
        with self._cond:
            ep = self.endpoints.get(resource)
            return ep.updates if ep else 0

    def wait_for(self, predicate: Callable[[Kubelet], bool], timeout: float = 10.0) -> bool:
        """Block until ``predicate(self)`` holds (re-checked on every change); False on timeout."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                if predicate(self):
                    return True
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._cond.wait(min(remaining, 0.25))

    # -- allocation --------------------------------------------------------------------------
    def allocate(
        self, resource: str, count: int, *, pod: str = "pod", container: str = "main", namespace: str = "default"
    ) -> tuple[list[str], api_pb2.ContainerAllocateResponse]:
        """Admit a container asking for ``count`` devices, as the kubelet's device manager does."""
        with self._cond:
            ep = self.endpoints.get(resource)
            if ep is None or not ep.connected:
                raise KubeletError(f"resource {resource} has no registered, connected plugin")
            held = {i for a in self.allocations if a.resource == resource for i in a.device_ids}
            available = sorted(i for i, d in ep.devices.items() if d.health == "Healthy" and i not in held)
        if count > len(available):
            raise KubeletError(f"insufficient {resource}: requested {count}, available {len(available)}")
        chosen = available[:count]
        if ep.options.get_preferred_allocation_available:
            preferred = ep.stub.GetPreferredAllocation(
                api_pb2.PreferredAllocationRequest(container_requests=[
                    api_pb2.ContainerPreferredAllocationRequest(
                        available_deviceIDs=available, must_include_deviceIDs=[], allocation_size=count)
                ]),
                timeout=10,
            )
            answer = list(preferred.container_responses[0].deviceIDs)
            # the kubelet uses the plugin's choice only when it is a valid one
            if len(answer) == count and set(answer) <= set(available) and len(set(answer)) == count:
                chosen = answer
        response = ep.stub.Allocate(
            api_pb2.AllocateRequest(container_requests=[api_pb2.ContainerAllocateRequest(devices_ids=chosen)]),
            timeout=10,
        )
        if len(response.container_responses) != 1:
            raise KubeletError(f"plugin answered {len(response.container_responses)} containers for 1")
        if ep.options.pre_start_required:
            ep.stub.PreStartContainer(api_pb2.PreStartContainerRequest(devices_ids=chosen), timeout=30)
        container_response = response.container_responses[0]
        with self._cond:
            self.allocations.append(Allocation(pod, namespace, container, resource, tuple(chosen), container_response))
            self._cond.notify_all()
        return chosen, container_response

    def release(self, pod: str, namespace: str = "default") -> None:
        """The pod ended: its devices become available again."""
        with self._cond:
            self.allocations = [a for a in self.allocations if (a.pod, a.namespace) != (pod, namespace)]
            self._cond.notify_all()

    def stub(self, resource: str) -> api_pb2_grpc.DevicePluginStub:
        """The raw client the kubelet holds, for tests that send hand-made requests."""
        with self._cond:
            ep = self.endpoints.get(resource)
        if ep is None:
            raise KubeletError(f"resource {resource} is not registered")
        return ep.stub
