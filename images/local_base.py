"""Make a local BASE image with debootstrap, for building the images without any registry.

    python images/local_base.py [--tag localhost/dpkit-base:bookworm] [--cache DIR] [--engine E]

The result is a minimal Debian bookworm with python3 and venv, which is all the Containerfiles
need; pass it as ``--base`` to images/build.py. The root filesystem is kept in ``--cache`` so a
second run only imports it again. Needs root and debootstrap; uses the Debian mirror.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import IO

DEFAULT_TAG = "localhost/dpkit-base:bookworm"
DEFAULT_CACHE = Path("/var/tmp/dpkit-base")
SUITE = "bookworm"
PACKAGES = "python3-minimal,python3-venv"
MIRROR = "http://deb.debian.org/debian"


class BaseError(Exception):
    """The base cannot be made; the message says why."""


def _run(cmd: Sequence[str], log: IO[str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``cmd``; its output goes to ``log``, or is captured."""
    out: IO[str] | int = log if log is not None else subprocess.PIPE
    err: IO[str] | int = subprocess.STDOUT if log is not None else subprocess.PIPE
    try:
        return subprocess.run(list(cmd), check=False, text=True, stdout=out, stderr=err)
    except OSError as exc:
        raise BaseError(f"cannot run {cmd[0]}: {exc}") from exc


def rootfs(cache: Path) -> Path:
    """The debootstrapped tree under ``cache``, made once; ``.complete`` marks a finished one."""
    tree = cache / "rootfs"
    if (cache / ".complete").exists():
        return tree
    if os.geteuid() != 0:
        raise BaseError("debootstrap needs root")
    if not shutil.which("debootstrap"):
        raise BaseError("debootstrap is not installed (apt-get install debootstrap)")
    shutil.rmtree(tree, ignore_errors=True)
    cache.mkdir(parents=True, exist_ok=True)
    log = cache / "debootstrap.log"
    with log.open("w") as out:
        result = _run(["debootstrap", "--variant=minbase", f"--include={PACKAGES}", SUITE, str(tree), MIRROR], log=out)
    if result.returncode != 0:
        raise BaseError(f"debootstrap failed with exit code {result.returncode}; see {log}")
    (cache / ".complete").write_text(SUITE + "\n")
    return tree


def image_exists(engine: str, tag: str) -> bool:
    if engine == "buildah":
        return bool(_run(["buildah", "images", "-q", tag]).stdout.strip())
    return _run([engine, "image", "inspect", tag]).returncode == 0


def commit(engine: str, tree: Path, tag: str) -> None:
    """Turn ``tree`` into image ``tag``: buildah copies it into a scratch container, others import a tar."""
    if engine == "buildah":
        ctr = _run(["buildah", "from", "scratch"])
        if ctr.returncode != 0:
            raise BaseError(f"buildah from scratch failed: {ctr.stderr.strip()}")
        name = ctr.stdout.strip()
        try:
            for cmd in (["buildah", "copy", "-q", name, str(tree), "/"],
                        ["buildah", "config", "--cmd", "/bin/bash", name],
                        ["buildah", "commit", "-q", name, tag]):
                step = _run(cmd)
                if step.returncode != 0:
                    raise BaseError(f"{' '.join(cmd[:2])} failed: {step.stderr.strip()}")
        finally:
            _run(["buildah", "rm", name])
        return
    with tempfile.TemporaryDirectory() as tmp:
        tar = Path(tmp) / "rootfs.tar"
        packed = _run(["tar", "-C", str(tree), "-cf", str(tar), "."])
        if packed.returncode != 0:
            raise BaseError(f"tar failed: {packed.stderr.strip()}")
        imported = _run([engine, "import", str(tar), tag])
        if imported.returncode != 0:
            raise BaseError(f"{engine} import failed: {imported.stderr.strip()}")


def ensure_base(engine: str, tag: str = DEFAULT_TAG, cache: Path = DEFAULT_CACHE) -> str:
    """``tag`` in the engine's storage, made from the cached tree if it is not there yet."""
    if not image_exists(engine, tag):
        commit(engine, rootfs(cache), tag)
    return tag


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="images/local_base.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--tag", default=DEFAULT_TAG)
    p.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="where the root filesystem is kept")
    p.add_argument("--engine", choices=("buildah", "podman", "docker"), default="buildah")
    args = p.parse_args(argv)
    try:
        print(ensure_base(args.engine, args.tag, args.cache))
    except BaseError as exc:
        print(f"images/local_base.py: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
