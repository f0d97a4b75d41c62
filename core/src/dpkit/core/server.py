"""One resource's DevicePlugin gRPC server on a unix socket in the kubelet's plugin directory.

The server holds the resource's current device list. ListAndWatch sends the whole list at once,
then the newest list after every change; each stream waits on its own, so a slow or vanished
kubelet connection never delays another. Allocate checks every ID before asking the vendor for
the container spec.
"""

from __future__ import annotations

import os
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent import futures
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

import grpc

from dpkit.core.allocation import is_valid_choice, pack_numa
from dpkit.core.api.v1beta1 import api_pb2, api_pb2_grpc
from dpkit.core.device import ContainerSpec, Device
from dpkit.core.errors import ValidationError
from dpkit.core.files import remove_own_socket, staging_dir
from dpkit.core.logs import get_logger, kv
from dpkit.core.validation import socket_name_for
from dpkit.core.vendor import Vendor

log = get_logger("server")

WORKERS = 16
MAX_STREAMS = 8  # the kubelet holds one; the rest are debugging clients and restarts in flight
MAX_LISTED_IDS = 10  # IDs named in one error message


_T = TypeVar("_T")


class VendorTimeout(Exception):
    """A vendor hook did not answer within the server's deadline."""


class RpcObserver(Protocol):
    """Receives one call per RPC served (the metrics module implements it)."""

    def rpc(self, resource: str, method: str, seconds: float, ok: bool) -> None: ...


@dataclass
class ServerStats:
    allocations: int = 0
    allocate_errors: int = 0
    list_and_watch_sends: int = 0
    open_streams: int = 0
    last_error: str = ""
    allocated_ids: dict[str, float] = field(default_factory=dict)  # id -> time of last Allocate


def spec_to_response(spec: ContainerSpec, cdi_only: bool = False) -> api_pb2.ContainerAllocateResponse:
    """The kubelet's view of a container spec.

    With ``cdi_only`` device nodes and mounts are left to the CDI names; env stays, because CDI
    cannot merge device-list variables across devices (see :mod:`dpkit.core.cdi`).
    """
    response = api_pb2.ContainerAllocateResponse()
    response.cdi_devices.extend(api_pb2.CDIDevice(name=n) for n in spec.cdi_devices)
    response.annotations.update(spec.annotations)
    response.envs.update(spec.env)
    if cdi_only:
        return response
    response.mounts.extend(
        api_pb2.Mount(container_path=m.container_path, host_path=m.host_path, read_only=m.read_only)
        for m in spec.mounts
    )
    response.devices.extend(
        api_pb2.DeviceSpec(container_path=d.container_path, host_path=d.host_path, permissions=d.permissions)
        for d in spec.devices
    )
    return response


def _listing(ids: Sequence[str]) -> str:
    """IDs for an error message: a request can carry anything, so bound count and length."""
    shown = ", ".join(i if len(i) <= 80 else i[:77] + "..." for i in ids[:MAX_LISTED_IDS])
    return shown + (f" and {len(ids) - MAX_LISTED_IDS} more" if len(ids) > MAX_LISTED_IDS else "")


def device_to_proto(device: Device) -> api_pb2.Device:
    proto = api_pb2.Device(ID=device.id, health=str(device.health))
    if device.numa_nodes:
        proto.topology.nodes.extend(api_pb2.NUMANode(ID=n) for n in device.numa_nodes)
    return proto


