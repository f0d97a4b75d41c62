"""Turn what NVML reported into dpkit resources, as NVIDIA's plugin names and shapes them.

MIG strategies: ``none`` advertises every GPU whole; ``single`` advertises the MIG devices of a
node where every GPU is in MIG mode with one profile, as ``nvidia.com/gpu``; ``mixed`` advertises
MIG devices per profile (``nvidia.com/mig-1g.10gb``) next to the GPUs not in MIG mode. Then
time-slicing replicates devices. Anything that cannot be advertised becomes a Finding for
``dpkit discover``; anything advertised but unusable is Unhealthy with the reason.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace

from dpkit.core import ContainerSpec, Device, Finding, Health, ValidationError
from dpkit.nvidia import hostfiles, sharing, spec
from dpkit.nvidia.config import DEFAULT_GPU_RESOURCE, Settings, gpu_rules, mig_resource
from dpkit.nvidia.nodeinfo import GpuInfo, MigInfo, NodeInfo

NODE_HINT = "load the driver's device nodes (nvidia-modprobe, or the driver container) and check nvidiaDevRoot"


@dataclass(frozen=True)
class Unit:
    """One physical thing a pod can get: a whole GPU or a MIG device, before replication."""

    resource: str
    uuid: str
    index: str
    gpu: GpuInfo
    mig: MigInfo | None = None
    nodes: tuple[str, ...] = ()
    problems: tuple[str, ...] = ()


@dataclass(frozen=True)
class Inventory:
    snapshot: dict[str, tuple[Device, ...]]
    findings: tuple[Finding, ...] = ()
    gpus: tuple[GpuInfo, ...] = ()
    driver: str = ""
    cuda: str = ""
    units: tuple[Unit, ...] = field(default=())
    imex_channels: tuple[int, ...] = ()  # configured IMEX channels whose node exists


def default_resources(settings: Settings) -> tuple[str, ...]:
    """Resource names served even with no GPU, so the node reports them (as zero)."""
    names = list(dict.fromkeys(r.name for r in gpu_rules(settings)))
    for shared in settings.shared:
        if shared.name in names and shared.rename and shared.devices == "all":
            names[names.index(shared.name)] = shared.rename
    return tuple(dict.fromkeys(names))


def empty(settings: Settings, findings: Iterable[Finding]) -> Inventory:
    return Inventory({name: () for name in default_resources(settings)}, tuple(findings))


def build(settings: Settings, node: NodeInfo) -> Inventory:
    """Resources and devices for ``node``; see the module docstring for the rules."""
    findings = [Finding(i.subject, False, i.reason, hint=i.hint) for i in node.issues]
    minors: dict[str, int] = {}
    minors_problem = ""
    if settings.pass_device_specs and any(g.mig_enabled for g in node.gpus):
        minors, minors_problem = hostfiles.mig_minors(settings.proc_root)
    units: list[Unit] = []
    for gpu in node.gpus:
        if gpu.mig_pending != gpu.mig_enabled:
            findings.append(Finding(
                f"GPU {gpu.index} ({gpu.uuid})", not gpu.problem,
                f"MIG mode change pending: {_mig_word(gpu.mig_enabled)} now, {_mig_word(gpu.mig_pending)} "
                "after the next GPU reset; advertised in its current mode",
                hint="reset the GPU (nvidia-smi -r) or reboot to apply the pending MIG mode"))
        if settings.mig_strategy != "none" and gpu.mig_enabled:
            units.extend(_mig_units(settings, gpu, minors, minors_problem, findings))
        else:
            units.extend(_gpu_unit(settings, gpu, findings))
    units = _check_single(settings, units)
    channels, imex_problem = _imex_channels(settings, findings)
    if imex_problem:
        units = [replace(u, problems=(*u.problems, imex_problem)) for u in units]
    for unit in units:
        for node_path in unit.nodes:
            problem = hostfiles.node_state(settings.dev_root, node_path)
            if problem:
                findings.append(Finding(f"{unit.index} ({unit.uuid})", not settings.pass_device_specs,
                                        f"device node {problem}", unit.resource, NODE_HINT))
    snapshot: dict[str, list[Device]] = {name: [] for name in default_resources(settings)}
    controls = spec.present_control_nodes(settings) if settings.pass_device_specs else ()
    for resource, device_id, unit, replicas in _replicate(settings, units):
        device = _device(settings, device_id, unit, replicas, controls, node, findings)
        if device is not None:
            snapshot.setdefault(resource, []).append(device)
    return Inventory({r: tuple(d) for r, d in snapshot.items()}, tuple(findings), node.gpus, node.driver,
                     node.cuda, tuple(units), channels)


def _imex_channels(settings: Settings, findings: list[Finding]) -> tuple[tuple[int, ...], str]:
    """The configured channels whose node exists, and a problem when a required one is missing.

    As NVIDIA's plugin: a missing channel is skipped unless ``imex.required``; then the plugin
    serves nothing (NVIDIA's exits at start; dpkit keeps running with every device Unhealthy
    and the reason, and serves them once the node appears).
    """
    present = []
    for channel in settings.imex_channel_ids:
        path = spec.imex_channel_path(channel)
        problem = hostfiles.node_state(settings.dev_root, path)
        if not problem:
            present.append(channel)
            continue
        findings.append(Finding(f"IMEX channel {channel}", False, f"not injected: {problem}",
                                hint="create the channel (nvidia-modprobe -i 0 or the IMEX driver) on the node"))
        if settings.imex_required:
            return tuple(present), f"required IMEX channel {channel} is missing ({problem})"
    return tuple(present), ""


def _mig_word(enabled: bool) -> str:
    return "enabled" if enabled else "disabled"


def _gpu_unit(settings: Settings, gpu: GpuInfo, findings: list[Finding]) -> list[Unit]:
    rule = next((r for r in gpu_rules(settings) if r.matches(gpu.name)), None)
    if rule is None:
        findings.append(Finding(f"GPU {gpu.index} ({gpu.uuid})", False,
                                f"product name {gpu.name!r} matches no resources.gpus pattern",
                                hint="add a pattern for it to resources.gpus in the config file"))
        return []
    problems = (gpu.problem,) if gpu.problem else ()
    return [Unit(rule.name, gpu.uuid, str(gpu.index), gpu, None, (f"/dev/nvidia{gpu.minor}",), problems)]


def _mig_units(settings: Settings, gpu: GpuInfo, minors: dict[str, int], minors_problem: str,
               findings: list[Finding]) -> list[Unit]:
    subject = f"GPU {gpu.index} ({gpu.uuid})"
    if not gpu.migs and not gpu.problem:
        findings.append(Finding(subject, False, "MIG mode is enabled but no MIG devices are configured",
                                hint="create GPU and compute instances (nvidia-smi mig -cgi ... -C) or disable MIG"))
    units = []
    for mig in gpu.migs:
        resource = mig_resource(settings, mig.profile)
        if resource is None:
            findings.append(Finding(f"MIG {gpu.index}:{mig.index} ({mig.uuid})", False,
                                    f"profile {mig.profile} matches no resources.mig pattern",
                                    hint="add a pattern for it to resources.mig in the config file"))
            continue
        problems = [gpu.problem] if gpu.problem else []
        nodes = [f"/dev/nvidia{gpu.minor}"]
        if settings.pass_device_specs:
            for cap in (f"gpu{gpu.minor}/gi{mig.gi}/access", f"gpu{gpu.minor}/gi{mig.gi}/ci{mig.ci}/access"):
                if cap in minors:
                    nodes.append(f"/dev/nvidia-caps/nvidia-cap{minors[cap]}")
                else:
                    problems.append(f"MIG capability {cap} not found ({minors_problem or 'missing from mig-minors'})")
        units.append(Unit(resource, mig.uuid, f"{gpu.index}:{mig.index}", gpu, mig, tuple(nodes), tuple(problems)))
    return units


def _check_single(settings: Settings, units: list[Unit]) -> list[Unit]:
    """``single`` needs every GPU in MIG mode with one profile; otherwise nothing is allocatable."""
    if settings.mig_strategy != "single":
        return units
    mine = [u for u in units if u.resource == DEFAULT_GPU_RESOURCE]
    migs = [u.mig for u in mine if u.mig is not None]
    if not migs:
        return units
    whole = sorted({u.index for u in mine if u.mig is None})
    profiles = sorted({m.profile for m in migs})
    if whole:
        problem = (f"migStrategy single: GPU {', '.join(whole)} not in MIG mode while others are; "
                   "use migStrategy mixed or enable MIG on every GPU")
    elif len(profiles) > 1:
        problem = f"migStrategy single needs one MIG profile on the node, found {', '.join(profiles)}; use mixed"
    else:
        return units
    return [replace(u, problems=(*u.problems, problem)) if u.resource == DEFAULT_GPU_RESOURCE else u for u in units]


def _replicate(settings: Settings, units: Sequence[Unit]) -> list[tuple[str, str, Unit, int]]:
    """(resource, device ID, unit, replicas) after time-slicing; unshared units keep their ID."""
    out: list[tuple[str, str, Unit, int]] = []
    by_name = {s.name: s for s in settings.shared}
    grouped: dict[str, list[Unit]] = {}
    for unit in units:
        grouped.setdefault(unit.resource, []).append(unit)
    for resource, members in grouped.items():
        shared = by_name.get(resource)
        chosen = _selected(shared.devices, members) if shared else []
        for unit in members:
            if shared is None or unit not in chosen:
                out.append((resource, unit.uuid, unit, 0))
                continue
            if settings.mps and unit.mig is not None:
                unit = replace(unit, problems=(*unit.problems, "sharing using MPS is not supported for MIG devices"))
            target = shared.rename or resource
            out.extend((target, sharing.replica_id(unit.uuid, n), unit, shared.replicas)
                       for n in range(shared.replicas))
    return out


def _selected(devices: str | int | tuple[str, ...], members: list[Unit]) -> list[Unit]:
    if devices == "all":
        return members
    if isinstance(devices, int):
        return members[:devices]
    refs = set(devices)
    return [u for u in members if u.uuid in refs or u.index in refs]


def _device(settings: Settings, device_id: str, unit: Unit, replicas: int, controls: Sequence[str],
            node: NodeInfo, findings: list[Finding]) -> Device | None:
    gpu, mig = unit.gpu, unit.mig
    attributes = {
        "product": gpu.name, "uuid": unit.uuid, "index": unit.index, "gpu": gpu.uuid,
        "memory_mib": str(mig.memory_mb if mig else gpu.memory >> 20), "minor": str(gpu.minor),
        "pci": gpu.bus_id, "driver": node.driver, "cuda": node.cuda,
    }
    if mig is not None:
        attributes.update({"mig_profile": mig.profile, "gi": str(mig.gi), "ci": str(mig.ci)})
    if replicas:
        attributes["replicas"] = str(replicas)
    problems = list(unit.problems)
    if settings.pass_device_specs:
        problems += [f"device node {p}" for n in unit.nodes if (p := hostfiles.node_state(settings.dev_root, n))]
    try:
        device_spec = spec.device_spec(settings, spec.visible_id(settings, attributes), unit.nodes, controls)
    except ValidationError as exc:
        device_spec = ContainerSpec()
        problems.append(f"container spec rejected: {exc}")
    try:
        return Device(
            id=device_id,
            health=Health.UNHEALTHY if problems else Health.HEALTHY,
            numa_nodes=() if gpu.numa is None else (gpu.numa,),
            spec=device_spec,
            reason="; ".join(problems),
            attributes=attributes,
        )
    except ValidationError as exc:
        findings.append(Finding(f"{unit.index} ({unit.uuid[:60]})", False, f"not advertised: {exc}", unit.resource))
        return None
