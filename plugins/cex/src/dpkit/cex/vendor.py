"""The IBM Crypto Express vendor: APQNs of the s390 AP bus, offered per crypto config set.

Read like configuration of the core: discovery is a full snapshot of every set
(:mod:`dpkit.cex.inventory` over an :mod:`dpkit.cex.apbus` scan); :meth:`CexVendor.watch`
rescans on AP uevents and every poll interval and reconciles zcrypt nodes against the kubelet,
while a thread of its own re-reads ``cex_resources.json`` when it changes (a slow or hostile file
never delays health); :meth:`CexVendor.container_spec` describes
the container's restricted zcrypt node and shadow sysfs, which :meth:`CexVendor.pre_start`
makes (:mod:`dpkit.cex.zcrypt`, :mod:`dpkit.cex.shadow`) before triggering a reconcile. See
docs/cex.md.
"""

from __future__ import annotations

import os
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from dpkit.cex import shadow
from dpkit.cex.apbus import ApBus, apqn_name, scan
from dpkit.cex.cryptoconfig import (
    MODES,
    RESOURCE_DOMAIN,
    ConfigSet,
    CryptoConfig,
    file_digest,
    read_crypto_config,
    read_machine_id,
    unreadable,
)
from dpkit.cex.inventory import Inventory, build, device_id, parse_device_id
from dpkit.cex.nodes import NodeKeeper
from dpkit.cex.settings import CexSettings, load_settings
from dpkit.cex.zcrypt import NODE_PREFIX, ZcryptNodes
from dpkit.core import (
    Check,
    ConfigError,
    ContainerSpec,
    Device,
    DeviceNode,
    DpkitError,
    EventSink,
    Finding,
    Holder,
    MetricSample,
    Mount,
    PodResourcesClient,
    PodResourcesError,
    Snapshot,
    Uevent,
    UeventWatcher,
    Vendor,
    get_logger,
    kv,
)

log = get_logger("cex")

CONTAINER_NODE = "/dev/z90crypt"
_UNREADABLE = "unreadable"  # stands for a digest in CexVendor._rejected


def holdings(client: PodResourcesClient) -> list[tuple[Holder, str, tuple[str, ...]]]:
    """(container, resource, its device IDs) for every container holding cex devices.

    The core's client answers per device; a zcrypt node is per container (named after its
    first device), so the answer is regrouped here.
    """
    grouped: dict[tuple[Holder, str], list[str]] = {}
    for resource, devices in client.holders().items():
        if not resource.startswith(RESOURCE_DOMAIN + "/"):
            continue
        for device, holders in devices.items():
            for holder in holders:
                grouped.setdefault((holder, resource), []).append(device)
    return [(holder, resource, tuple(sorted(ids))) for (holder, resource), ids in sorted(grouped.items())]


class CexError(DpkitError):
    """An allocation this vendor must refuse; the message says why and what to request instead."""


def container_key(devices: Sequence[Device]) -> tuple[str, list[tuple[int, int]]]:
    """The node/shadow key of a container's devices and its distinct APQNs.

    Raises :class:`CexError` for foreign IDs, and for APQNs that do not form a full
    adapter x domain grid: a zcrypt node opens every adapter of its ``apmask`` with every
    domain of its ``aqmask``, so (1,6) + (2,7) would also open (1,7) and (2,6).
    """
    parsed = []
    for d in devices:
        ids = parse_device_id(d.id)
        if ids is None:
            raise CexError(f"device ID {d.id!r} is not a cex APQN device")
        parsed.append(ids)
    if not parsed:
        raise CexError("no devices requested")
    parsed.sort()
    apqns = sorted({(a, d) for a, d, _ in parsed})
    adapters, domains = {a for a, _ in apqns}, {d for _, d in apqns}
    if len(apqns) != len(adapters) * len(domains):
        extra = sorted((a, d) for a in adapters for d in domains if (a, d) not in apqns)
        raise CexError(
            f"APQNs {', '.join(apqn_name(a, d) for a, d in apqns)} cannot share one zcrypt node: it would "
            f"also open {', '.join(apqn_name(a, d) for a, d in extra)}; request APQNs of one domain "
            "on different adapters (or one APQN) per container")
    return device_id(*parsed[0]), apqns


