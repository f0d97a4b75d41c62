"""Build the per-vendor dpkit images with whichever container engine is installed.

    python images/build.py --vendor nvidia [--vendor sfc ...] [--registry R] [--push] [--dry-run]

For each vendor: build the wheels of core, the vendor and all their dependencies from the
workspace into ``build/images/<vendor>/wheels`` (pip runs here, with the operator's own index,
proxy and certificate settings), then build ``images/<vendor>/Containerfile`` with that folder
as the context, so the image build itself needs no network. The tag is
``<registry>/dpkit-<vendor>:<version of the vendor package>``. Stdlib only: it runs in a bare
hatch environment (``hatch run images:build``) or any Python 3.11.
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
IMAGES = ROOT / "images"
ENGINES = ("buildah", "podman", "docker")  # first one found wins
DEFAULT_REGISTRY = "localhost"
# Python of the default BASE image; the wheels (grpcio, pyzmq, ...) must match it.
IMAGE_PYTHON = (3, 11)
# uname machine -> OCI architecture, to tell a native build from one for another CPU.
_ARCH = {"x86_64": "amd64", "aarch64": "arm64", "s390x": "s390x", "ppc64le": "ppc64le"}


class BuildError(Exception):
    """A build cannot go on; the message says what to do."""


@dataclass(frozen=True)
class VendorImage:
    """What one vendor's image is made of and called."""

    vendor: str  # the directory under images/ and plugins/, also the `dpkit run` name
    dist: str  # distribution name of the vendor package, e.g. dpkit-kvm-vfio
    version: str
    source: str  # project URL for the OCI source label

    @property
    def containerfile(self) -> Path:
        return IMAGES / self.vendor / "Containerfile"

    @property
    def package_dir(self) -> Path:
        return ROOT / "plugins" / self.vendor

    def tag(self, registry: str) -> str:
        return f"{registry.rstrip('/')}/{self.dist}:{self.version}"


def vendors() -> list[str]:
    """Every vendor that has a Containerfile."""
    return sorted(p.parent.name for p in IMAGES.glob("*/Containerfile"))


def _project(pyproject: Path) -> dict[str, object]:
    try:
        with pyproject.open("rb") as f:
            project = tomllib.load(f).get("project")
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise BuildError(f"{pyproject}: cannot read the package metadata: {exc}") from exc
    if not isinstance(project, dict) or not isinstance(project.get("name"), str) \
            or not isinstance(project.get("version"), str):
        raise BuildError(f"{pyproject}: [project] needs a static name and version")
    return project


def vendor_image(vendor: str) -> VendorImage:
    """Name, version and source of ``vendor``'s image, read from the packages' pyproject.toml."""
    if vendor not in vendors():
        raise BuildError(f"unknown vendor {vendor!r} (images exist for: {', '.join(vendors())})")
    project = _project(ROOT / "plugins" / vendor / "pyproject.toml")
    urls = _project(ROOT / "core" / "pyproject.toml").get("urls")
    source = urls.get("Source", "") if isinstance(urls, dict) else ""
    return VendorImage(vendor, str(project["name"]), str(project["version"]), str(source or "unknown"))


def find_engine(requested: str | None = None, which: Callable[[str], str | None] = shutil.which) -> str:
    """The engine to build with: ``requested`` if given, else the first of ENGINES installed."""
    names = (requested,) if requested else ENGINES
    for name in names:
        if which(name):
            return name
    if requested:
        raise BuildError(f"container engine {requested!r} is not installed (or not on PATH)")
    raise BuildError("no container engine found: install buildah, podman or docker "
                     "(on Debian: apt-get install buildah), or pass --engine")


def is_native(platform_name: str | None) -> bool:
    """Whether ``linux/<arch>`` is this machine's CPU (None: the engine's default, native)."""
    if not platform_name:
        return True
    arch = _ARCH.get(platform.machine(), platform.machine())
    return platform_name.split("/")[1:2] == [arch]


