"""An in-process kubelet device manager, faithful to the real one, for tests and the demo.

It does what the kubelet's device manager does over the same sockets: serves ``Registration``
on ``kubelet.sock`` with the kubelet's validation, dials each plugin's endpoint, follows
ListAndWatch, keeps capacity (all devices) and allocatable (healthy devices), and allocates the
way the kubelet does: GetPreferredAllocation (when offered), Allocate, then PreStartContainer
(when required). :meth:`Kubelet.restart` wipes the plugin directory like a kubelet restart. It
also serves the pod-resources API so ``dpkit status`` can say which pod holds which device.

``dpkit kubelet --dir DIR`` serves it as a process (see :func:`command`), with a small control
socket so ``dpkit kubelet allocate|devices|release|restart`` can drive it from a shell.

Vendor authors can use it to test their packages::

    with Kubelet(tmp_path / "plugins") as kubelet:
        ...start a Manager with plugin_dir=tmp_path / "plugins"...
        kubelet.wait_for(lambda k: k.allocatable("acme.com/widget") == 2)
        ids, response = kubelet.allocate("acme.com/widget", 1)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import socketserver
import tempfile
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
from dpkit.core.support.logs import get_logger, kv
from dpkit.core.vendorapi.errors import DpkitError, ValidationError
from dpkit.core.vendorapi.validation import check_resource_name

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
        log.info("plugin registered", extra=kv(resource=request.resource_name, endpoint=request.endpoint))

    def _reject(self, message: str) -> None:
        self.rejections.append(message)
        # info, not warning: a manager in the same process (tests) keeps warnings as its own errors
        log.info("registration rejected", extra=kv(error=message))
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


# -- `dpkit kubelet`: the emulator as a process, and its control socket -------------------------
#
# DIR is laid out like /var/lib/kubelet: DIR/device-plugins/kubelet.sock (registration),
# DIR/pod-resources/kubelet.sock, plus DIR/control.sock (this emulator's control channel) and
# DIR/dpkit.yaml (a config for `dpkit run` that points at all of them).
#
# Control protocol: one JSON object per connection, one line each way, requests of at most
# MAX_REQUEST bytes; every reply has "ok" and, when false, "error".

MAX_REQUEST = 64 * 1024
MAX_REPLY = 16 * 1024 * 1024
CONTROL_TIMEOUT = 30.0  # an allocate waits on the plugin's Allocate (10 s) and PreStart (30 s at most)


def default_dir() -> Path:
    """``$DPKIT_KUBELET_DIR``, else a per-user directory under the temp dir (short: socket paths are limited)."""
    env = os.environ.get("DPKIT_KUBELET_DIR")
    return Path(env) if env else Path(tempfile.gettempdir()) / f"dpkit-kubelet-{os.getuid()}"


@dataclass(frozen=True)
class Layout:
    """Where a served emulator keeps its sockets and the config for `dpkit run`."""

    root: Path

    @property
    def plugin_dir(self) -> Path:
        return self.root / "device-plugins"

    @property
    def pod_resources(self) -> Path:
        return self.root / "pod-resources" / "kubelet.sock"

    @property
    def control(self) -> Path:
        return self.root / "control.sock"

    @property
    def config(self) -> Path:
        return self.root / "dpkit.yaml"

    def config_text(self) -> str:
        """A `dpkit run` config for this emulator: every path inside DIR, so no root is needed."""
        import yaml

        settings = {"plugin_dir": str(self.plugin_dir), "pod_resources_socket": str(self.pod_resources),
                    "state_dir": str(self.root / "state"), "cdi_dir": str(self.root / "cdi"),
                    "nfd_features_dir": str(self.root / "nfd")}
        return ("# Written by `dpkit kubelet`: run a plugin against this emulator with\n"
                f"#   dpkit run VENDOR -c {self.config}\n" + yaml.safe_dump(settings, sort_keys=False))


class KubeletControl:
    """Answers control requests against a running :class:`Kubelet`."""

    def __init__(self, kubelet: Kubelet) -> None:
        self.kubelet = kubelet
        self._pods = 0
        self._lock = threading.Lock()

    def answer(self, request: Any) -> dict[str, Any]:
        if not isinstance(request, dict) or not isinstance(request.get("cmd"), str):
            return {"ok": False, "error": 'expected a JSON object with "cmd"'}
        handler = getattr(self, "_cmd_" + request["cmd"], None)
        if handler is None:
            return {"ok": False, "error": f"unknown command {request['cmd']!r} "
                                          "(commands: devices, allocate, release, restart)"}
        try:
            result: dict[str, Any] = handler(request)
        except KubeletError as exc:
            return {"ok": False, "error": str(exc)}
        except grpc.RpcError as exc:
            return {"ok": False, "error": f"the plugin answered {exc.code().name}: {exc.details()}"}
        except (KeyError, TypeError, ValueError) as exc:
            return {"ok": False, "error": f"bad request: {exc}"}
        return {"ok": True, **result}

    def _cmd_devices(self, request: dict[str, Any]) -> dict[str, Any]:
        k = self.kubelet
        with k._cond:
            holders = {(a.resource, i): f"{a.namespace}/{a.pod}/{a.container}"
                       for a in k.allocations for i in a.device_ids}
            resources = []
            for name, ep in sorted(k.endpoints.items()):
                devices = [{"id": i, "health": d.health, "numa": list(d.numa), "held_by": holders.get((name, i), "")}
                           for i, d in sorted(ep.devices.items())]
                resources.append({"name": name, "registered": ep.connected, "capacity": len(devices),
                                  "healthy": sum(1 for d in devices if d["health"] == "Healthy"),
                                  "held": sum(1 for d in devices if d["held_by"]), "devices": devices})
            return {"resources": resources, "rejections": k.rejections[-10:]}

    def _cmd_allocate(self, request: dict[str, Any]) -> dict[str, Any]:
        resource, count = request["resource"], request["count"]
        if not isinstance(resource, str) or not isinstance(count, int) or isinstance(count, bool) or count < 1:
            raise ValueError("allocate needs a resource name and a count of at least 1")
        pod = request.get("pod")
        if not pod:
            with self._lock:
                self._pods += 1
                pod = f"try-{self._pods}"
        namespace, container = request.get("namespace") or "default", request.get("container") or "main"
        ids, response = self.kubelet.allocate(resource, count, pod=str(pod), container=str(container),
                                              namespace=str(namespace))
        return {"pod": f"{namespace}/{pod}/{container}", "devices": ids, "envs": dict(response.envs),
                "device_nodes": [{"host_path": d.host_path, "container_path": d.container_path,
                                  "permissions": d.permissions} for d in response.devices],
                "mounts": [{"host_path": m.host_path, "container_path": m.container_path, "read_only": m.read_only}
                           for m in response.mounts],
                "annotations": dict(response.annotations),
                "cdi_devices": [c.name for c in response.cdi_devices]}

    def _cmd_release(self, request: dict[str, Any]) -> dict[str, Any]:
        pod, namespace = str(request["pod"]), str(request.get("namespace") or "default")
        with self.kubelet._cond:
            held = sum(1 for a in self.kubelet.allocations if (a.pod, a.namespace) == (pod, namespace))
        if not held:
            raise KubeletError(f"pod {namespace}/{pod} holds no devices")
        self.kubelet.release(pod, namespace)
        return {"released": f"{namespace}/{pod}"}

    def _cmd_restart(self, request: dict[str, Any]) -> dict[str, Any]:
        self.kubelet.restart()
        return {}


class _ControlHandler(socketserver.StreamRequestHandler):
    timeout = 5.0  # a client that connects and says nothing does not hold a thread for long

    def handle(self) -> None:
        server: ControlServer = self.server  # type: ignore[assignment]
        try:
            line = self.rfile.readline(MAX_REQUEST + 1)
        except OSError:
            return
        if len(line) > MAX_REQUEST:
            reply: dict[str, Any] = {"ok": False, "error": f"request larger than {MAX_REQUEST} bytes"}
        else:
            try:
                reply = server.control.answer(json.loads(line))
            except ValueError:
                reply = {"ok": False, "error": "expected one line of JSON"}
        try:
            self.wfile.write(json.dumps(reply).encode() + b"\n")
        except OSError:
            pass


class ControlServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    """The emulator's control socket (mode 0600), one thread per request."""

    daemon_threads = True

    def __init__(self, path: Path, kubelet: Kubelet) -> None:
        self.control = KubeletControl(kubelet)
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists() or path.is_symlink():
            if _answers(path):
                raise KubeletError(f"another kubelet emulator is serving {path.parent}")
            path.unlink()
        old = os.umask(0o177)
        try:
            super().__init__(str(path), _ControlHandler)
        finally:
            os.umask(old)
        self.path = path
        self._thread = threading.Thread(target=self.serve_forever, args=(0.2,), name="kubelet-control", daemon=True)

    def start(self) -> ControlServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.shutdown()
        self.server_close()
        self.path.unlink(missing_ok=True)

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.warning("control request failed", exc_info=True)


