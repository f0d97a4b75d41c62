"""Optional integrations attached to a running manager, each enabled by its config key.

An observer is any object with some of ``on_devices(manager)``, ``rpc(resource, method,
seconds, ok)``, ``on_link_event(kind, resource)``, ``on_probe_event(kind, probe)``,
``status_fields(manager)`` and ``close()``; the manager calls what exists.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dpkit.core.manager import Manager


def attach_observers(manager: Manager) -> list[Any]:
    """Attach the integrations the config enables; returns them (for tests)."""
    attached: list[Any] = []
    manager.observers.extend(attached)
    return attached
