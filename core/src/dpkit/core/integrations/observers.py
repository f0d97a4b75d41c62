"""Optional integrations attached to a running manager, each enabled by its config key.

Every integration is an :class:`~dpkit.core.engine.state.Observer`: it sees the plugin only
through the immutable :class:`~dpkit.core.engine.state.PluginState` the manager publishes, on
its own thread, and adds its own part to ``dpkit status``. None imports the manager: what it
needs besides the state (the guarded vendor calls, its config) is handed over here.

=========================  ==========================================  =====================
config key                 integration                                 module
=========================  ==========================================  =====================
``pod_resources_socket``   which pod/container holds each device       :mod:`podresources`
``cdi_dir``                CDI spec files (+ ``cdi_allocate``)         :mod:`cdi`
``nfd_features_dir``       node-feature-discovery label file           :mod:`labels`
``metrics_address``        Prometheus endpoint                         :mod:`metrics`
=========================  ==========================================  =====================
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from dpkit.core.engine.state import Observer, PluginState
from dpkit.core.support import files
from dpkit.core.support.files import write_atomic
from dpkit.core.support.logs import get_logger
from dpkit.core.vendorapi.errors import ConfigError

if TYPE_CHECKING:  # annotations only: `dpkit run` imports this before anything loads grpc
    from dpkit.core.engine.server import RpcObserver
    from dpkit.core.engine.vendor_calls import VendorCalls
    from dpkit.core.support.config import Config
    from dpkit.core.vendorapi.device import ContainerSpec, Device

log = get_logger("observers")


class Host(Protocol):
    """What attaching needs of the manager: its config, vendor calls and the slots it fills."""

    config: Config
    calls: VendorCalls
    observers: list[Observer]
    rpc_observer: RpcObserver | None
    cdi_spec: Callable[[str, Sequence[Device]], ContainerSpec] | None

    def current_state(self, timeout: float = ...) -> PluginState: ...


def attach_observers(host: Host) -> list[Observer]:
    """Attach the integrations the config enables, before ``manager.start()``; returns them.

    Raises :class:`ConfigError` naming the key when the settings contradict each other or an
    address is malformed.
    """
    # Each integration is imported only when enabled: prometheus_client alone is ~5 MB resident.
    from dpkit.core.integrations.cdi import CdiWriter
    from dpkit.core.integrations.labels import NodeLabelWriter
    from dpkit.core.integrations.podresources import PodResourcesView

    config = host.config
    if config.cdi_allocate and not config.cdi_dir:
        raise ConfigError(f"{config.source}: key 'cdi_allocate' is true but 'cdi_dir' is empty; "
                          "set cdi_dir (usually /var/run/cdi) or turn cdi_allocate off")
    attached: list[Observer] = []
    view = PodResourcesView(config.pod_resources_socket) if config.pod_resources_socket else None
    if view is not None:
        attached.append(view)
    if config.cdi_dir:
        writer = CdiWriter(host.calls, config.cdi_dir, allocate=config.cdi_allocate)
        host.cdi_spec = writer.cdi_spec
        attached.append(writer)
    if config.nfd_features_dir:
        attached.append(NodeLabelWriter(host.calls, config.nfd_features_dir))
    if config.metrics_address:
        from dpkit.core.integrations.metrics import Metrics

        metrics = Metrics(host.calls, config.metrics_address, source=host.current_state, pod_view=view)
        host.rpc_observer = metrics
        attached.append(metrics)
    host.observers.extend(attached)
    return attached


def remove_quietly(path: Path) -> None:
    """Remove a file we wrote; a failure is logged (by this module's logger), never raised."""
    files.remove_quietly(path, log)


__all__ = ["Host", "attach_observers", "remove_quietly", "write_atomic"]
