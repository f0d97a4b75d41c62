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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import grpc

from dpkit.core.api.v1beta1 import api_pb2, api_pb2_grpc
from dpkit.core.engine.vendor_calls import VendorCalls
from dpkit.core.engine.vendor_calls import VendorTimeout as VendorTimeout  # where callers have always found it
from dpkit.core.support.files import remove_own_socket, staging_dir
from dpkit.core.support.logs import get_logger, kv
from dpkit.core.vendorapi.allocation import is_valid_choice, pack_numa
from dpkit.core.vendorapi.device import ContainerSpec, Device, Health
from dpkit.core.vendorapi.errors import AllocationError, ValidationError
from dpkit.core.vendorapi.validation import socket_name_for
from dpkit.core.vendorapi.vendor import Vendor

log = get_logger("server")

WORKERS = 16
MAX_STREAMS = 8  # the kubelet holds one; the rest are debugging clients and restarts in flight
MAX_CACHED_RESPONSES = 4096  # container responses kept per server, by the spec they were built from
MAX_LISTED_IDS = 10  # IDs named in one error message
SERVICE = "v1beta1.DevicePlugin"  # the kubelet's service name (proto package v1beta1)


class RpcObserver(Protocol):
    """Receives one call per RPC served (the metrics module implements it)."""

    def rpc(self, resource: str, method: str, seconds: float, ok: bool) -> None: ...


