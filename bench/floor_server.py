"""The floor: a bare grpcio DevicePlugin server, the least a Python plugin can do for the same messages.

``python bench/floor_server.py --devices N --plugin-dir DIR --control PATH`` serves N devices
(IDs ``dev-000000`` ... like the bench's dpkit devices file) on ``DIR/floor.sock`` and registers
``example.com/floor`` with the kubelet at ``DIR/kubelet.sock``. Allocate answers one fixed small
response; ListAndWatch sends the whole list and re-sends it after each health flip, which the
benchmark triggers through the :mod:`sidechannel` (op ``flip``). No validation, no vendor
hooks, no observers: what dpkit costs beyond this is dpkit's own.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import sidechannel

from dpkit.core.api.v1beta1 import api_pb2, api_pb2_grpc

RESOURCE = "example.com/floor"


def device_ids(count: int) -> list[str]:
    return [f"dev-{i:06d}" for i in range(count)]


class Floor(api_pb2_grpc.DevicePluginServicer):
    """One shared ListAndWatch response, flipped in place; streams wake on a condition variable."""

    def __init__(self, count: int) -> None:
        self.response = api_pb2.ListAndWatchResponse(devices=[
            api_pb2.Device(ID=device_id, health="Healthy",
                           topology=api_pb2.TopologyInfo(nodes=[api_pb2.NUMANode(ID=i % 2)]))
            for i, device_id in enumerate(device_ids(count))])
        self.index = {d.ID: i for i, d in enumerate(self.response.devices)}
        self.version = 0
        self.cond = threading.Condition()
        self.stopping = False
        container = api_pb2.ContainerAllocateResponse(
            envs={"FLOOR_VISIBLE_DEVICES": "dev-000000"},
            devices=[api_pb2.DeviceSpec(container_path="/dev/floor0", host_path="/dev/null", permissions="rw")])
        self.allocate_response = api_pb2.AllocateResponse(container_responses=[container])

    def GetDevicePluginOptions(self, request: api_pb2.Empty, context: Any) -> api_pb2.DevicePluginOptions:
        return api_pb2.DevicePluginOptions()

    def ListAndWatch(self, request: api_pb2.Empty, context: Any) -> Iterator[api_pb2.ListAndWatchResponse]:
        context.add_callback(self.wake)
        with self.cond:
            seen = self.version
        yield self.response
        while True:
            with self.cond:
                while self.version == seen and not self.stopping and context.is_active():
                    self.cond.wait(5.0)
                if self.stopping or not context.is_active():
                    return
                seen = self.version
            yield self.response

    def Allocate(self, request: api_pb2.AllocateRequest, context: Any) -> api_pb2.AllocateResponse:
        return self.allocate_response

    def GetPreferredAllocation(self, request: Any, context: Any) -> api_pb2.PreferredAllocationResponse:
        return api_pb2.PreferredAllocationResponse()  # not advertised in the options; here for completeness

    def PreStartContainer(self, request: Any, context: Any) -> api_pb2.PreStartContainerResponse:
        return api_pb2.PreStartContainerResponse()

    def wake(self) -> None:
        with self.cond:
            self.cond.notify_all()

    def command(self, command: dict[str, Any]) -> dict[str, Any]:
        if command["op"] != "flip":
            raise ValueError(f"the floor only knows 'flip', not {command['op']!r}")
        with self.cond:
            device = self.response.devices[self.index[command["id"]]]
            device.health = "Healthy" if command["healthy"] else "Unhealthy"
            self.version += 1
            self.cond.notify_all()
        return {"ok": True, "t": time.monotonic()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--devices", type=int, required=True)
    parser.add_argument("--plugin-dir", type=Path, required=True)
    parser.add_argument("--control", type=Path, required=True)
    args = parser.parse_args()
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})  # taken by sigwait below
    floor = Floor(args.devices)
    socket_path = args.plugin_dir / "floor.sock"
    socket_path.unlink(missing_ok=True)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
    api_pb2_grpc.add_DevicePluginServicer_to_server(floor, server)
    server.add_insecure_port(f"unix://{socket_path}")
    server.start()
    with grpc.insecure_channel(f"unix://{args.plugin_dir / 'kubelet.sock'}") as channel:
        api_pb2_grpc.RegistrationStub(channel).Register(api_pb2.RegisterRequest(
            version="v1beta1", endpoint=socket_path.name, resource_name=RESOURCE,
            options=api_pb2.DevicePluginOptions()), timeout=30)
    stop = threading.Event()
    control = threading.Thread(target=sidechannel.serve, args=(args.control, floor.command, stop), daemon=True)
    control.start()
    signal.sigwait({signal.SIGTERM, signal.SIGINT})
    stop.set()
    with floor.cond:
        floor.stopping = True
        floor.cond.notify_all()
    server.stop(1).wait(5)
    control.join(5)
    return 0


if __name__ == "__main__":
    sys.exit(main())
