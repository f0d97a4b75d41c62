"""Install the Debian packages the test suite drives for real, or say how to.

The tests use umockdev (fake sysfs and uevents for pyudev), GObject introspection (to build
PyGObject, which drives umockdev's testbed), a C compiler (the fake libnvidia-ml.so) and
buildah/debootstrap (one real image build). As root on Debian this installs what is missing;
otherwise it prints the apt-get line and the affected tests skip with that reason.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

PACKAGES = {
    # package: a file or command that proves it is installed
    "umockdev": "/usr/bin/umockdev-run",
    "gir1.2-umockdev-1.0": "/usr/lib/x86_64-linux-gnu/girepository-1.0/UMockdev-1.0.typelib",
    "libgirepository1.0-dev": "/usr/share/pkgconfig/gobject-introspection-1.0.pc",
    "libcairo2-dev": "/usr/include/cairo/cairo.h",
    "pkg-config": "/usr/bin/pkg-config",
    "gcc": "/usr/bin/gcc",
    "buildah": "/usr/bin/buildah",
    "debootstrap": "/usr/sbin/debootstrap",
}


def _present(probe: str) -> bool:
    if probe.startswith("/"):
        if os.path.exists(probe):
            return True
        # multiarch paths differ between machines: fall back to dpkg's view.
        return False
    return shutil.which(probe) is not None


def _dpkg_installed(package: str) -> bool:
    try:
        out = subprocess.run(
            ["dpkg-query", "-W", "-f=${Status}", package], capture_output=True, text=True, check=False
        ).stdout
    except FileNotFoundError:
        return False
    return "install ok installed" in out


def main() -> int:
    missing = [p for p, probe in PACKAGES.items() if not (_present(probe) or _dpkg_installed(p))]
    if not missing:
        return 0
    line = "apt-get install -y " + " ".join(missing)
    if os.geteuid() == 0 and shutil.which("apt-get"):
        print(f"system_deps: installing {' '.join(missing)}", file=sys.stderr)
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        subprocess.run(["apt-get", "update", "-qq"], check=False, env=env)
        result = subprocess.run(["apt-get", "install", "-y", "-qq", *missing], check=False, env=env)
        if result.returncode != 0:
            print(f"system_deps: '{line}' failed; tests that need these packages will skip", file=sys.stderr)
        return 0
    print(f"system_deps: missing {' '.join(missing)}; run as root: {line}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