class CexVendor(Vendor):
    """IBM Crypto Express APQNs as ``cex.s390.ibm.com/<setname>`` resources."""

    name = "cex"
    description = "IBM Crypto Express APQNs (s390 AP bus), one resource per crypto config set"

    def __init__(self, config: Mapping[str, Any] | None = None, *, environ: Mapping[str, str] | None = None) -> None:
        super().__init__(config)
        self.settings: CexSettings = load_settings(self.config, os.environ if environ is None else environ)
        s = self.settings
        self.poll_interval = s.poll_interval
        self.crypto: CryptoConfig = read_crypto_config(s.config_file, overcommit=s.overcommit, livesysfs=s.live_sysfs)
        self.config_error = ""  # why the newest version of the file was rejected ("" when in use)
        self._rejected: str | None = None
        self.machine_id = read_machine_id(s.sysinfo_path)
        self.sysfs_root = Path(s.sysfs_root)
        self.shadow_base = Path(s.shadow_dir) if s.shadow_sysfs else None
        self.zcrypt = ZcryptNodes(s.sysfs_root, s.dev_dir, s.node_timeout, class_dir=s.class_dir)
        self.pod_resources = PodResourcesClient(s.pod_resources_socket, timeout=5.0)
        # live queue host paths: IBM's APSYSFS_DEVSDIR when set, else where the bus links lead
        self._devices_dir = s.devices_dir if s.ap_devices_dir else None
        self.keeper = NodeKeeper(self.zcrypt, self.shadow_base, unused_after=s.delete_unused_after,
                                 never_used_after=s.delete_never_used_after)
        self._reported: frozenset[tuple[str, str, str]] = frozenset()
        self._nodes_lock = threading.Lock()
        self._reconcile_lock = threading.Lock()
        self._warned: set[tuple[str, ...]] = set()
        for key in self.crypto.ignored:
            log.warning("ignored key in crypto config", extra=kv(key=key))

    # -- discovery -----------------------------------------------------------------------
    def scan(self) -> ApBus:
        return scan(self.sysfs_root, self.settings.bus_dir)

    def inventory(self) -> tuple[ApBus, Inventory]:
        bus = self.scan()
        return bus, build(self.crypto, bus, self.machine_id)

    def discover(self) -> Snapshot:
        _, inventory = self.inventory()
        self._report(inventory)
        return inventory.snapshot

    def _report(self, inventory: Inventory) -> None:
        """Log each reason an APQN is not advertised once, when it appears and when it clears."""
        now = frozenset((f.resource, f.subject, f.reason) for f in inventory.findings if not f.advertised)
        for resource, subject, reason in sorted(now - self._reported):
            log.warning("APQN not advertised", extra=kv(resource=resource or "-", apqn=subject, reason=reason))
        for resource, subject, reason in sorted(self._reported - now):
            log.info("APQN no longer held back", extra=kv(resource=resource or "-", apqn=subject, was=reason))
        self._reported = now

    def reload_config(self) -> bool:
        """Re-read ``cex_resources.json`` if it changed; True when a new version is in use.

        A version that fails verification, or cannot be parsed at all, is logged once as a
        rejected change and the previous one kept serving (IBM's plugin serves nothing until it
        is fixed; dropping every resource for a typo would evict nothing but block every new
        pod). Never raises: it runs on the config thread, whose death would freeze the config.
        """
        path = self.settings.config_file
        digest = file_digest(path)
        if digest == self.crypto.digest:  # unchanged, or back to the version in use
            self._rejected, self.config_error = None, ""
            return False
        if digest is None:
            if self._rejected != _UNREADABLE:
                self._rejected, self.config_error = _UNREADABLE, f"vendor.config_file: {unreadable(path, 'gone')}"
                log.error("crypto config change rejected: file unreadable; keeping the previous version",
                          extra=kv(file=path))
            return False
        if digest == self._rejected:  # already logged
            return False
        try:
            crypto = read_crypto_config(path, overcommit=self.settings.overcommit, livesysfs=self.settings.live_sysfs)
        except Exception as exc:  # ConfigError, or whatever else a hostile file provokes
            error = str(exc) if isinstance(exc, ConfigError) else f"{path}: {type(exc).__name__}: {str(exc)[:200]}"
            self._rejected, self.config_error = digest, error[:2000]
            log.error("crypto config change rejected; keeping the previous version", extra=kv(error=error[:2000]))
            return False
        self.crypto, self._rejected, self.config_error = crypto, None, ""
        if crypto.uses_machine_ids():
            self.machine_id = read_machine_id(self.settings.sysinfo_path)
        for key in crypto.ignored:
            log.warning("ignored key in crypto config", extra=kv(key=key))
        log.info("crypto config re-read", extra=kv(sets=",".join(s.setname for s in crypto.sets) or "none"))
        return True

    # -- watching --------------------------------------------------------------------------
    def _watch_config(self, done: threading.Event, changed: Callable[[], None]) -> None:
        """The config thread: re-read the file every ``config_check_interval``; call ``changed`` on a new version."""
        while not done.wait(self.settings.config_check_interval):
            if self.reload_config():
                changed()

    def watch(self, sink: EventSink, stop: threading.Event) -> None:
        """Rescan on AP uevents, new config versions and every poll interval; reconcile nodes.

        The file is parsed on a thread of its own, so however long a (hostile) file takes to
        parse or reject, APQN health keeps its pace here. Uevents are heard only from the real
        /sys (a test tree is polled).
        """
        s = self.settings
        next_poll = next_reconcile = 0.0

        def rescan(reason: str, events: Sequence[Uevent]) -> Snapshot | None:
            nonlocal next_poll, next_reconcile
            now, snapshot = time.monotonic(), None
            if reason != "timer" or now >= next_poll:  # the timer also runs for reconcile_interval
                snapshot, next_poll = self.discover(), now + s.poll_interval
            if now >= next_reconcile:
                self.reconcile()
                next_reconcile = time.monotonic() + s.reconcile_interval
            return snapshot

        watcher = UeventWatcher(rescan, interval=min(s.poll_interval, s.reconcile_interval), subsystems=("ap",),
                                listen=s.uevents and self.sysfs_root == Path("/sys"), sink=sink)
        done = threading.Event()  # ends the config thread when the watch ends, however it ends
        config_thread = threading.Thread(target=self._watch_config, args=(done, watcher.wake), name="cex-config",
                                         daemon=True)
        config_thread.start()
        try:
            watcher.run(stop)
        finally:
            done.set()
            config_thread.join(timeout=1.0)  # a parse in progress finishes on its own (daemon thread)

    # -- allocation --------------------------------------------------------------------------
    def _set(self, resource: str) -> ConfigSet:
        config_set = self.crypto.by_resource(resource)
        if config_set is None:
            raise CexError(f"{resource} is no longer a crypto config set in {self.crypto.source}")
        return config_set

    def _check_present(self, apqns: list[tuple[int, int]]) -> None:
        gone = [apqn_name(a, d) for a, d in apqns if not (self.settings.bus_dir / "devices" / apqn_name(a, d)).exists()]
        if gone:
            raise CexError(f"APQN(s) {', '.join(gone)} vanished from the AP bus")

    def container_spec(self, resource: str, devices: Sequence[Device]) -> ContainerSpec:
        """The container's own zcrypt node as /dev/z90crypt, its env and its shadow sysfs mounts.

        A description only: the core also asks it for ``doctor`` and CDI specs, so nothing is
        made here. The node and the shadow tree are made by :meth:`pre_start`, which the
        kubelet calls before the container is created.
        """
        config_set = self._set(resource)
        key, apqns = container_key(devices)
        self._check_present(apqns)
        mounts: list[Mount] = []
        if self.shadow_base is not None:
            tree = shadow.layout(self.shadow_base, key, apqns, live=config_set.livesysfs,
                                 bus_dir=self.settings.bus_dir, devices_dir=self._devices_dir)
            mounts += [Mount(str(tree.bus_dir), "/sys/bus/ap"), Mount(str(tree.devices_dir), "/sys/devices/ap")]
            mounts += [Mount(host, container) for host, container in tree.live]
        modes = sorted({d.attributes.get("mode", "") for d in devices} - {""})
        return ContainerSpec(
            devices=(DeviceNode(str(self.zcrypt.dev_path(NODE_PREFIX + key)), CONTAINER_NODE, "rw"),),
            mounts=tuple(mounts),
            env={"CEX_APQNS": ",".join(apqn_name(a, d) for a, d in apqns),
                 "CEX_MODE": config_set.cexmode or ",".join(modes),
                 "CEX_CONFIGSET": config_set.setname},
        )

    def pre_start(self, resource: str, devices: Sequence[Device]) -> None:
        """Make the container's restricted zcrypt node and shadow tree, then reconcile the others.

        Idempotent: a restarting container (or one whose node a node reboot took) gets them
        again. A node or tree left under the same key by an earlier container (its grace period
        not over yet) is re-restricted and rebuilt for these APQNs. A failure fails the container
        start with the reason; the kubelet retries.
        """
        config_set = self._set(resource)
        key, apqns = container_key(devices)
        with self._nodes_lock:
            bus = self.scan()
            gone = [apqn_name(a, d) for a, d in apqns if (a, d) not in bus.queues]
            if gone:
                raise CexError(f"APQN(s) {', '.join(gone)} vanished from the AP bus")
            self.keeper.provisioned(key)
            created = not self.zcrypt.exists(NODE_PREFIX + key)
            # masks are written every time: the key is a device ID, and a node left by the
            # container that had it before may have been made for other APQNs
            dev = self.zcrypt.ensure(NODE_PREFIX + key, {a for a, _ in apqns}, {d for _, d in apqns})
            if self.shadow_base is not None and (created or not shadow.matches(self.shadow_base, key, apqns)):
                try:
                    shadow.build(self.shadow_base, key, bus, apqns, live=config_set.livesysfs,
                                 devices_dir=self._devices_dir)
                except DpkitError:
                    if created:
                        self.zcrypt.destroy(NODE_PREFIX + key)
                    raise
        log.info("container node ready", extra=kv(resource=resource, node=dev.name,
                                                  apqns=" ".join(apqn_name(a, d) for a, d in apqns)))
        threading.Thread(target=self.reconcile, name="cex-reconcile", daemon=True).start()

    def preferred_allocation(
        self, resource: str, available: Sequence[Device], must_include: Sequence[Device], size: int
    ) -> Sequence[str] | None:
        """Spread containers over APQNs, least shared first; several APQNs: one domain, distinct adapters.

        None (the core's default) when the request cannot be met that way.
        """
        slots: dict[tuple[int, int], list[str]] = {}
        for d in available:
            parsed = parse_device_id(d.id)
            if parsed is None:
                return None
            slots.setdefault(parsed[:2], []).append(d.id)
        chosen = [d.id for d in must_include]
        must = {p[:2] for p in (parse_device_id(i) for i in chosen) if p is not None}
        if len(chosen) >= size or len({d for _, d in must}) > 1:
            return None
        if size == 1:
            best = min(slots, key=lambda q: (-len(slots[q]), q), default=None)
            return None if best is None else [sorted(slots[best])[0]]
        free = Counter(d for (_, d), ids in slots.items() for _ in ids)
        domains = sorted({d for _, d in must}) or sorted(free, key=lambda d: (-free[d], d))
        for domain in domains:
            in_domain = [q for q in slots if q[1] == domain and q not in must]
            candidates = sorted(in_domain, key=lambda q: (-len(slots[q]), q))
            pick = chosen + [sorted(set(slots[q]) - set(chosen))[0] for q in candidates[: size - len(chosen)]]
            if len(pick) == size:
                return pick
        return None

    # -- reconcile -------------------------------------------------------------------------
    def reconcile(self) -> list[str]:
        """Remove zcrypt nodes and shadow trees no container holds; the keys removed."""
        if not self._reconcile_lock.acquire(blocking=False):
            return []
        try:
            try:
                held = holdings(self.pod_resources)
            except PodResourcesError as exc:
                self._warn_once(("podresources", str(exc)), "cannot reconcile zcrypt nodes; keeping them all",
                                error=str(exc))
                return []
            self._check_projects(held)
            in_use = set()
            for _, _, device_ids in held:
                parsed = sorted(p for p in (parse_device_id(i) for i in device_ids) if p is not None)
                if parsed:
                    in_use.add(device_id(*parsed[0]))
            with self._nodes_lock:
                return self.keeper.reconcile(in_use)
        finally:
            self._reconcile_lock.release()

    def _check_projects(self, held: Iterable[tuple[Holder, str, tuple[str, ...]]]) -> None:
        """IBM's rule: a set's ``project`` should be the namespace using it (logged, not enforced)."""
        for h, resource, _ in held:
            config_set = self.crypto.by_resource(resource)
            if config_set is not None and config_set.project != h.namespace:
                self._warn_once(("project", h.namespace, h.pod, resource),
                                "container uses a crypto config set of another project",
                                namespace=h.namespace, pod=h.pod, container=h.container,
                                resource=resource, project=config_set.project)

    def _warn_once(self, key: tuple[str, ...], message: str, **fields: Any) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning(message, extra=kv(**fields))

    # -- explanations, checks, labels, metrics -------------------------------------------------
    def explain(self) -> list[Finding]:
        bus, inventory = self.inventory()
        source = self.crypto.source
        findings = [Finding(source, True, f"{len(self.crypto.sets)} crypto config set(s) in use")]
        if self.config_error:
            findings.append(Finding(source, False, f"newest version rejected, previous one still in use: "
                                    f"{self.config_error}", hint="fix the cex-resources-config ConfigMap "
                                    "(docs/cex.md)"))
        findings += [Finding(source, False, f"ignored key {k}") for k in self.crypto.ignored]
        findings += [Finding("AP bus", False, note) for note in bus.notes]
        if bus.present and not self.zcrypt.supported():
            findings.append(Finding(str(self.zcrypt.class_dir), False, "no extra zcrypt nodes: every Allocate "
                                    "will fail", hint="use a kernel with CONFIG_ZCRYPT_MULTIDEVNODES"))
        return findings + list(inventory.findings) + list(inventory.unassigned)

    def doctor(self) -> list[Check]:
        s = self.settings
        bus, inventory = self.inventory()
        advertised = sum(len(v) for v in inventory.snapshot.values())
        checks = [
            Check("AP bus present", bus.present, f"{bus.bus_dir} " + ("found" if bus.present else "missing"),
                  "load the ap and zcrypt modules; give the LPAR/guest crypto adapters"),
            Check("crypto config valid", not self.config_error,
                  self.config_error or f"{self.crypto.source}: {len(self.crypto.sets)} set(s)",
                  "fix cex_resources.json in the cex-resources-config ConfigMap (docs/cex.md)"),
            Check("zcrypt node creation", os.access(self.zcrypt.class_dir / "create", os.W_OK),
                  f"{self.zcrypt.class_dir}/create " + ("writable" if self.zcrypt.supported() else "missing"),
                  "needs CONFIG_ZCRYPT_MULTIDEVNODES and a privileged plugin pod with /sys writable"),
            Check("usage domains known", bus.usage_domains is not None,
                  f"{len(bus.usage_domains)} usage domain(s)" if bus.usage_domains is not None
                  else "ap_usage_domain_mask unreadable", f"check {bus.bus_dir}/ap_usage_domain_mask"),
            Check("device directory", Path(s.dev_dir).is_dir(), s.dev_dir, "mount the host's /dev into the plugin pod"),
            Check("APQNs advertised", advertised > 0, f"{advertised} device(s) in {len(inventory.snapshot)} set(s)",
                  "run 'dpkit discover cex' to see why APQNs are held back"),
        ]
        if self.shadow_base is not None:
            ok = self.shadow_base.is_dir() and os.access(self.shadow_base, os.W_OK | os.X_OK)
            checks.append(Check("shadow sysfs directory", ok, f"{self.shadow_base} " + ("writable" if ok else
                                "missing or not writable"), "mount a host directory there (hostPath), or "
                                "set shadow_sysfs: false"))
        if self.crypto.uses_machine_ids():
            checks.append(Check("machine id", self.machine_id is not None,
                                self.machine_id or f"cannot read {s.sysinfo_path}",
                                "mount /proc/sysinfo, or drop machineid from the sets"))
        try:
            held = holdings(PodResourcesClient(s.pod_resources_socket, timeout=2.0))
            checks.append(Check("pod-resources API", True, f"{len(held)} container(s) hold cex devices"))
        except PodResourcesError as exc:
            checks.append(Check("pod-resources API", False, str(exc), "mount /var/lib/kubelet/pod-resources; "
                                "without it unused zcrypt nodes are never removed"))
        return checks

    def node_labels(self, snapshot: Snapshot) -> Mapping[str, str]:
        bus = self.scan()
        usable = [a for a in bus.adapters.values() if not a.problems and a.mode is not None]
        labels = {f"{RESOURCE_DOMAIN}/adapters": str(len(usable))}
        for mode in MODES:
            labels[f"{RESOURCE_DOMAIN}/{mode}"] = str(any(a.mode == mode for a in usable)).lower()
        gens = [a.gen for a in usable if a.gen is not None]
        if gens:
            labels[f"{RESOURCE_DOMAIN}/generation"] = f"cex{max(gens)}"
        return labels

    def metric_samples(self) -> list[MetricSample]:
        """Per-APQN request counters (sysfs ``request_count``) and usability."""
        bus, inventory = self.inventory()
        samples = []
        for (adapter, domain), queue in sorted(bus.queues.items()):
            config_set = inventory.set_of.get((adapter, domain))
            labels = {"apqn": queue.name, "adapter": str(adapter), "domain": str(domain),
                      "set": config_set.setname if config_set else ""}
            count = bus.request_count(queue)
            if count is not None:
                samples.append(MetricSample("dpkit_cex_apqn_requests_total", "Requests the APQN has processed "
                                            "(sysfs request_count)", float(count), labels, "counter"))
            ok = not (queue.problems or bus.adapters[adapter].problems)
            samples.append(MetricSample("dpkit_cex_apqn_usable", "1 when the APQN and its adapter are online, "
                                        "configured and not checkstopped", 1.0 if ok else 0.0, labels))
        return samples
