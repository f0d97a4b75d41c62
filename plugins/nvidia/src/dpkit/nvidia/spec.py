"""What a container gets, for each of NVIDIA's device-list strategies.

* ``envvar``: ``NVIDIA_VISIBLE_DEVICES=<ids>`` for the NVIDIA container runtime;
* ``volume-mounts``: ``NVIDIA_VISIBLE_DEVICES=/var/run/nvidia-container-devices`` and one
  ``/dev/null`` mount per device under it (the list cannot be overridden by a pod's env);
* ``cdi-annotations``: a ``cdi.k8s.io/nvidia-device-plugin_<uuid>`` annotation naming CDI devices;
* ``cdi-cri``: the CDI device names in the response's ``cdi_devices`` field.

IDs are GPU/MIG UUIDs or indices (``deviceIDStrategy``). With ``passDeviceSpecs`` the device
nodes are passed too, host paths under ``nvidiaDevRoot``. When every strategy is a CDI one,
the runtime's CDI spec provides nodes and env, as in NVIDIA's plugin.

Per container, as NVIDIA's plugin answers: the IMEX channels (``NVIDIA_IMEX_CHANNELS`` under
``envvar``, a ``/dev/null`` mount under ``volume-mounts``, the channel node with
``passDeviceSpecs``, ``<vendor>/imex-channel=<id>`` for CDI), the ``<vendor>/gds=all`` and
``<vendor>/mofed=all`` CDI devices when GDS/MOFED are enabled, and for an MPS-shared resource
the daemon's pipe directory and shared memory (mounted read-write) with
``CUDA_MPS_PIPE_DIRECTORY`` pointing at it.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Sequence

from dpkit.core import ContainerSpec, Device, DeviceNode, Mount, merge_specs
from dpkit.nvidia import hostfiles, mps
from dpkit.nvidia.config import Settings

VISIBLE_ENV = "NVIDIA_VISIBLE_DEVICES"
VOLUME_ROOT = "/var/run/nvidia-container-devices"
ANNOTATION_NAME = "nvidia-device-plugin"
IMEX_ENV = "NVIDIA_IMEX_CHANNELS"
IMEX_CHANNEL_DIR = "/dev/nvidia-caps-imex-channels"


def imex_channel_path(channel: int) -> str:
    return f"{IMEX_CHANNEL_DIR}/channel{channel}"


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
            # writable, as NVIDIA's plugin mounts it (its Mount leaves ReadOnly false)
            mounts = (Mount("/dev/null", f"{VOLUME_ROOT}/{visible}", read_only=False),)
        if settings.pass_device_specs:
            devices = tuple(DeviceNode(hostfiles.host_path(settings.dev_root, p), p, "rw")
                            for p in (*controls, *nodes))
    return ContainerSpec(devices=devices, mounts=mounts, env=env, cdi_devices=cdi)


def extra_cdi_devices(settings: Settings, imex_channels: Sequence[int]) -> tuple[str, ...]:
    """CDI devices every container gets besides its GPUs: IMEX channels, then GDS and MOFED."""
    names = [f"{settings.cdi_vendor}/imex-channel={c}" for c in imex_channels]
    if settings.gds_enabled:
        names.append(f"{settings.cdi_vendor}/gds=all")
    if settings.mofed_enabled:
        names.append(f"{settings.cdi_vendor}/mofed=all")
    return tuple(names)


def imex_spec(settings: Settings, channels: Sequence[int]) -> ContainerSpec:
    """The IMEX channels as the non-CDI strategies pass them."""
    if not channels or settings.all_cdi:
        return ContainerSpec()
    env: dict[str, str] = {}
    mounts: tuple[Mount, ...] = ()
    nodes: tuple[DeviceNode, ...] = ()
    if "envvar" in settings.list_strategies:
        env[IMEX_ENV] = ",".join(str(c) for c in channels)
    if "volume-mounts" in settings.list_strategies:
        mounts = tuple(Mount("/dev/null", f"{VOLUME_ROOT}/imex/{c}", read_only=False) for c in channels)
    if settings.pass_device_specs:
        nodes = tuple(DeviceNode(hostfiles.host_path(settings.dev_root, imex_channel_path(c)), imex_channel_path(c),
                                 "rw") for c in channels)
    return ContainerSpec(devices=nodes, mounts=mounts, env=env)


def mps_spec(settings: Settings, resource: str) -> ContainerSpec:
    """What a client of the resource's MPS control daemon needs: its pipe directory and shared memory."""
    pipe = mps.container_pipe_dir(resource)
    return ContainerSpec(
        env={"CUDA_MPS_PIPE_DIRECTORY": pipe},
        mounts=(Mount(os.path.join(settings.mps_root, resource, mps.PIPE), pipe, read_only=False),
                Mount(os.path.join(settings.mps_root, mps.SHM), mps.CONTAINER_SHM, read_only=False)),
    )


def container_spec(settings: Settings, devices: Sequence[Device], resource: str = "",
                   imex_channels: Sequence[int] = ()) -> ContainerSpec:
    """The merged spec for a container given ``devices`` (replicas of one GPU count once)."""
    spec = merge_specs(d.spec for d in devices)
    extras = extra_cdi_devices(settings, imex_channels)
    if settings.mps and resource and any("replicas" in d.attributes for d in devices):
        spec = spec.merge(mps_spec(settings, resource))
    spec = spec.merge(imex_spec(settings, imex_channels))
    if "cdi-cri" in settings.list_strategies and extras:
        spec = spec.merge(ContainerSpec(cdi_devices=extras))
    if "cdi-annotations" not in settings.list_strategies:
        return spec
    visible = list(dict.fromkeys(visible_id(settings, dict(d.attributes)) for d in devices))
    key = f"{settings.cdi_annotation_prefix}{ANNOTATION_NAME}_{uuid.uuid4()}"
    value = ",".join([*(f"{settings.cdi_kind}={v}" for v in visible), *extras])
    return spec.merge(ContainerSpec(annotations={key: value}))
