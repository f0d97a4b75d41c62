"""Ask the kubelet's pod-resources API which cex devices containers still hold.

This is how zcrypt nodes of ended containers are found: the kubelet never tells a device
plugin that a container went away, but it lists what every live container was allocated.
"""

from __future__ import annotations

from dataclasses import dataclass

import grpc

from dpkit.core.api.podresources_v1 import api_pb2, api_pb2_grpc
from dpkit.core.errors import DpkitError


class PodResourcesError(DpkitError):
    """The kubelet's pod-resources socket did not answer; nothing may be concluded from it."""


@dataclass(frozen=True)
class Holding:
    """Devices of one resource held by one container."""

    namespace: str
    pod: str
    container: str
    resource: str
    device_ids: tuple[str, ...]


def list_holdings(socket_path: str, resource_prefix: str, timeout: float = 5.0) -> list[Holding]:
    """Every container's devices of resources starting with ``resource_prefix``."""
    channel = grpc.insecure_channel(f"unix://{socket_path}")
    try:
        stub = api_pb2_grpc.PodResourcesListerStub(channel)
        response = stub.List(api_pb2.ListPodResourcesRequest(), timeout=timeout)
    except grpc.RpcError as exc:
        code = exc.code().name if hasattr(exc, "code") else "error"
        raise PodResourcesError(f"pod-resources API at {socket_path} did not answer: {code}") from None
    finally:
        channel.close()
    return [
        Holding(pod.namespace, pod.name, container.name, devices.resource_name, tuple(devices.device_ids))
        for pod in response.pod_resources
        for container in pod.containers
        for devices in container.devices
        if devices.resource_name.startswith(resource_prefix)
    ]
