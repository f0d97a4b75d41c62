"""``dpkit discover``: what a vendor would advertise, and why anything is not advertised."""

from __future__ import annotations

from typing import Any

from dpkit.core.engine.events import validate_snapshot
from dpkit.core.engine.vendor_calls import VendorCalls
from dpkit.core.vendorapi.validation import check_resource_name
from dpkit.core.vendorapi.vendor import Vendor

DEFAULT_TIMEOUT = 10.0  # seconds per vendor hook when the caller passes a bare Vendor (the config's default)


def explain(vendor: Vendor | VendorCalls) -> dict[str, Any]:
    """Run discovery once, without a kubelet, and collect the vendor's own explanations.

    The hooks run under the adapter's deadline: a hung driver call is reported, not waited on forever.
    """
    calls = VendorCalls(vendor, DEFAULT_TIMEOUT) if isinstance(vendor, Vendor) else vendor
    errors: list[str] = []
    try:
        raw = calls.discover()
    except Exception as exc:  # a discovery failure is exactly what this command must show
        raw, errors = {}, [f"discovery failed: {type(exc).__name__}: {exc}"]
    snapshot, problems = validate_snapshot(raw, check_resource_name)
    errors += problems
    try:
        findings = calls.explain()
    except Exception as exc:
        findings, errors = [], [*errors, f"explain failed: {type(exc).__name__}: {exc}"]
    resources = []
    for name, devices in sorted(snapshot.items()):
        resources.append({
            "name": name,
            "healthy": sum(1 for d in devices if d.healthy),
            "devices": [
                {"id": d.id, "health": str(d.health), "reason": d.reason,
                 "numa": ",".join(str(n) for n in d.numa_nodes), "attributes": dict(d.attributes)}
                for d in devices
            ],
        })
    return {
        "vendor": calls.name,
        "resources": resources,
        "findings": [
            {"subject": f.subject, "advertised": f.advertised, "reason": f.reason,
             "resource": f.resource, "hint": f.hint}
            for f in findings
        ],
        "errors": errors,
    }
