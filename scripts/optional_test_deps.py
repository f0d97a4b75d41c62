"""Install PyGObject into the test environment when this machine can build it.

PyGObject drives umockdev's testbed (fake uevents) and builds from source against GObject
introspection headers. Installing it here rather than as a hard test-env dependency lets the
suite run on a machine without those headers: the umockdev tests then skip, naming what to install.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys

REQUIREMENT = "PyGObject<3.51"  # newer releases need girepository-2.0, which Debian 12 lacks


def main() -> int:
    if importlib.util.find_spec("gi") is not None:
        return 0
    result = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check", REQUIREMENT],
                            check=False)
    if result.returncode != 0:
        print(f"optional_test_deps: could not install {REQUIREMENT} (it needs libgirepository1.0-dev, "
              "libcairo2-dev and pkg-config); the umockdev tests will skip", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
