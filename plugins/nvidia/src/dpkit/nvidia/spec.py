"""What a container gets, for each of NVIDIA's device-list strategies.

* ``envvar``: ``NVIDIA_VISIBLE_DEVICES=<ids>`` for the NVIDIA container runtime;
* ``volume-mounts``: ``NVIDIA_VISIBLE_DEVICES=/var/run/nvidia-container-devices`` and one
  ``/dev/null`` mount per device under it (the list cannot be overridden by a pod's env);
* ``cdi-annotations``: a ``cdi.k8s.io/nvidia-device-plugin_<uuid>`` annotation naming CDI devices;
* ``cdi-cri``: the CDI device names in the response's ``cdi_devices`` field.

IDs are GPU/MIG UUIDs or indices (``deviceIDStrategy``). With ``passDeviceSpecs`` the device
nodes are passed too, host paths under ``nvidiaDevRoot``. When every strategy is a CDI one,
the runtime's CDI spec provides nodes and env, as in NVIDIA's plugin.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence

from dpkit.core.device import ContainerSpec, Device, DeviceNode, Mount, merge_specs
from dpkit.nvidia import hostfiles
from dpkit.nvidia.config import Settings

VISIBLE_ENV = "NVIDIA_VISIBLE_DEVICES"
VOLUME_ROOT = "/var/run/nvidia-container-devices"
ANNOTATION_NAME = "nvidia-device-plugin"


def visible_id(settings: Settings, attributes: dict[str, str]) -> str:
    """How the runtime names this device: its UUID or its index (``0`` or ``0:1`` for MIG)."""
    return attributes["index"] if settings.id_strategy == "index" else attributes["uuid"]


def _flag_env(settings: Settings) -> dict[str, str]:
    env = {}
    if settings.gds_enabled:
        env["NVIDIA_GDS"] = "enabled"
    if settings.mofed_enabled:
        env["NVIDIA_MOFED"] = "enabled"
    if settings.gdrcopy_enabled:
        env["NVIDIA_GDRCOPY"] = "enabled"
    return env


def present_control_nodes(settings: Settings) -> tuple[str, ...]:
    """The optional control nodes that exist under the dev root (NVIDIA passes only those)."""
    return tuple(p for p in hostfiles.CONTROL_NODES
                 if not hostfiles.node_state(settings.dev_root, p).endswith("is absent"))


def device_spec(settings: Settings, visible: str, nodes: Sequence[str], controls: Sequence[str]) -> ContainerSpec:
    """One device's share of a container spec; :func:`container_spec` merges them."""
    env = _flag_env(settings)
    mounts: tuple[Mount, ...] = ()
    devices: tuple[DeviceNode, ...] = ()
    cdi: tuple[str, ...] = ()
    if "cdi-cri" in settings.list_strategies:
        cdi = (f"{settings.cdi_kind}={visible}",)
    if not settings.all_cdi:
        if "envvar" in settings.list_strategies:
            env[VISIBLE_ENV] = visible
        if "volume-mounts" in settings.list_strategies:
            env[VISIBLE_ENV] = VOLUME_ROOT
            mounts = (Mount("/dev/null", f"{VOLUME_ROOT}/{visible}", read_only=True),)
        if settings.pass_device_specs:
            devices = tuple(DeviceNode(hostfiles.host_path(settings.dev_root, p), p, "rw")
                            for p in (*controls, *nodes))
    return ContainerSpec(devices=devices, mounts=mounts, env=env, cdi_devices=cdi)


def container_spec(settings: Settings, devices: Sequence[Device]) -> ContainerSpec:
    """The merged spec for a container given ``devices`` (replicas of one GPU count once)."""
    spec = merge_specs(d.spec for d in devices)
    if "cdi-annotations" not in settings.list_strategies:
        return spec
    visible = list(dict.fromkeys(visible_id(settings, dict(d.attributes)) for d in devices))
    key = f"{settings.cdi_annotation_prefix}{ANNOTATION_NAME}_{uuid.uuid4()}"
    value = ",".join(f"{settings.cdi_kind}={v}" for v in visible)
    return spec.merge(ContainerSpec(annotations={key: value}))
