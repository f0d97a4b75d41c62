"""``dpkit new-vendor NAME``: a vendor package that runs, tests, builds and deploys from the start.

Everything is made from the shared templates in ``dpkit/core/tools/templates/vendor`` into a dpkit
checkout: the package (``plugins/NAME``), its test against the kubelet emulator (``tests/NAME``),
its docs page and deploy overlay (``deploy/overlays/NAME``); its image is built from the shared
``images/Containerfile`` with the defaults of ``images/vendors.toml``, so it needs no file of its own.
Nothing existing is edited: ``hatch run test:all``, ``test:lint`` (scripts/lint.py) and
``images:build`` (images/build.py) find vendors on disk, so they cover NAME at once.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from dpkit.core.vendorapi.errors import DpkitError

NAME = re.compile(r"^[a-z][a-z0-9_]{0,30}$")
RESERVED = {"core", "sim", "test", "tests"}
DEVICES = 2  # placeholder devices the new vendor reports
FIRST_PORT = 9481  # metrics ports: one per vendor, so vendors can share a node
PLACEHOLDER = re.compile(r"\{\{(\w+)\}\}")


@dataclass
class Scaffolded:
    """What was made; ``updated`` and ``notes`` stay empty today (no existing file needs an edit)."""

    created: list[Path] = field(default_factory=list)
    updated: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def render(template: str, values: dict[str, str]) -> str:
    """Replace each ``{{key}}``; an unknown key is a bug in the template, not something to leave in."""
    def one(match: re.Match[str]) -> str:
        key = match.group(1)
        if key not in values:
            raise DpkitError(f"template placeholder {{{{{key}}}}} has no value")
        return values[key]

    return PLACEHOLDER.sub(one, template)


def _template(name: str) -> str:
    return resources.files("dpkit.core.tools").joinpath("templates", "vendor", name).read_text()


def _next_port(root: Path) -> int:
    """One above the highest metrics port of the existing overlays."""
    ports = [FIRST_PORT - 1]
    for config in (root / "deploy" / "overlays").glob("*/config.yaml"):
        ports += [int(p) for p in re.findall(r'^metrics_address:\s*"?[^"\n]*:(\d+)"?\s*$', config.read_text(), re.M)]
    return max(ports) + 1


def values_for(name: str, port: int) -> dict[str, str]:
    words = name.split("_")
    dns = name.replace("_", "-")
    return {
        "name": name, "dns": dns, "dist": f"dpkit-{dns}", "wheel": f"dpkit_{name}",
        "class": "".join(w.capitalize() for w in words) + "Vendor",
        "resource": f"{dns}.example.com/device", "env": f"{name.upper()}_VISIBLE_DEVICES",
        "count": str(DEVICES), "port": str(port),
    }


def check_name(name: str) -> None:
    if not NAME.match(name) or name in RESERVED:
        raise DpkitError(f"vendor name {name!r}: use 1-31 lower-case letters, digits and '_', starting with a "
                         f"letter (it is a Python package name), and not one of {', '.join(sorted(RESERVED))}")


def scaffold(name: str, root: Path) -> Scaffolded:
    """Make vendor ``name`` in the checkout at ``root``; refuses to overwrite anything."""
    check_name(name)
    if not (root / "core" / "pyproject.toml").is_file() or not (root / "plugins").is_dir():
        raise DpkitError(f"{root} is not a dpkit checkout (no core/pyproject.toml and plugins/); "
                         "run this in the repository root or pass --root")
    values = values_for(name, _next_port(root))
    package = root / "plugins" / name
    files = {
        package / "pyproject.toml": "pyproject.toml.tmpl",
        package / "README.md": "README.md.tmpl",
        package / "src" / "dpkit" / name / "__init__.py": "__init__.py.tmpl",
        package / "src" / "dpkit" / name / "vendor.py": "vendor.py.tmpl",
        package / "src" / "dpkit" / name / "py.typed": "",
        root / "tests" / name / f"test_{name}_vendor.py": "test_vendor.py.tmpl",
        root / "docs" / f"{name}.md": "doc.md.tmpl",
        root / "deploy" / "overlays" / name / "kustomization.yaml": "kustomization.yaml.tmpl",
        root / "deploy" / "overlays" / name / "daemonset.yaml": "daemonset.yaml.tmpl",
        root / "deploy" / "overlays" / name / "config.yaml": "config.yaml.tmpl",
    }
    existing = [str(p.relative_to(root)) for p in files if p.exists()]
    existing += [str(package.relative_to(root))] if package.exists() else []
    if existing:
        raise DpkitError(f"vendor {name!r} exists already in {root}: {', '.join(sorted(set(existing)))}")
    rendered = {path: render(_template(tmpl), values) if tmpl else "" for path, tmpl in files.items()}
    done = Scaffolded()
    for path, text in rendered.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        done.created.append(path)
    return done
