"""Which vendors this node has: the ``dpkit.vendors`` entry points, plus the built-in ``sim``.

A tool-level concern kept out of the vendor API, so the API never imports the simulator.
"""

from __future__ import annotations

import importlib
import os
import re
import sys
from typing import TYPE_CHECKING, NamedTuple

from dpkit.core.vendorapi.errors import VendorError

if TYPE_CHECKING:
    from dpkit.core.vendorapi.vendor import Vendor

#: vendor packages register here (``[project.entry-points."dpkit.vendors"]``)
ENTRY_POINT_GROUP = "dpkit.vendors"
#: the built-in simulated vendor, which needs no entry point
SIM_TARGET = "dpkit.core.tools.sim:SimulatedVendor"


class EntryTarget(NamedTuple):
    """One entry point: ``value`` is ``module:object``; ``distribution`` the package that declares it."""

    value: str
    distribution: str


def installed_vendors() -> dict[str, str]:
    """Entry-point name -> ``module:object`` for every installed vendor package."""
    return {name: target.value for name, target in entry_points(ENTRY_POINT_GROUP).items()}


def load_vendor_class(name: str) -> type[Vendor]:
    """The vendor class registered under ``name`` (``sim`` is built in)."""
    if name == "sim":
        from dpkit.core.tools.sim import SimulatedVendor

        return SimulatedVendor
    found = entry_points(ENTRY_POINT_GROUP).get(name) or metadata_entry_points(ENTRY_POINT_GROUP).get(name)
    if found is None:
        known = ", ".join(sorted(installed_vendors())) or "none installed"
        raise VendorError(f"unknown vendor {name!r} (installed: {known}; built in: sim)")
    target = found.value
    try:
        obj = load(target)
    except Exception as exc:  # an import error in a vendor package must not kill the CLI
        raise VendorError(f"vendor {name!r} failed to load from {target}: {exc}") from exc
    from dpkit.core.vendorapi.vendor import Vendor  # the device model loads only once a vendor is looked up

    if not (isinstance(obj, type) and issubclass(obj, Vendor)):
        raise VendorError(f"vendor {name!r} entry point {target} is not a dpkit Vendor class")
    return obj


def load(value: str) -> object:
    """The object an entry point's ``module:object [extras]`` value names (imports the module)."""
    module, _, attribute = value.partition("[")[0].partition(":")
    obj: object = importlib.import_module(module.strip())
    for part in filter(None, attribute.strip().split(".")):
        obj = getattr(obj, part)
    return obj


def entry_points(group: str) -> dict[str, EntryTarget]:
    """``group``'s entry points, read from each installed distribution's ``entry_points.txt``.

    Reading the files directly, in ``sys.path`` order with the first distribution of a name
    winning as ``importlib.metadata`` does, spares the serving process importlib.metadata and the
    email parser it loads for package metadata: 2.7 MB resident of a plugin that otherwise needs
    about 45 MB (and :func:`parse_entry_points` spares it configparser). A layout this scan does
    not know (a zipped egg, say) still resolves through :func:`metadata_entry_points`.
    """
    found: dict[str, EntryTarget] = {}
    seen: set[str] = set()
    for entry in sys.path:
        try:
            names = sorted(os.listdir(entry or "."))
        except OSError:
            continue
        for info in names:
            stem, dot, kind = info.rpartition(".")
            if not dot or kind not in ("dist-info", "egg-info"):
                continue
            distribution = re.sub(r"[-_.]+", "-", stem.partition("-")[0]).lower()  # PEP 503's normal form
            if distribution in seen:
                continue
            seen.add(distribution)
            try:
                with open(os.path.join(entry or ".", info, "entry_points.txt"), encoding="utf-8") as handle:
                    text = handle.read()
            except (OSError, UnicodeDecodeError):
                continue
            for key, value in parse_entry_points(text).get(group, {}).items():
                found.setdefault(key, EntryTarget(value, distribution))
    return found


def parse_entry_points(text: str) -> dict[str, dict[str, str]]:
    """Section -> name -> value of an ``entry_points.txt`` (PyPA's INI subset), names keeping their case.

    ``[section]`` headers, ``name = value`` lines, whole-line ``#`` or ``;`` comments, blank lines.
    A line that is none of these (or an entry before any header) is skipped, not fatal, so one
    broken line costs only itself. Hand-written because configparser is 70 KB of bytecode for this.
    """
    sections: dict[str, dict[str, str]] = {}
    current: dict[str, str] | None = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1].strip(), {})
            continue
        name, equals, value = line.partition("=")
        if current is None or not equals or not name.strip():
            continue
        current[name.strip()] = value.strip()
    return sections


def metadata_entry_points(group: str) -> dict[str, EntryTarget]:
    from importlib import metadata

    return {ep.name: EntryTarget(ep.value, ep.dist.name if ep.dist is not None else ep.value)
            for ep in metadata.entry_points(group=group)}
