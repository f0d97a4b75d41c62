"""Every installed vendor's metric names carry the ``dpkit_`` prefix and Prometheus base units (issue 14).

Dashboards and alerts key on metric names, so a name is part of the interface: one prefix for the
whole project (so ``{__name__=~"dpkit_.*"}`` finds everything dpkit exports) and base units only
(seconds, bytes, bits, ratios), as Prometheus's naming guide asks. Two views:

- static: the ``MetricSample(...)`` calls in each installed vendor's package, found with ``ast``.
  This sees samples a test host cannot trigger, and refuses names built at run time (a dashboard
  cannot rely on a name it cannot grep for);
- emitted: each vendor that can run on a temp-dir host is built from its entry point and its
  ``metric_samples()`` are checked too (counters end in ``_total``), and must be names the static
  scan found, so the scan cannot silently miss a call.
"""

from __future__ import annotations

import ast
import contextlib
import importlib.util
import os
import re
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest

from dpkit.core.tools.registry import installed_vendors, load_vendor_class
from dpkit.core.vendorapi.vendor import MetricSample, Vendor

NAME = re.compile(r"dpkit_[a-z][a-z0-9_]*")
#: name parts that mean a scaled or non-base unit, with the base unit to use instead
NON_BASE = {
    **dict.fromkeys(("ms", "millis", "milliseconds", "us", "usec", "micros", "microseconds", "ns", "nanoseconds",
                     "minute", "minutes", "min", "hour", "hours", "day", "days"), "seconds"),
    **dict.fromkeys(("kb", "kib", "mb", "mib", "gb", "gib", "tb", "tib", "kilobytes", "megabytes", "gigabytes"),
                    "bytes"),
    **dict.fromkeys(("kbps", "mbps", "gbps", "kbit", "mbit", "gbit", "megabits", "gigabits"), "bits_per_second"),
    **dict.fromkeys(("percent", "percentage", "pct", "permille"), "ratio (0-1)"),
    **dict.fromkeys(("fahrenheit", "kelvin"), "celsius"),
    **dict.fromkeys(("milliwatts", "mw", "kilowatts", "kw"), "watts"),
    **dict.fromkeys(("mhz", "ghz", "khz"), "hertz"),
}


def name_problems(name: str) -> list[str]:
    """Why ``name`` breaks the project's metric naming rules (empty when it complies)."""
    problems = []
    if not NAME.fullmatch(name):
        problems.append("must match dpkit_[a-z][a-z0-9_]*")
    problems += [f"'{part}' is not a base unit: use {NON_BASE[part]}" for part in name.split("_") if part in NON_BASE]
    return problems


def _module_constants(tree: ast.Module) -> dict[str, str]:
    """Module-level ``NAME = "text"`` (or annotated) assignments, so a name held in a constant resolves."""
    constants: dict[str, str] = {}
    for node in tree.body:
        targets: list[ast.expr] = []
        if isinstance(node, ast.Assign):
            targets, value = node.targets, node.value
        elif isinstance(node, ast.AnnAssign) and node.value is not None:
            targets, value = [node.target], node.value
        if targets and isinstance(value, ast.Constant) and isinstance(value.value, str):
            constants.update({t.id: value.value for t in targets if isinstance(t, ast.Name)})
    return constants


