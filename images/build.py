"""Build the per-vendor dpkit images with whichever container engine is installed.

    python images/build.py --vendor nvidia [--vendor sfc ...] [--registry R] [--push] [--dry-run]

For each vendor: build the wheels of core, the vendor and all their dependencies from the
workspace into ``build/images/<vendor>/wheels`` (pip runs here, with the operator's own index,
proxy and certificate settings), then build ``images/Containerfile``, the one template of every
image, with that folder as the context and the vendor's facts from ``images/vendors.toml`` as
build arguments, so the image build itself needs no network. The vendors are the packages under
``plugins/``; one without a table in vendors.toml gets the defaults. The tag is
``<registry>/dpkit-<vendor>:<version of the vendor package>``. Stdlib only: it runs in a bare
hatch environment (``hatch run images:build``) or any Python 3.11.

It finds what works on this host by itself: buildah and podman build with the ``oci``
isolation on a cgroup v2 host and with ``chroot`` on cgroup v1 / hybrid hosts (where crun
refuses ``oci``), and a build that fails with an isolation error is retried once with
``chroot`` (``BUILDAH_ISOLATION`` or ``--isolation`` choose it yourself). Before building it
checks that the BASE image is in local storage or its registry answers, and says how to make a
local base otherwise. The OCI source label is the project URL (``[project.urls]`` of core, else
``git config remote.origin.url``); with neither, or a placeholder, the label is left out.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import shlex
import shutil
import socket
import subprocess
import sys
import tomllib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

ROOT = Path(__file__).resolve().parent.parent
IMAGES = ROOT / "images"
CONTAINERFILE = IMAGES / "Containerfile"  # the one template of every vendor's image
VENDOR_TABLE = IMAGES / "vendors.toml"  # what differs between the vendors' images
TABLE_KEYS = ("description", "runtime_packages", "compilers", "env")  # what a vendor's table may set
ENGINES = ("buildah", "podman", "docker")  # first one found wins
DEFAULT_REGISTRY = "localhost"
# Python of the default BASE image; the wheels (grpcio, pyzmq, ...) must match it.
IMAGE_PYTHON = (3, 11)
# uname machine -> OCI architecture, to tell a native build from one for another CPU.
_ARCH = {"x86_64": "amd64", "aarch64": "arm64", "s390x": "s390x", "ppc64le": "ppc64le"}
CGROUP_ROOT = Path("/sys/fs/cgroup")
# What an engine prints when its OCI runtime cannot run a build step here (cgroups v1/hybrid,
# nested containers without cgroup delegation): the cue to retry with chroot isolation.
ISOLATION_ERRORS = re.compile(r"cgroups? in hybrid mode|cgroup.*not supported|mount_setattr|"
                              r"error running container|OCI runtime (?:error|create failed)", re.I)
# Reserved (RFC 2606 / 6761) or example hosts: a URL there is a placeholder, not the project's source.
PLACEHOLDER_HOSTS = re.compile(r"(^|\.)(invalid|example|test|localhost|example\.(com|org|net))$")
LOCAL_BASE_HINT = ("make a local base without any registry: `sudo python3 images/local_base.py` (needs debootstrap "
                   "and a Debian mirror), then build with `--base localhost/dpkit-base:bookworm` "
                   "(or DPKIT_IMAGE_BASE=localhost/dpkit-base:bookworm)")


class BuildError(Exception):
    """A build cannot go on; the message says what to do."""


@dataclass(frozen=True)
class VendorImage:
    """What one vendor's image is made of and called."""

    vendor: str  # the directory under plugins/, also the `dpkit run` name
    dist: str  # distribution name of the vendor package, e.g. dpkit-kvm-vfio
    version: str
    source: str  # project URL for the OCI source label; "" leaves the label out
    description: str = ""  # "" means the default, which names the vendor
    runtime_packages: tuple[str, ...] = ()
    compilers: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = ()

    @property
    def containerfile(self) -> Path:
        return CONTAINERFILE

    @property
    def package_dir(self) -> Path:
        return ROOT / "plugins" / self.vendor

    def tag(self, registry: str) -> str:
        return f"{registry.rstrip('/')}/{self.dist}:{self.version}"

    def build_args(self) -> list[tuple[str, str]]:
        """The Containerfile's build arguments that make this vendor's image; empty lists are left
        out (the Containerfile's default is empty)."""
        args = [("VENDOR", self.vendor), ("VERSION", self.version), ("TITLE", self.dist),
                ("DESCRIPTION", self.description or f"Kubernetes device plugin for {self.vendor} devices (dpkit)")]
        args += [(name, " ".join(packages)) for name, packages in
                 (("RUNTIME_PACKAGES", self.runtime_packages), ("COMPILERS", self.compilers)) if packages]
        return args + list(self.env)


