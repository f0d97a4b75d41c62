"""The core's layout shows its architecture (issue 11): layers import downwards only, no module
imports itself back through another, and vendors see only the public ``dpkit.core`` API.

Read from the source with ``ast``, counting imports inside functions too (a lazy import is still a
dependency); imports under ``if TYPE_CHECKING`` are annotations only and do not count.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import dpkit.core

ROOT = Path(__file__).resolve().parents[2]
CORE = ROOT / "core" / "src"
#: lower layers first: a module may import its own layer and the ones before it
LAYERS = ("vendorapi", "support", "engine", "integrations", "tools")


def _module_name(path: Path, src: Path) -> str:
    parts = path.relative_to(src).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _core_modules() -> dict[str, Path]:
    return {_module_name(p, CORE): p for p in (CORE / "dpkit" / "core").rglob("*.py") if "api" not in p.parts}


def _imports(path: Path) -> set[str]:
    """Every dpkit module ``path`` imports, outside ``if TYPE_CHECKING`` blocks."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                for other in child.orelse:
                    visit(other)
                continue
            if isinstance(child, ast.Import):
                found.update(a.name for a in child.names if a.name.startswith("dpkit."))
            elif isinstance(child, ast.ImportFrom) and child.module and child.module.startswith("dpkit."):
                found.add(child.module)
                found.update(f"{child.module}.{a.name}" for a in child.names)
            visit(child)

    visit(ast.parse(path.read_text(), str(path)))
    return found


def _graph() -> dict[str, set[str]]:
    modules = _core_modules()
    return {name: {m for m in _imports(path) if m in modules and m != name} for name, path in modules.items()}


def _layer(module: str) -> str | None:
    parts = module.split(".")
    return parts[2] if len(parts) > 3 and parts[2] in LAYERS else None


def test_the_core_has_no_import_cycles() -> None:
    graph = _graph()
    cycles: list[list[str]] = []
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done

    def walk(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append([*path[path.index(nxt):], nxt])
            elif nxt not in state:
                walk(nxt, [*path, nxt])
        state[node] = 2

    for start in sorted(graph):
        if start not in state:
            walk(start, [start])
    assert cycles == []


def test_layers_import_only_downwards() -> None:
    wrong = []
    for module, deps in _graph().items():
        own = _layer(module)
        if own is None:
            continue
        for dep in deps:
            theirs = _layer(dep)
            if theirs is not None and LAYERS.index(theirs) > LAYERS.index(own):
                wrong.append(f"{module} -> {dep}")
    assert wrong == []


def test_the_vendor_api_and_support_layers_import_no_engine() -> None:
    """The vendor API is what a vendor package sees: it must load without the engine or grpc."""
    for module, deps in _graph().items():
        if _layer(module) in ("vendorapi", "support"):
            assert not [d for d in deps if _layer(d) in ("engine", "integrations", "tools")], module


@pytest.mark.parametrize("vendor", sorted(p.name for p in (ROOT / "plugins").iterdir() if (p / "src").is_dir()))
def test_vendors_import_only_the_public_core_api(vendor: str) -> None:
    private = []
    for path in (ROOT / "plugins" / vendor / "src").rglob("*.py"):
        for module in _imports(path):
            if module.startswith("dpkit.core") and module != "dpkit.core" and module.removeprefix("dpkit.core.") \
                    not in dpkit.core.__all__:
                private.append(f"{path.relative_to(ROOT)}: {module}")
    assert private == []


def test_every_public_name_resolves_lazily() -> None:
    for name in dpkit.core.__all__:
        assert getattr(dpkit.core, name) is not None, name
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        _ = dpkit.core.nope  # type: ignore[attr-defined]
