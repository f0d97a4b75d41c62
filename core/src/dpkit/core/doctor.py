"""``dpkit doctor``: one line per check, each failure with a fix hint."""

from __future__ import annotations

import os
import socket
from pathlib import Path

from dpkit.core.config import Config
from dpkit.core.errors import DpkitError
from dpkit.core.vendor import Check, load_vendor_class


def _kubelet_reachable(path: Path) -> Check:
    name = "kubelet socket reachable"
    if not path.exists():
        return Check(name, False, f"{path} does not exist",
                     "is the kubelet running, and is /var/lib/kubelet/device-plugins mounted into the pod?")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(1.0)
    try:
        sock.connect(str(path))
    except OSError as exc:
        return Check(name, False, f"{path}: {exc.strerror or exc}",
                     "the kubelet is not accepting connections; check its logs")
    finally:
        sock.close()
    return Check(name, True, f"{path} accepts connections")


def core_checks(config: Config, config_error: str) -> list[Check]:
    checks = [
        Check("config valid", not config_error, config_error or f"{config.source} loaded",
              "fix the key named above in the ConfigMap or environment" if config_error else ""),
    ]
    plugin_dir = Path(config.plugin_dir)
    writable = plugin_dir.is_dir() and os.access(plugin_dir, os.W_OK)
    checks.append(Check("plugin directory writable", writable,
                        f"{plugin_dir} {'is writable' if writable else 'is missing or not writable'}",
                        "mount the host's /var/lib/kubelet/device-plugins read-write into the pod"))
    checks.append(_kubelet_reachable(config.kubelet_socket_path))
    return checks


def run_checks(vendor_name: str, config: Config, config_error: str = "") -> list[Check]:
    checks = core_checks(config, config_error)
    try:
        vendor = load_vendor_class(vendor_name)(config.vendor)
    except DpkitError as exc:
        checks.append(Check(f"vendor {vendor_name} loads", False, str(exc),
                            "install the vendor package or fix its config section"))
        return checks
    checks.append(Check(f"vendor {vendor_name} loads", True, type(vendor).__module__))
    try:
        checks.extend(vendor.doctor())
    except Exception as exc:
        checks.append(Check(f"vendor {vendor_name} checks", False, f"{type(exc).__name__}: {exc}"))
    finally:
        vendor.close()
    return checks