def wheel_command(image: VendorImage, wheels: Path, python: str = sys.executable) -> list[str]:
    """pip builds core and the vendor from source and fetches their dependencies as wheels."""
    return [python, "-m", "pip", "wheel", "--disable-pip-version-check", "--wheel-dir", str(wheels),
            str(ROOT / "core"), str(image.package_dir)]


def build_command(engine: str, image: VendorImage, tag: str, context: Path, base: str | None,
                  platform_name: str | None) -> list[str]:
    """The engine's build command line; the three engines share these flags."""
    args = ["bud"] if engine == "buildah" else ["build"]
    args += ["-f", str(image.containerfile), "-t", tag,
             "--build-arg", f"VERSION={image.version}", "--build-arg", f"SOURCE={image.source}"]
    if base:
        args += ["--build-arg", f"BASE={base}"]
    if platform_name:
        args += ["--platform", platform_name]
    if not is_native(platform_name):
        # The wheels here are for this CPU: let pip fetch (or compile) the target's instead.
        args += ["--build-arg", "PIP_NO_INDEX=0"]
    return [engine, *args, str(context)]


def _run(cmd: Sequence[str], dry_run: bool) -> None:
    print("+ " + shlex.join(cmd), flush=True)
    if dry_run:
        return
    try:
        result = subprocess.run(cmd, check=False)
    except OSError as exc:
        raise BuildError(f"cannot run {cmd[0]}: {exc}") from exc
    if result.returncode != 0:
        raise BuildError(f"{shlex.join(cmd[:3])} ... failed with exit code {result.returncode}")


def build(image: VendorImage, engine: str, registry: str, base: str | None = None,
          platform_name: str | None = None, push: bool = False, dry_run: bool = False,
          out_dir: Path = ROOT / "build" / "images") -> str:
    """Wheels, then the image (then the push); returns the tag."""
    context = out_dir / image.vendor
    wheels = context / "wheels"
    if not dry_run:
        shutil.rmtree(context, ignore_errors=True)  # no stale wheels of an older version
        wheels.mkdir(parents=True)
    _run(wheel_command(image, wheels), dry_run)
    tag = image.tag(registry)
    _run(build_command(engine, image, tag, context, base, platform_name), dry_run)
    if push:
        _run([engine, "push", tag], dry_run)
    return tag


def check_python(native: bool) -> None:
    """Dependency wheels are built for this interpreter: it must be the image's Python."""
    if native and sys.version_info[:2] != IMAGE_PYTHON:
        want = ".".join(map(str, IMAGE_PYTHON))
        raise BuildError(f"run the build with Python {want}, the images' Python (this is "
                         f"{platform.python_version()}): the dependency wheels must match it")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="images/build.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--vendor", action="append", choices=vendors(),
                   help="vendor to build (repeatable; default: all)")
    p.add_argument("--engine", choices=ENGINES, default=os.environ.get("DPKIT_IMAGE_ENGINE") or None,
                   help="container engine (default: the first of buildah, podman, docker installed)")
    p.add_argument("--registry", default=os.environ.get("DPKIT_IMAGE_REGISTRY", DEFAULT_REGISTRY),
                   help="image name prefix, e.g. registry.example.com/dpkit (default: %(default)s)")
    p.add_argument("--base", default=os.environ.get("DPKIT_IMAGE_BASE") or None,
                   help="BASE image for both stages (default: the Containerfile's)")
    p.add_argument("--platform", help="build for another CPU, e.g. linux/s390x (needs qemu binfmt)")
    p.add_argument("--push", action="store_true", help="push each image after building it")
    p.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    p.add_argument("--out", type=Path, default=ROOT / "build" / "images",
                   help="where each vendor's build context (its wheels) goes (default: build/images)")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        check_python(is_native(args.platform))
        engine = find_engine(args.engine)
        for vendor in args.vendor or vendors():
            tag = build(vendor_image(vendor), engine, args.registry, args.base, args.platform,
                        args.push, args.dry_run, args.out)
            print(f"built {tag}" if not args.dry_run else f"would build {tag}", flush=True)
    except BuildError as exc:
        print(f"images/build.py: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