class ResourceServer(api_pb2_grpc.DevicePluginServicer):
    """Serves one extended resource; the manager feeds it device lists through :meth:`update`."""

    def __init__(
        self,
        resource: str,
        vendor: Vendor,
        plugin_dir: str | Path,
        *,
        observer: RpcObserver | None = None,
        cdi_spec: Callable[[str, Sequence[Device]], ContainerSpec] | None = None,
        cdi_allocate: bool = False,
        vendor_timeout: float = 10.0,
    ) -> None:
        self.resource = resource
        self.vendor = vendor
        self.plugin_dir = Path(plugin_dir)
        self.socket_path = self.plugin_dir / socket_name_for(resource)
        self.observer = observer
        self.cdi_spec = cdi_spec
        self.cdi_allocate = cdi_allocate
        self.vendor_timeout = vendor_timeout
        # Vendor hooks run here, under a deadline: the kubelet calls Allocate without one, so a
        # hung driver call would otherwise stall pod admission forever.
        self._calls = futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix=f"vendor-{resource}")
        self.stats = ServerStats()
        self._devices: dict[str, Device] = {}
        self._version = 0
        self._changed = threading.Condition()
        self._server: grpc.Server | None = None
        self._stopping = False
        self._generation = 0  # bumped on every (re)start so old streams end

    # -- state ---------------------------------------------------------------------------
    @property
    def devices(self) -> tuple[Device, ...]:
        with self._changed:
            return tuple(self._devices.values())

    def update(self, devices: Sequence[Device]) -> bool:
        """Replace the device list; streams are woken only when something the kubelet sees changed."""
        new = {d.id: d for d in devices}
        with self._changed:
            before = [(d.id, d.health, d.numa_nodes) for d in self._devices.values()]
            after = [(d.id, d.health, d.numa_nodes) for d in new.values()]
            self._devices = new
            if before == after:
                return False
            self._version += 1
            self._changed.notify_all()
            return True

    def patch(self, devices: Sequence[Device]) -> bool:
        """Replace some devices (by ID) in place: cost proportional to the change, not the list."""
        with self._changed:
            visible = False
            for device in devices:
                old = self._devices.get(device.id)
                if old is None:
                    continue  # only a full update adds devices
                self._devices[device.id] = device
                visible = visible or old.health != device.health or old.numa_nodes != device.numa_nodes
            if visible:
                self._version += 1
                self._changed.notify_all()
            return visible

    @property
    def options(self) -> api_pb2.DevicePluginOptions:
        return api_pb2.DevicePluginOptions(
            pre_start_required=self.vendor.overrides("pre_start"),
            get_preferred_allocation_available=True,
        )

    # -- lifecycle -----------------------------------------------------------------------
    def start(self) -> None:
        """Bind the socket (mode 0600, created privately then moved into place) and serve."""
        self.plugin_dir.mkdir(parents=True, exist_ok=True)
        with self._changed:
            self._stopping = False
            self._generation += 1
        server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=WORKERS, thread_name_prefix=f"grpc-{self.resource}"),
            options=[("grpc.so_reuseport", 0)],
        )
        api_pb2_grpc.add_DevicePluginServicer_to_server(self, server)
        # Bind in a private 0700 directory, tighten the mode, then rename into the plugin dir,
        # so the socket is never reachable with looser permissions.
        # The staging directory has a random name, made exclusively; a failed start leaves nothing.
        with staging_dir(self.plugin_dir) as private:
            try:
                staged = private / "s.sock"
                if server.add_insecure_port(f"unix://{staged}") == 0:
                    raise OSError(f"cannot bind a unix socket in {self.plugin_dir}")
                server.start()
                os.chmod(staged, 0o600)
                os.replace(staged, self.socket_path)
            except BaseException:
                server.stop(0)
                raise
        self._server = server
        log.info("serving", extra=kv(resource=self.resource, socket=str(self.socket_path)))

    def _vendor_call(self, what: str, func: Callable[..., _T], *args: Any) -> _T:
        """Run a vendor hook with the deadline; VendorTimeout when it does not answer in time."""
        future = self._calls.submit(func, *args)
        try:
            return future.result(timeout=self.vendor_timeout)
        except futures.TimeoutError:
            future.cancel()
            log.error("vendor call did not answer in time", extra=kv(resource=self.resource, call=what,
                                                                      timeout=self.vendor_timeout))
            raise VendorTimeout(
                f"{self.resource}: vendor {what} did not answer within {self.vendor_timeout:g}s"
            ) from None

    def stop(self) -> None:
        self._calls.shutdown(wait=False, cancel_futures=True)
        with self._changed:
            self._stopping = True
            self._changed.notify_all()
        if self._server is not None:
            self._server.stop(grace=0.5).wait(2)
            self._server = None
        remove_own_socket(self.socket_path)  # only our socket: never what another process put there

    def restart(self) -> None:
        if self._server is not None:
            self._server.stop(grace=0).wait(2)
            self._server = None
        self.start()

    @property
    def running(self) -> bool:
        return self._server is not None

    def socket_present(self) -> bool:
        return self.socket_path.exists()

    # -- RPCs ----------------------------------------------------------------------------
    @contextmanager
    def _observed(self, method: str) -> Iterator[None]:
        """Time one RPC for the observer; it failed when anything (an abort too) leaves the block."""
        started = time.perf_counter()
        ok = False
        try:
            yield
            ok = True
        finally:
            self._observe(method, started, ok)

    def _observe(self, method: str, started: float, ok: bool) -> None:
        if self.observer is not None:
            self.observer.rpc(self.resource, method, time.perf_counter() - started, ok)

    def GetDevicePluginOptions(self, request: api_pb2.Empty, context: Any) -> api_pb2.DevicePluginOptions:
        return self.options

    def ListAndWatch(
        self, request: api_pb2.Empty, context: grpc.ServicerContext
    ) -> Iterator[api_pb2.ListAndWatchResponse]:
        with self._changed:
            if self.stats.open_streams >= MAX_STREAMS:
                # each stream holds a worker thread: leave the rest for Allocate and friends
                context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                              f"{self.resource}: {MAX_STREAMS} ListAndWatch streams already open")
            generation = self._generation
            self.stats.open_streams += 1
        context.add_callback(self._wake)
        sent = -1
        try:
            while True:
                with self._changed:
                    while (
                        self._version == sent
                        and not self._stopping
                        and self._generation == generation
                        and context.is_active()
                    ):
                        self._changed.wait(timeout=5.0)
                    if self._stopping or self._generation != generation or not context.is_active():
                        return
                    sent = self._version
                    devices = list(self._devices.values())
                started = time.perf_counter()
                yield api_pb2.ListAndWatchResponse(devices=[device_to_proto(d) for d in devices])
                self.stats.list_and_watch_sends += 1
                self._observe("ListAndWatch", started, True)
        except Exception:
            log.exception("ListAndWatch stream failed", extra=kv(resource=self.resource))
            self._observe("ListAndWatch", time.perf_counter(), False)
            raise
        finally:
            with self._changed:
                self.stats.open_streams -= 1

    def _wake(self) -> None:
        with self._changed:
            self._changed.notify_all()

    def _lookup(self, ids: Sequence[str], context: grpc.ServicerContext, *, need_healthy: bool) -> list[Device]:
        with self._changed:
            current = dict(self._devices)
        unknown = [i for i in ids if i not in current]
        if unknown:
            context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"{self.resource}: unknown device ID(s) {_listing(unknown)}",
            )
        duplicates = sorted(i for i, n in Counter(ids).items() if n > 1)
        if duplicates:
            context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"{self.resource}: device ID(s) requested twice: {_listing(duplicates)}",
            )
        devices = [current[i] for i in ids]
        if need_healthy:
            sick = [d for d in devices if not d.healthy]
            if sick:
                detail = "; ".join(f"{d.id} ({d.reason or 'unhealthy'})" for d in sick)
                context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"{self.resource}: unhealthy device(s) {detail}")
        return devices

    def Allocate(self, request: api_pb2.AllocateRequest, context: grpc.ServicerContext) -> api_pb2.AllocateResponse:
        with self._observed("Allocate"):
            try:
                response = api_pb2.AllocateResponse()
                for container in request.container_requests:
                    devices = self._lookup(list(container.devices_ids), context, need_healthy=True)
                    try:
                        spec = self._vendor_call("container_spec", self.vendor.container_spec, self.resource, devices)
                        if self.cdi_spec is not None:
                            spec = spec.merge(self.cdi_spec(self.resource, devices))
                    except VendorTimeout as exc:
                        self._fail(context, grpc.StatusCode.DEADLINE_EXCEEDED, str(exc))
                    except ValidationError as exc:
                        self._fail(context, grpc.StatusCode.INTERNAL,
                                   f"{self.resource}: container spec rejected: {exc}")
                    except Exception as exc:
                        log.exception("vendor container_spec failed", extra=kv(resource=self.resource))
                        self._fail(context, grpc.StatusCode.INTERNAL, f"{self.resource}: vendor failed: {exc}")
                    response.container_responses.append(spec_to_response(spec, cdi_only=self.cdi_allocate))
                    now = time.time()
                    for d in devices:
                        self.stats.allocated_ids[d.id] = now
            except BaseException:
                self.stats.allocate_errors += 1
                raise
            self.stats.allocations += 1
            return response

    def _fail(self, context: grpc.ServicerContext, code: grpc.StatusCode, message: str) -> None:
        self.stats.last_error = message
        context.abort(code, message)

    def GetPreferredAllocation(
        self, request: api_pb2.PreferredAllocationRequest, context: grpc.ServicerContext
    ) -> api_pb2.PreferredAllocationResponse:
        with self._observed("GetPreferredAllocation"):
            response = api_pb2.PreferredAllocationResponse()
            for container in request.container_requests:
                available = self._lookup(list(container.available_deviceIDs), context, need_healthy=False)
                must = self._lookup(list(container.must_include_deviceIDs), context, need_healthy=False)
                size = container.allocation_size
                if size < 0:
                    context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"allocation_size {size} is negative")
                choice = self._vendor_choice(available, must, size)
                response.container_responses.append(api_pb2.ContainerPreferredAllocationResponse(deviceIDs=choice))
            return response

    def _vendor_choice(self, available: list[Device], must: list[Device], size: int) -> list[str]:
        avail_ids = [d.id for d in available]
        must_ids = [d.id for d in must]
        if self.vendor.overrides("preferred_allocation"):
            try:
                answer = self._vendor_call("preferred_allocation", self.vendor.preferred_allocation,
                                           self.resource, available, must, size)
            except VendorTimeout:  # logged by _vendor_call; a late answer is still an answer
                answer = None
            except Exception:
                log.exception("vendor preferred_allocation failed; using NUMA packing",
                              extra=kv(resource=self.resource))
                answer = None
            if answer is not None:
                answer = list(answer)
                if is_valid_choice(answer, avail_ids, must_ids, size):
                    # must-include IDs first, as the kubelet expects them honoured
                    return must_ids + [i for i in answer if i not in set(must_ids)]
                log.warning(
                    "vendor preferred allocation is not a valid choice; using NUMA packing",
                    extra=kv(resource=self.resource, answer=answer, size=size),
                )
        return pack_numa(available, must, size)

    def PreStartContainer(
        self, request: api_pb2.PreStartContainerRequest, context: grpc.ServicerContext
    ) -> api_pb2.PreStartContainerResponse:
        with self._observed("PreStartContainer"):
            devices = self._lookup(list(request.devices_ids), context, need_healthy=False)
            try:
                self._vendor_call("pre_start", self.vendor.pre_start, self.resource, devices)
            except VendorTimeout as exc:
                self._fail(context, grpc.StatusCode.DEADLINE_EXCEEDED, str(exc))
            except Exception as exc:
                log.exception("vendor pre_start failed", extra=kv(resource=self.resource))
                self._fail(context, grpc.StatusCode.INTERNAL, f"{self.resource}: pre-start failed: {exc}")
            return api_pb2.PreStartContainerResponse()