def _answers(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(1.0)
        try:
            s.connect(str(path))
        except OSError:
            return False
    return True


def request(root: Path, payload: dict[str, Any], timeout: float = CONTROL_TIMEOUT) -> dict[str, Any]:
    """Send one control request to the emulator serving ``root``; DpkitError with its error otherwise."""
    path = Layout(root).control
    data = json.dumps(payload).encode() + b"\n"
    if len(data) > MAX_REQUEST:
        raise DpkitError(f"request larger than {MAX_REQUEST} bytes")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        try:
            s.connect(str(path))
        except OSError as exc:
            raise DpkitError(f"no kubelet emulator answers at {path} ({exc.strerror or exc}); "
                             f"start one with `dpkit kubelet --dir {root}`") from None
        try:
            s.sendall(data)
            with s.makefile("rb") as reader:
                line = reader.readline(MAX_REPLY)
        except TimeoutError:
            raise DpkitError(f"the kubelet emulator at {path} did not answer within {timeout:g}s") from None
    try:
        reply: dict[str, Any] = json.loads(line)
    except ValueError:
        raise DpkitError(f"the kubelet emulator at {path} sent no valid answer") from None
    if not reply.get("ok"):
        raise DpkitError(str(reply.get("error", "request failed")))
    return reply


def serve(root: Path, ready: Callable[[Layout], None] | None = None, stop: threading.Event | None = None) -> None:
    """Serve the emulator on ``root`` until SIGTERM/SIGINT (or ``stop``, for callers in threads)."""
    layout = Layout(root)
    root.mkdir(parents=True, exist_ok=True)
    kubelet = Kubelet(layout.plugin_dir, pod_resources_socket=layout.pod_resources).start()
    try:
        control = ControlServer(layout.control, kubelet).start()
    except BaseException:
        kubelet.stop()
        raise
    try:
        layout.config.write_text(layout.config_text())
        if ready is not None:
            ready(layout)
        if stop is not None:
            stop.wait()
        else:
            received = signal.sigwait({signal.SIGTERM, signal.SIGINT})
            log.info("stopping", extra=kv(signal=signal.Signals(received).name))
    finally:
        control.stop()
        kubelet.stop()


def _print_ready(layout: Layout) -> None:
    print(f"kubelet emulator serving {layout.root}\n"
          f"  registration   {layout.plugin_dir / 'kubelet.sock'}\n"
          f"  pod-resources  {layout.pod_resources}\n"
          f"  control        {layout.control}\n"
          f"run a plugin against it:  dpkit run sim -c {layout.config} [--devices FILE]\n"
          f"then:  dpkit kubelet --dir {layout.root} devices | allocate RESOURCE N | release POD | restart\n"
          "SIGTERM or Ctrl-C stops it.", flush=True)


def format_devices(reply: dict[str, Any]) -> str:
    if not reply["resources"]:
        lines = ["no plugin registered yet"]
    else:
        lines = []
    for res in reply["resources"]:
        state = "registered" if res["registered"] else "DISCONNECTED"
        lines.append(f"{res['name']}: {state}, capacity {res['capacity']}, healthy {res['healthy']}, "
                     f"held {res['held']}")
        for dev in res["devices"]:
            numa = ",".join(map(str, dev["numa"])) or "-"
            held = f"  held by {dev['held_by']}" if dev["held_by"] else ""
            lines.append(f"  {dev['id']:<16} {dev['health']:<9} numa {numa}{held}")
    lines.extend(f"rejected registration: {r}" for r in reply.get("rejections", []))
    return "\n".join(lines)


def format_allocation(reply: dict[str, Any]) -> str:
    lines = [f"allocated {', '.join(reply['devices'])} to {reply['pod']}"]
    lines += [f"  env    {k}={v}" for k, v in sorted(reply["envs"].items())]
    lines += [f"  device {d['host_path']} -> {d['container_path']} ({d['permissions']})" for d in reply["device_nodes"]]
    lines += [f"  mount  {m['host_path']} -> {m['container_path']} (ro={m['read_only']})" for m in reply["mounts"]]
    lines += [f"  cdi    {c}" for c in reply["cdi_devices"]]
    lines += [f"  annotation {k}={v}" for k, v in sorted(reply["annotations"].items())]
    return "\n".join(lines)


def add_parser(sub: Any, func: Callable[[argparse.Namespace], int]) -> None:
    """``dpkit kubelet [--dir DIR] [serve|devices|allocate|release|restart]`` (for cli.py)."""
    dir_help = "the emulator's directory (default: $DPKIT_KUBELET_DIR or a per-user dir under /tmp)"
    p = sub.add_parser("kubelet", help="the kubelet emulator: serve it, or ask the one serving --dir",
                       description="Without an action: serve registration, pod-resources and a control socket "
                                   "in DIR until SIGTERM. With one: talk to the emulator serving DIR.")
    p.add_argument("--dir", type=Path, default=None, help=dir_help)
    p.set_defaults(func=func, action="serve")
    actions = p.add_subparsers(dest="action", metavar="ACTION")
    # --dir is accepted after the action too; SUPPRESS keeps the value given before it
    a = actions.add_parser("serve", help="serve the emulator (the default)")
    a.add_argument("--dir", type=Path, default=argparse.SUPPRESS, help=dir_help)
    a = actions.add_parser("devices", help="every registered resource and its devices as the kubelet sees them")
    a.add_argument("--dir", type=Path, default=argparse.SUPPRESS, help=dir_help)
    a.add_argument("--json", action="store_true", help="print the reply as JSON")
    a = actions.add_parser("allocate", help="admit a pod asking for N devices (GetPreferredAllocation, Allocate, "
                                            "PreStartContainer, as the kubelet does)")
    a.add_argument("resource", help="resource name, e.g. example.com/widget")
    a.add_argument("count", type=int, help="how many devices")
    a.add_argument("--pod", help="pod name (default: try-N)")
    a.add_argument("--namespace", default="default", help="pod namespace (default: default)")
    a.add_argument("--container", default="main", help="container name (default: main)")
    a.add_argument("--dir", type=Path, default=argparse.SUPPRESS, help=dir_help)
    a.add_argument("--json", action="store_true", help="print the reply as JSON")
    a = actions.add_parser("release", help="the pod ended: its devices are free again")
    a.add_argument("pod", help="pod name")
    a.add_argument("--namespace", default="default", help="pod namespace (default: default)")
    a.add_argument("--dir", type=Path, default=argparse.SUPPRESS, help=dir_help)
    a = actions.add_parser("restart", help="restart the emulated kubelet (plugin directory wiped)")
    a.add_argument("--dir", type=Path, default=argparse.SUPPRESS, help=dir_help)


def command(args: argparse.Namespace) -> int:
    """Run one ``dpkit kubelet`` invocation; errors are raised as DpkitError for the CLI."""
    from dpkit.core.support.logs import setup_logging

    root = (args.dir or default_dir()).absolute()
    action = args.action or "serve"
    if action == "serve":
        setup_logging("human", "info")
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})  # before any thread starts
        try:
            serve(root, ready=_print_ready)
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM, signal.SIGINT})
        return 0
    as_json = getattr(args, "json", False)
    if action == "devices":
        reply = request(root, {"cmd": "devices"})
        print(json.dumps(reply, indent=2) if as_json else format_devices(reply))
    elif action == "allocate":
        reply = request(root, {"cmd": "allocate", "resource": args.resource, "count": args.count, "pod": args.pod,
                               "namespace": args.namespace, "container": args.container})
        print(json.dumps(reply, indent=2) if as_json else format_allocation(reply))
    elif action == "release":
        reply = request(root, {"cmd": "release", "pod": args.pod, "namespace": args.namespace})
        print(f"released {reply['released']}")
    else:
        request(root, {"cmd": "restart"})
        print("kubelet restarted: plugin directory wiped, registration socket recreated")
    return 0
