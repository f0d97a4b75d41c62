"""The floor: a bare grpcio DevicePlugin server, the least a Python plugin can do for the same messages.

``python bench/floor_server.py --devices N --plugin-dir DIR --control PATH [--name NAME]`` serves
N devices (IDs ``dev-000000`` ... like the bench's dpkit devices file) on ``DIR/NAME.sock`` and
registers ``example.com/NAME`` (default ``floor``) with the kubelet at ``DIR/kubelet.sock``.
Allocate answers one fixed small response; ListAndWatch sends the whole list and re-sends it after
each health flip, which the benchmark triggers through the :mod:`sidechannel` (op ``flip``).
No validation, no vendor hooks, no observers: what dpkit costs beyond this is dpkit's own.

By default the floor builds a fresh response from plain Python records for every send, the way
a straightforward plugin does (the floor issue 13's figures were taken against). ``--cached``
keeps one response instead, flips a device in it in place and sends that same message to every
stream (what issue 13 asks dpkit to do): the strict floor.
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
from sidechannel import device_ids

from dpkit.core.api.v1beta1 import api_pb2, api_pb2_grpc


class Floor(api_pb2_grpc.DevicePluginServicer):
    """The device list as plain records (and, when cached, one shared response); streams wake on a condition."""

    def __init__(self, count: int, cached: bool = False) -> None:
        self.cached = cached
        self.records = [(device_id, "Healthy", i % 2) for i, device_id in enumerate(device_ids(count))]
        self.index = {record[0]: i for i, record in enumerate(self.records)}
        self.response = self.build(self.records) if cached else api_pb2.ListAndWatchResponse()
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
        yield self.current()
        while True:
            with self.cond:
                while self.version == seen and not self.stopping and context.is_active():
                    self.cond.wait(5.0)
                if self.stopping or not context.is_active():
                    return
                seen = self.version
            yield self.current()

    def current(self) -> api_pb2.ListAndWatchResponse:
        if self.cached:
            return self.response
        with self.cond:
            records = list(self.records)
        return self.build(records)

    @staticmethod
    def build(records: list[tuple[str, str, int]]) -> api_pb2.ListAndWatchResponse:
        return api_pb2.ListAndWatchResponse(devices=[
            api_pb2.Device(ID=device_id, health=health, topology=api_pb2.TopologyInfo(nodes=[api_pb2.NUMANode(ID=n)]))
            for device_id, health, n in records])

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
        health = "Healthy" if command["healthy"] else "Unhealthy"
        with self.cond:
            at = self.index[command["id"]]
            if self.cached:
                self.response.devices[at].health = health
            self.records[at] = (self.records[at][0], health, self.records[at][2])
            self.version += 1
            self.cond.notify_all()
        return {"ok": True, "t": time.monotonic()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--devices", type=int, required=True)
    parser.add_argument("--plugin-dir", type=Path, required=True)
    parser.add_argument("--control", type=Path, required=True)
    parser.add_argument("--name", default="floor", help="socket NAME.sock, resource example.com/NAME")
    parser.add_argument("--cached", action="store_true", help="one shared response, flipped in place")
    args = parser.parse_args()
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})  # taken by sigwait below
    floor = Floor(args.devices, cached=args.cached)
    socket_path = args.plugin_dir / f"{args.name}.sock"
    socket_path.unlink(missing_ok=True)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
    api_pb2_grpc.add_DevicePluginServicer_to_server(floor, server)
    server.add_insecure_port(f"unix://{socket_path}")
    server.start()
    with grpc.insecure_channel(f"unix://{args.plugin_dir / 'kubelet.sock'}") as channel:
        api_pb2_grpc.RegistrationStub(channel).Register(api_pb2.RegisterRequest(
            version="v1beta1", endpoint=socket_path.name, resource_name=f"example.com/{args.name}",
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