def vendors() -> list[str]:
    """Every vendor package under plugins/ (a new vendor's included): each has an image."""
    return sorted(p.parent.name for p in (ROOT / "plugins").glob("*/pyproject.toml"))


def env_args(containerfile: Path = CONTAINERFILE) -> set[str]:
    """The build arguments ``containerfile`` turns into the image's environment (``NAME="${NAME}"`` in an
    ENV), the only ones a vendor's ``env`` may set: any other would vanish after the build or override
    one images/build.py sets itself."""
    text = containerfile.read_text()
    declared = set(re.findall(r"^ARG (\w+)", text, re.M))
    return declared & set(re.findall(r'^(?:ENV)?\s+(\w+)="\$\{\1\}"', text, re.M))


def _strings(where: str, value: object) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) and re.fullmatch(r"[\w.+-]+", v) for v in value):
        raise BuildError(f"{where} must be a list of Debian package names")
    return tuple(value)


def vendor_table(table: Path = VENDOR_TABLE, containerfile: Path = CONTAINERFILE) -> dict[str, dict[str, object]]:
    """images/vendors.toml, checked: known keys, the right types, env names the Containerfile declares,
    and no vendor without a package (a stale entry would be silently unused)."""
    try:
        with table.open("rb") as f:
            data = tomllib.load(f)
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise BuildError(f"{table}: cannot read the vendors' image facts: {exc}") from exc
    allowed = env_args(containerfile)
    for vendor, facts in data.items():
        where = f"{table}: [{vendor}]"
        if vendor not in vendors():
            raise BuildError(f"{where}: no such vendor package under plugins/")
        if not isinstance(facts, dict):
            raise BuildError(f"{where} must be a table")
        unknown = set(facts) - set(TABLE_KEYS)
        if unknown:
            raise BuildError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}; known: {', '.join(TABLE_KEYS)}")
        if not isinstance(facts.get("description", ""), str):
            raise BuildError(f"{where} description must be a string")
        for key in ("runtime_packages", "compilers"):
            _strings(f"{where} {key}", facts.get(key, []))
        env = facts.get("env", {})
        if not isinstance(env, dict) or not all(isinstance(v, str) for v in env.values()):
            raise BuildError(f"{where} env must be a table of strings")
        missing = sorted(set(env) - allowed)
        if missing:
            raise BuildError(f"{where} env {', '.join(missing)}: not an environment ARG of {containerfile} "
                             f"(add `ARG NAME=\"\"` and `NAME=\"${{NAME}}\"` to the runtime stage's ENV; "
                             f"today: {', '.join(sorted(allowed)) or 'none'})")
    return data


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
    facts = vendor_table().get(vendor, {})
    where = f"{VENDOR_TABLE}: [{vendor}]"
    env = facts.get("env", {})
    assert isinstance(env, dict)  # vendor_table checked it
    return VendorImage(vendor, str(project["name"]), str(project["version"]), source_url(),
                       description=str(facts.get("description", "")),
                       runtime_packages=_strings(f"{where} runtime_packages", facts.get("runtime_packages", [])),
                       compilers=_strings(f"{where} compilers", facts.get("compilers", [])),
                       env=tuple((str(k), str(v)) for k, v in env.items()))