def scan_metric_names(package_dir: Path) -> list[tuple[str, str | None]]:
    """``(file:line, name)`` for every ``MetricSample(...)`` call under ``package_dir``; None: not a static name."""
    found: list[tuple[str, str | None]] = []
    for path in sorted(package_dir.rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        constants = _module_constants(tree)
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            func = node.func
            if not ((isinstance(func, ast.Name) and func.id == "MetricSample")
                    or (isinstance(func, ast.Attribute) and func.attr == "MetricSample")):
                continue
            arg = node.args[0] if node.args else next((k.value for k in node.keywords if k.arg == "name"), None)
            name: str | None = None
            if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                name = arg.value
            elif isinstance(arg, ast.Name):
                name = constants.get(arg.id)
            found.append((f"{path.relative_to(package_dir)}:{node.lineno}", name))
    return found


def _package_dir(vendor: str) -> Path:
    """The directory of the package that holds a vendor's entry point (``dpkit.cex`` for ``dpkit.cex.vendor``)."""
    module = installed_vendors()[vendor].split(":")[0]
    package = module.rsplit(".", 1)[0] if "." in module else module
    spec = importlib.util.find_spec(package)
    assert spec is not None and spec.submodule_search_locations, f"{package} is not an importable package"
    return Path(next(iter(spec.submodule_search_locations)))


def _violations(found: list[tuple[str, str | None]]) -> list[str]:
    out = []
    for where, name in found:
        if name is None:
            out.append(f"{where}: the metric name is not a string constant (dashboards need a fixed name)")
        else:
            out += [f"{where}: {name}: {problem}" for problem in name_problems(name)]
    return out


VENDORS = sorted(installed_vendors())


def test_vendors_are_installed() -> None:
    """The parametrized tests below run per installed vendor; none installed would make them vacuous."""
    assert {"cex", "kvm_vfio", "nvidia", "sfc"} <= set(VENDORS)


@pytest.mark.parametrize("vendor", VENDORS)
def test_static_metric_names_have_the_prefix_and_base_units(vendor: str) -> None:
    found = scan_metric_names(_package_dir(vendor))
    assert not _violations(found), "\n".join(_violations(found))


# -- emitted samples ---------------------------------------------------------------------------
def _cex_config(root: Path) -> dict[str, object]:
    from cex.aptree import STANDARD_SETS, standard_tree, write_sets

    tree = standard_tree(root / "sys")
    tree.set("01.0005", "request_count", "4711")  # so the request counter is emitted too
    return {"config_file": str(write_sets(root / "cex_resources.json", STANDARD_SETS)), "sysfs_root": str(tree.root),
            "dev_dir": str(root / "dev"), "shadow_dir": str(root / "shadow"), "sysinfo_path": str(root / "sysinfo"),
            "pod_resources_socket": str(root / "no-kubelet.sock")}


def _sfc_config(root: Path) -> dict[str, object]:
    """One Solarflare function with one interface that is up at 25 Gb/s (the kernel's sysfs layout)."""
    function = root / "sys" / "devices" / "pci0000:00" / "0000:03:00.0"
    (function / "net" / "ens3f0").mkdir(parents=True)
    for name, text in {"vendor": "0x1924", "device": "0x0b03", "numa_node": "0"}.items():
        (function / name).write_text(text + "\n")
    for name, text in {"address": "00:0f:53:00:03:00", "speed": "25000", "operstate": "up", "carrier": "1"}.items():
        (function / "net" / "ens3f0" / name).write_text(text + "\n")
    devices = root / "sys" / "bus" / "pci" / "devices"
    devices.mkdir(parents=True)
    (devices / function.name).symlink_to(os.path.relpath(function, devices))
    (root / "sys" / "bus" / "pci" / "drivers" / "sfc").mkdir(parents=True)
    (function / "driver").symlink_to("../../../bus/pci/drivers/sfc")
    (root / "dev").mkdir()
    return {"sys_root": str(root / "sys"), "dev_root": str(root / "dev"),
            "onload": {"library_path": str(root / "no-onload")}}


def _kvm_vfio_config(root: Path) -> dict[str, object]:
    (root / "sys" / "bus" / "pci" / "devices").mkdir(parents=True)
    (root / "dev").mkdir()
    return {"sys_root": str(root / "sys"), "dev_root": str(root / "dev")}


def _build_nvidia(cls: type[Vendor], root: Path) -> Vendor:
    """Without NVML (a library path that does not exist): the GPU gauges and the failure counter still report."""
    config = {"config": {"version": "v1", "flags": {"nvidiaDriverRoot": str(root), "nvidiaDevRoot": str(root)}},
              "nvml_library": str(root / "libnvidia-ml.so.1"), "sysfs_root": str(root / "sys"),
              "proc_root": str(root / "proc"), "health_state_file": str(root / "health.json"), "nvml_timeout": 1.0}
    return cls(config, environ={})  # type: ignore[call-arg]


def _build_cex(cls: type[Vendor], root: Path) -> Vendor:
    return cls(_cex_config(root), environ={})  # type: ignore[call-arg]


#: how to build each vendor on a temp-dir host (config only, no real hardware or paths outside ``root``)
BUILDERS: dict[str, Callable[[type[Vendor], Path], Vendor]] = {
    "cex": _build_cex,
    "sfc": lambda cls, root: cls(_sfc_config(root)),
    "kvm_vfio": lambda cls, root: cls(_kvm_vfio_config(root)),
    "nvidia": _build_nvidia,
}


def _emitted(vendor: str, root: Path) -> list[MetricSample]:
    instance = BUILDERS[vendor](load_vendor_class(vendor), root)
    try:
        with contextlib.suppress(Exception):  # a vendor without its hardware may refuse; its samples still count
            instance.discover()
        return list(instance.metric_samples())
    finally:
        instance.close()


@pytest.mark.parametrize("vendor", [v for v in VENDORS if v in BUILDERS])
def test_emitted_samples_have_the_prefix_base_units_and_counter_suffix(vendor: str, tmp_path: Path) -> None:
    samples = _emitted(vendor, tmp_path)
    static = {name for _, name in scan_metric_names(_package_dir(vendor))}
    problems = [f"{s.name}: {p}" for s in samples for p in name_problems(s.name)]
    problems += [f"{s.name}: a counter's name ends in _total" for s in samples
                 if s.kind == "counter" and not s.name.endswith("_total")]
    problems += [f"{s.name}: only counters end in _total" for s in samples
                 if s.kind != "counter" and s.name.endswith("_total")]
    problems += [f"{s.name}: emitted but not found by the static scan" for s in samples if s.name not in static]
    assert not problems, "\n".join(problems)


def test_the_vendors_that_have_metrics_emit_them_here(tmp_path: Path) -> None:
    """The emitted-samples test checks something: each vendor with MetricSample calls emits on its test host."""
    for vendor in (v for v in VENDORS if v in BUILDERS):
        static = {name for _, name in scan_metric_names(_package_dir(vendor)) if name is not None}
        emitted = {s.name for s in _emitted(vendor, tmp_path / vendor)}
        assert emitted == static, f"{vendor}: static {sorted(static)}, emitted {sorted(emitted)}"


# -- the checker itself ------------------------------------------------------------------------
def test_the_scan_flags_old_names_scaled_units_and_run_time_names(tmp_path: Path) -> None:
    (tmp_path / "bad.py").write_text(textwrap.dedent("""
        from dpkit.core.vendorapi.vendor import MetricSample
        import dpkit.core.vendorapi.vendor as v
        OLD = "cex_apqn_usable"
        GOOD: str = "dpkit_x_link_speed_bits_per_second"
        def samples(kind):
            yield MetricSample(OLD, "h", 1.0)
            yield MetricSample("dpkit_x_latency_ms", "h", 1.0)
            yield v.MetricSample(name="dpkit_x_speed_mbps", help="h", value=1.0)
            yield MetricSample("dpkit_x_busy_percent", "h", 1.0)
            yield MetricSample(f"dpkit_x_{kind}", "h", 1.0)
            yield MetricSample(GOOD, "h", 1.0)
            yield MetricSample("dpkit_x_memory_bytes", "h", 1.0)
    """))
    violations = _violations(scan_metric_names(tmp_path))
    assert [v.split(":")[1] for v in violations] == ["7", "8", "9", "10", "11"]
    assert "cex_apqn_usable: must match" in violations[0]
    assert "'ms' is not a base unit: use seconds" in violations[1]
    assert "'mbps' is not a base unit: use bits_per_second" in violations[2]
    assert "'percent' is not a base unit" in violations[3]
    assert "not a string constant" in violations[4]
