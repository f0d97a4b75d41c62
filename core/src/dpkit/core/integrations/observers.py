"""Optional integrations attached to a running manager, each enabled by its config key.

An observer is any object with some of ``on_devices(manager)``, ``rpc(resource, method,
seconds, ok)``, ``on_link_event(kind, resource)``, ``on_probe_event(kind, probe)``,
``status_fields(manager)`` and ``close()``; the manager calls what exists.

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

from pathlib import Path
from typing import TYPE_CHECKING, Any

from dpkit.core.support import files
from dpkit.core.support.files import write_atomic
from dpkit.core.support.logs import get_logger
from dpkit.core.vendorapi.errors import ConfigError

if TYPE_CHECKING:
    from dpkit.core.engine.manager import Manager

log = get_logger("observers")


def attach_observers(manager: Manager) -> list[Any]:
    """Attach the integrations the config enables, before ``manager.start()``; returns them.

    Raises :class:`ConfigError` naming the key when the settings contradict each other or an
    address is malformed.
    """
    # Each integration is imported only when enabled: prometheus_client alone is ~5 MB resident.
    from dpkit.core.integrations.cdi import CdiWriter
    from dpkit.core.integrations.labels import NodeLabelWriter
    from dpkit.core.integrations.podresources import PodResourcesView

    config = manager.config
    if config.cdi_allocate and not config.cdi_dir:
        raise ConfigError(f"{config.source}: key 'cdi_allocate' is true but 'cdi_dir' is empty; "
                          "set cdi_dir (usually /var/run/cdi) or turn cdi_allocate off")
    attached: list[Any] = []
    view = PodResourcesView(config.pod_resources_socket) if config.pod_resources_socket else None
    if view is not None:
        attached.append(view)
    if config.cdi_dir:
        attached.append(CdiWriter(manager, config.cdi_dir))
    if config.nfd_features_dir:
        attached.append(NodeLabelWriter(config.nfd_features_dir))
    if config.metrics_address:
        from dpkit.core.integrations.metrics import Metrics

        attached.append(Metrics(manager, config.metrics_address, pod_view=view))
    manager.observers.extend(attached)
    return attached


def remove_quietly(path: Path) -> None:
    """Remove a file we wrote; a failure is logged (by this module's logger), never raised."""
    files.remove_quietly(path, log)


__all__ = ["attach_observers", "remove_quietly", "write_atomic"]