def _real_url(url: str) -> str:
    """``url`` without credentials, or "" when it is a placeholder on a reserved or example host."""
    if re.match(r"^[\w.-]+@[\w.-]+:", url):  # scp-like git remote: git@host:owner/repo.git
        host = url.split("@", 1)[1].split(":", 1)[0]
        return "" if PLACEHOLDER_HOSTS.search(host.lower()) else "https://" + url.split("@", 1)[1].replace(":", "/", 1)
    parts = urlsplit(url)
    host = (parts.hostname or "").lower()
    if parts.scheme not in ("http", "https", "ssh", "git") or not host or PLACEHOLDER_HOSTS.search(host):
        return ""
    netloc = host + (f":{parts.port}" if parts.port else "")  # drops user:token@
    scheme = "https" if parts.scheme in ("ssh", "git") else parts.scheme
    return urlunsplit((scheme, netloc, parts.path, "", ""))


def source_url(root: Path = ROOT) -> str:
    """The project's source: core's ``[project.urls]`` Source (or Repository, Homepage), else the git
    remote ``origin``; "" when neither is a real URL (the label is then left out, never guessed)."""
    urls = _project(root / "core" / "pyproject.toml").get("urls")
    if isinstance(urls, dict):
        for key in ("Source", "Repository", "Homepage"):
            value = urls.get(key)
            if isinstance(value, str) and _real_url(value):
                return _real_url(value)
    try:
        remote = subprocess.run(["git", "-C", str(root), "config", "--get", "remote.origin.url"],
                                capture_output=True, text=True, timeout=10, check=False).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        remote = ""
    return _real_url(remote) if remote else ""


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
                  platform_name: str | None, isolation: str | None = None) -> list[str]:
    """The engine's build command line; the three engines share these flags."""
    args = ["bud"] if engine == "buildah" else ["build"]
    args += ["-f", str(image.containerfile), "-t", tag]
    for name, value in image.build_args():
        args += ["--build-arg", f"{name}={value}"]
    if image.source:
        args += ["--label", f"org.opencontainers.image.source={image.source}"]
    if base:
        args += ["--build-arg", f"BASE={base}"]
    if platform_name:
        args += ["--platform", platform_name]
    if isolation:
        args += ["--isolation", isolation]
    if not is_native(platform_name):
        # The wheels here are for this CPU: let pip fetch (or compile) the target's instead.
        args += ["--build-arg", "PIP_NO_INDEX=0"]
    return [engine, *args, str(context)]


def say(message: str) -> None:
    print(f"images/build.py: {message}", flush=True)


def choose_isolation(engine: str, requested: str | None = None, cgroup_root: Path = CGROUP_ROOT) -> str | None:
    """The isolation to ask for: the requested one, none for docker or when BUILDAH_ISOLATION is set
    (the engine reads it), chroot where cgroups are v1/hybrid (crun refuses oci there), else oci."""
    if requested:
        return requested
    if engine == "docker" or os.environ.get("BUILDAH_ISOLATION"):
        return None
    if not (cgroup_root / "cgroup.controllers").exists():
        say(f"cgroups v1/hybrid here ({cgroup_root} is not a cgroup2 mount): building with --isolation chroot")
        return "chroot"
    return "oci"


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


def _run_build(cmd: list[str]) -> tuple[int, str]:
    """Run the engine's build, passing its output through; returns the exit code and the output."""
    print("+ " + shlex.join(cmd), flush=True)
    try:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace")
    except OSError as exc:
        raise BuildError(f"cannot run {cmd[0]}: {exc}") from exc
    assert proc.stdout is not None
    tail: list[str] = []
    for line in proc.stdout:
        sys.stdout.write(line)
        tail = [*tail[-199:], line]
    sys.stdout.flush()
    return proc.wait(), "".join(tail)


def default_base(image: VendorImage) -> str:
    """The Containerfile's ``ARG BASE=...`` default."""
    found = re.search(r"^ARG BASE=(\S+)", image.containerfile.read_text(), re.M)
    return found.group(1) if found else ""


def registry_host(reference: str) -> str | None:
    """Where ``reference`` is pulled from; None for a local-only name (``localhost/...``)."""
    first = reference.split("/", 1)[0] if "/" in reference else ""
    if first == "localhost" or first.startswith("localhost:"):
        return None
    if not first or ("." not in first and ":" not in first):
        return "registry-1.docker.io"  # a Docker Hub short name
    return "registry-1.docker.io" if first == "docker.io" else first


