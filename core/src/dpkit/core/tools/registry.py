"""Which vendors this node has: the ``dpkit.vendors`` entry points, plus the built-in ``sim``.

A tool-level concern kept out of the vendor API, so the API never imports the simulator.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from dpkit.core.vendorapi.errors import VendorError

if TYPE_CHECKING:
    from dpkit.core.vendorapi.vendor import Vendor

#: vendor packages register here (``[project.entry-points."dpkit.vendors"]``)
ENTRY_POINT_GROUP = "dpkit.vendors"
#: the built-in simulated vendor, which needs no entry point
SIM_TARGET = "dpkit.core.tools.sim:SimulatedVendor"


def installed_vendors() -> dict[str, str]:
    """Entry-point name -> ``module:object`` for every installed vendor package."""
    from importlib.metadata import entry_points  # here: a serving process that never asks pays nothing

    return {ep.name: ep.value for ep in entry_points(group=ENTRY_POINT_GROUP)}


def load_vendor_class(name: str) -> type[Vendor]:
    """The vendor class registered under ``name`` (``sim`` is built in)."""
    if name == "sim":
        from dpkit.core.tools.sim import SimulatedVendor

        return SimulatedVendor
    from importlib.metadata import entry_points  # about 3 MB resident: only when a vendor is looked up

    matches = [ep for ep in entry_points(group=ENTRY_POINT_GROUP) if ep.name == name]
    if not matches:
        known = ", ".join(sorted(installed_vendors())) or "none installed"
        raise VendorError(f"unknown vendor {name!r} (installed: {known}; built in: sim)")
    try:
        obj = matches[0].load()
    except Exception as exc:  # an import error in a vendor package must not kill the CLI
        raise VendorError(f"vendor {name!r} failed to load from {matches[0].value}: {exc}") from exc
    from dpkit.core.vendorapi.vendor import Vendor  # the device model loads only once a vendor is looked up

    if not (isinstance(obj, type) and issubclass(obj, Vendor)):
        raise VendorError(f"vendor {name!r} entry point {matches[0].value} is not a dpkit Vendor class")
    return obj