class _Observed:
    """``with server._observed(method)``: a plain context manager (a generator one costs a frame
    and a generator object per RPC, on the kubelet's hottest call)."""

    __slots__ = ("method", "server", "started")

    def __init__(self, server: ResourceServer, method: str) -> None:
        self.server = server
        self.method = method
        self.started = 0.0

    def __enter__(self) -> None:
        if self.server.observer is not None:
            self.started = time.perf_counter()

    def __exit__(self, kind: type[BaseException] | None, *_: object) -> None:
        self.server._observe(self.method, self.started, kind is None)


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
    cannot merge device-list variables across devices (see :mod:`dpkit.core.integrations.cdi`).
    """
    # Empty parts are skipped: this runs on every Allocate, and most specs have no CDI names,
    # annotations or mounts.
    response = api_pb2.ContainerAllocateResponse(envs=spec.env or None, annotations=spec.annotations or None)
    if spec.cdi_devices:
        response.cdi_devices.extend(api_pb2.CDIDevice(name=n) for n in spec.cdi_devices)
    if cdi_only:
        return response
    if spec.mounts:
        response.mounts.extend(
            api_pb2.Mount(container_path=m.container_path, host_path=m.host_path, read_only=m.read_only)
            for m in spec.mounts
        )
    if spec.devices:
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


def encoded_entry(device: Device) -> bytes:
    """One device as a serialised ``ListAndWatchResponse`` holding just it.

    Serialised protobuf messages concatenate into their merge, and ``devices`` is a repeated
    field, so the join of every device's entry *is* the serialised whole list: a health change
    re-encodes one device, not ten thousand.
    """
    return api_pb2.ListAndWatchResponse(devices=[device_to_proto(device)]).SerializeToString()


def _visible(device: Device) -> tuple[object, ...]:
    """What the kubelet sees of a device; a change in anything else wakes no stream."""
    return (device.health, device.numa_nodes)


def _serialize_list(response: bytes | api_pb2.ListAndWatchResponse) -> bytes:
    return response if isinstance(response, bytes) else response.SerializeToString()


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
        calls: VendorCalls | None = None,
    ) -> None:
        self.resource = resource
        # Vendor hooks run through the adapter, under a deadline: the kubelet calls Allocate without
        # one, so a hung driver call would otherwise stall pod admission forever. The manager passes
        # its own adapter so that a reload's new vendor and the error counts are shared.
        self.calls = calls if calls is not None else VendorCalls(vendor, vendor_timeout)
        self.plugin_dir = Path(plugin_dir)
        self.socket_path = self.plugin_dir / socket_name_for(resource)
        self.observer = observer
        self.cdi_spec = cdi_spec
        self.cdi_allocate = cdi_allocate
        self.stats = ServerStats()
        self._devices: dict[str, Device] = {}
        self._borrowed = False  # _devices is the manager's snapshot index: copied before any change here
        self._entries: dict[str, bytes | None] = {}  # device ID -> encoded_entry; None: to encode
        # id(spec) -> (spec, its response): specs are immutable, and the default container_spec hands
        # back a device's own spec object, so a device allocated again costs no rebuilt response
        self._responses: dict[int, tuple[ContainerSpec, api_pb2.ContainerAllocateResponse,
                                         api_pb2.AllocateResponse]] = {}
        self._response: bytes | None = None  # the current ListAndWatch response, shared by every stream
        self._version = 0
        self._changed = threading.Condition()
        self._server: grpc.Server | None = None
        self._stopping = False
        self._generation = 0  # bumped on every (re)start so old streams end

    @property
    def vendor(self) -> Vendor:
        """The vendor of the shared adapter (a reload swaps it there, for every server at once)."""
        return self.calls.vendor

    # -- state ---------------------------------------------------------------------------
    @property
    def devices(self) -> tuple[Device, ...]:
        with self._changed:
            return tuple(self._devices.values())

    def update(self, devices: Sequence[Device], index: dict[str, Device] | None = None) -> bool:
        """Replace the device list; streams are woken only when something the kubelet sees changed.

        Devices whose visible state is unchanged keep their encoded entry, so a rediscovery of an
        unchanged node re-encodes nothing. ``index``: ``devices`` by ID, which the caller never changes
        afterwards; kept as is rather than built again (one 100k-entry dict less at 100k devices).
        """
        new = index if index is not None else {d.id: d for d in devices}
        with self._changed:
            old = self._devices
            entries: dict[str, bytes | None] = {}
            changed = list(old) != list(new)
            for device_id, device in new.items():
                before = old.get(device_id)
                if before is not None and _visible(before) == _visible(device):
                    entries[device_id] = self._entries[device_id]
                else:
                    entries[device_id] = None
                    changed = True
            self._devices, self._entries = new, entries
            self._borrowed = index is not None
            if not changed:
                return False
            self._bump()
            return True

    def patch(self, devices: Sequence[Device]) -> bool:
        """Replace some devices (by ID) in place: cost proportional to the change, not the list."""
        with self._changed:
            visible = False
            for device in devices:
                old = self._devices.get(device.id)
                if old is None:
                    continue  # only a full update adds devices
                if self._borrowed:
                    self._devices, self._borrowed = dict(self._devices), False
                self._devices[device.id] = device
                if _visible(old) != _visible(device):
                    self._entries[device.id] = None
                    visible = True
            if visible:
                self._bump()
            return visible

    def _bump(self) -> None:
        """Called with the lock held after a visible change: a new version for every stream."""
        self._response = None
        self._version += 1
        self._changed.notify_all()

    def _current_response(self) -> bytes:
        """Called with the lock held: the encoded list, built once per version for all streams.

        Entries are encoded here, on the first stream that needs them, so the manager's loop
        never pays for serialisation and a device that changes twice between sends is encoded once.
        """
        if self._response is None:
            entries = self._entries
            for device_id, entry in entries.items():
                if entry is None:
                    entries[device_id] = encoded_entry(self._devices[device_id])
            self._response = b"".join(e for e in entries.values() if e is not None)
        return self._response

    @property
    def options(self) -> api_pb2.DevicePluginOptions:
        return api_pb2.DevicePluginOptions(
            pre_start_required=self.calls.overrides("pre_start"),
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
        self._add_handlers(server)
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

    def _add_handlers(self, server: grpc.Server) -> None:
        """The generated handler table, except that ListAndWatch yields the cached encoded list."""
        unary = grpc.unary_unary_rpc_method_handler
        handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {
            "GetDevicePluginOptions": unary(self.GetDevicePluginOptions, api_pb2.Empty.FromString,
                                            api_pb2.DevicePluginOptions.SerializeToString),
            "ListAndWatch": grpc.unary_stream_rpc_method_handler(self.ListAndWatch, api_pb2.Empty.FromString,
                                                                 _serialize_list),
            "GetPreferredAllocation": unary(self.GetPreferredAllocation, api_pb2.PreferredAllocationRequest.FromString,
                                            api_pb2.PreferredAllocationResponse.SerializeToString),
            "Allocate": unary(self.Allocate, api_pb2.AllocateRequest.FromString,
                              api_pb2.AllocateResponse.SerializeToString),
            "PreStartContainer": unary(self.PreStartContainer, api_pb2.PreStartContainerRequest.FromString,
                                       api_pb2.PreStartContainerResponse.SerializeToString),
        }
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
        server.add_registered_method_handlers(SERVICE, handlers)

    def stop(self) -> None:
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
    def _observed(self, method: str) -> _Observed:
        """Time one RPC for the observer; it failed when anything (an abort too) leaves the block."""
        return _Observed(self, method)

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
                    response = self._current_response()
                started = time.perf_counter()
                yield response  # type: ignore[misc]  # bytes: serialised by _serialize_list
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
        """The devices named in a request, checked: cost grows with the request, not the resource."""
        if len(ids) == 1:  # the usual request: one reference read needs no lock (a patch swaps entries whole)
            device = self._devices.get(ids[0])
            if device is not None and (device.health is Health.HEALTHY or not need_healthy):
                return [device]
        with self._changed:
            current = self._devices
            devices = [current.get(i) for i in ids]
        unknown = [i for i, d in zip(ids, devices, strict=True) if d is None]
        if unknown:
            context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"{self.resource}: unknown device ID(s) {_listing(unknown)}",
            )
        if len(ids) > 1 and len(set(ids)) != len(ids):
            duplicates = sorted(i for i, n in Counter(ids).items() if n > 1)
            context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"{self.resource}: device ID(s) requested twice: {_listing(duplicates)}",
            )
        found = [d for d in devices if d is not None]
        if need_healthy:
            sick = [d for d in found if not d.healthy]
            if sick:
                detail = "; ".join(f"{d.id} ({d.reason or 'unhealthy'})" for d in sick)
                context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"{self.resource}: unhealthy device(s) {detail}")
        return found

    def Allocate(self, request: api_pb2.AllocateRequest, context: grpc.ServicerContext) -> api_pb2.AllocateResponse:
        with self._observed("Allocate"):
            try:
                specs: list[ContainerSpec] = []
                for container in request.container_requests:
                    devices = self._lookup(container.devices_ids, context, need_healthy=True)
                    try:
                        specs.append(self._container_spec(devices))
                    except VendorTimeout as exc:
                        self._fail(context, grpc.StatusCode.DEADLINE_EXCEEDED, f"{self.resource}: {exc}")
                    except AllocationError as exc:
                        self._fail(context, grpc.StatusCode.UNKNOWN, str(exc))
                    except ValidationError as exc:
                        self._fail(context, grpc.StatusCode.INTERNAL,
                                   f"{self.resource}: container spec rejected: {exc}")
                    except Exception as exc:
                        self.calls.report("container_spec", exc, "vendor container_spec failed", traceback=True,
                                          resource=self.resource)
                        self._fail(context, grpc.StatusCode.INTERNAL, f"{self.resource}: vendor failed: {exc}")
                    now = time.time()
                    for d in devices:
                        self.stats.allocated_ids[d.id] = now
                if len(specs) == 1:  # one container, as the kubelet asks: the whole answer is kept too
                    response = self._answers(specs[0])[1]
                else:
                    response = api_pb2.AllocateResponse(container_responses=[self._answers(s)[0] for s in specs])
            except BaseException:
                self.stats.allocate_errors += 1
                raise
            self.stats.allocations += 1
            return response

    def _answers(self, spec: ContainerSpec) -> tuple[api_pb2.ContainerAllocateResponse, api_pb2.AllocateResponse]:
        """``spec`` as the kubelet gets it, alone and as a one-container answer, built once per spec
        object; neither message is changed once built, so every RPC thread may send them."""
        hit = self._responses.get(id(spec))
        if hit is not None and hit[0] is spec:  # the spec is held by the entry: its id is not reused
            return hit[1], hit[2]
        built = spec_to_response(spec, cdi_only=self.cdi_allocate)
        whole = api_pb2.AllocateResponse(container_responses=[built])
        if len(self._responses) >= MAX_CACHED_RESPONSES:
            self._responses.clear()
        self._responses[id(spec)] = (spec, built, whole)
        return built, whole

    def _container_spec(self, devices: list[Device]) -> ContainerSpec:
        """The vendor's spec (plus CDI names), under the deadline when vendor or file code runs.

        The default hook only merges the devices' own specs in memory, so without CDI it runs right
        here (the adapter hops only for a vendor's own hook): no thread hop on the kubelet's hottest call.
        The CDI callback may rewrite a file and ask the vendor again, so it runs under a deadline of its
        own (``cdi_spec``): a CDI failure is then never counted as the vendor's ``container_spec``.
        """
        spec = self.calls.container_spec(self.resource, devices)
        if self.cdi_spec is None:
            return spec
        return spec.merge(self.calls.guarded("cdi_spec", self.cdi_spec, self.resource, devices,
                                             resource=self.resource))

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
        if self.calls.overrides("preferred_allocation"):
            try:
                answer = self.calls.preferred_allocation(self.resource, available, must, size)
            except VendorTimeout:  # logged by the adapter
                answer = None
            except Exception as exc:
                self.calls.report("preferred_allocation", exc, "vendor preferred_allocation failed; using NUMA "
                                  "packing", traceback=True, resource=self.resource)
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
                self.calls.pre_start(self.resource, devices)
            except VendorTimeout as exc:
                self._fail(context, grpc.StatusCode.DEADLINE_EXCEEDED, f"{self.resource}: {exc}")
            except Exception as exc:
                self.calls.report("pre_start", exc, "vendor pre_start failed", traceback=True, resource=self.resource)
                self._fail(context, grpc.StatusCode.INTERNAL, f"{self.resource}: pre-start failed: {exc}")
            return api_pb2.PreStartContainerResponse()