def image_present(engine: str, reference: str) -> bool:
    cmd = {"buildah": ["buildah", "images", "-q", reference],
           "podman": ["podman", "image", "exists", reference]}.get(engine, [engine, "image", "inspect", reference])
    try:
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return result.returncode == 0 and (engine != "buildah" or bool(result.stdout.strip()))


def reachable(host: str, timeout: float = 5.0) -> bool:
    name, _, port = host.partition(":")
    try:
        with socket.create_connection((name, int(port or 443)), timeout=timeout):
            return True
    except (OSError, ValueError):
        return False


def check_base(engine: str, base: str) -> None:
    """BASE must be in local storage or pullable; otherwise say what is missing and how to do without."""
    if not base or image_present(engine, base):
        return
    host = registry_host(base)
    if host is None:
        raise BuildError(f"the base image {base} is not in {engine}'s local storage; {LOCAL_BASE_HINT}")
    if not reachable(host):
        raise BuildError(f"the base image {base} is not in {engine}'s local storage and its registry {host} "
                         f"cannot be reached from here (no network or a proxy needed: set HTTPS_PROXY for "
                         f"{engine}); or {LOCAL_BASE_HINT}")


def stray_containerfiles() -> list[Path]:
    """Per-vendor Containerfiles, which nothing uses (``dpkit new-vendor`` still writes one from its template)."""
    return sorted(IMAGES.glob("*/Containerfile"))


def build(image: VendorImage, engine: str, registry: str, base: str | None = None,
          platform_name: str | None = None, push: bool = False, dry_run: bool = False,
          out_dir: Path = ROOT / "build" / "images", isolation: str | None = None) -> str:
    """Wheels, then the image (then the push); returns the tag."""
    context = out_dir / image.vendor
    wheels = context / "wheels"
    if not dry_run:
        check_base(engine, base or default_base(image))
        shutil.rmtree(context, ignore_errors=True)  # no stale wheels of an older version
        wheels.mkdir(parents=True)
    _run(wheel_command(image, wheels), dry_run)
    tag = image.tag(registry)
    cmd = build_command(engine, image, tag, context, base, platform_name, isolation)
    if dry_run:
        _run(cmd, dry_run)
    else:
        code, output = _run_build(cmd)
        if code != 0 and engine != "docker" and isolation != "chroot" and ISOLATION_ERRORS.search(output):
            say(f"the build failed with an isolation error under {isolation or 'the default isolation'}; "
                "retrying with --isolation chroot")
            code, output = _run_build(build_command(engine, image, tag, context, base, platform_name, "chroot"))
        if code != 0:
            raise BuildError(f"{shlex.join(cmd[:3])} ... failed with exit code {code}")
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
    p = argparse.ArgumentParser(prog="images/build.py", description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n")[-1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vendor", action="append", choices=vendors(),
                   help="vendor to build (repeatable; default: all)")
    p.add_argument("--engine", choices=ENGINES, default=os.environ.get("DPKIT_IMAGE_ENGINE") or None,
                   help="container engine (default: the first of buildah, podman, docker installed)")
    p.add_argument("--registry", default=os.environ.get("DPKIT_IMAGE_REGISTRY", DEFAULT_REGISTRY),
                   help="image name prefix, e.g. registry.example.com/dpkit (default: %(default)s)")
    p.add_argument("--base", default=os.environ.get("DPKIT_IMAGE_BASE") or None,
                   help="BASE image for both stages (default: the Containerfile's)")
    p.add_argument("--platform", help="build for another CPU, e.g. linux/s390x (needs qemu binfmt)")
    p.add_argument("--isolation", choices=("oci", "chroot", "rootless"),
                   help="buildah/podman isolation (default: chosen for this host, see above)")
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
        isolation = choose_isolation(engine, args.isolation)
        for stray in stray_containerfiles():
            say(f"{stray.relative_to(IMAGES.parent)} is not used: every image is built from images/Containerfile "
                "with build arguments from images/vendors.toml")
        for vendor in args.vendor or vendors():
            tag = build(vendor_image(vendor), engine, args.registry, args.base, args.platform,
                        args.push, args.dry_run, args.out, isolation)
            print(f"built {tag}" if not args.dry_run else f"would build {tag}", flush=True)
    except BuildError as exc:
        print(f"images/build.py: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
