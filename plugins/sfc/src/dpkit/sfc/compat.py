"""Compatibility with AMD's Onload device plugin (Xilinx-CNS/kubernetes-onload), as a ``vendor.mode``.

AMD's plugin advertises ``amd.com/onload`` as ``maxPods`` interchangeable slots ``sfc-0`` ...
``sfc-<n-1>`` per node and gives every container the same things: the Onload device nodes
(``mrw``), the host's ``libonload``/``libonload_ext`` mounted read-only and, by default,
``LD_PRELOAD``. Its settings arrive either as the Onload CR's ``spec.devicePlugin`` block
(which AMD's operator turns into flags) or as the plugin's own Go ``flag`` command line; both
are accepted here as written, with the same defaults, the same flag syntax and the same
rejections (docs/sfc.md lists where dpkit differs and why).
"""

from __future__ import annotations

import posixpath
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields, replace
from typing import Annotated, Any

from dpkit.core import ConfigError, Invalid, Meta, Section, get_logger, kv

log = get_logger("sfc.compat")

RESOURCE = "amd.com/onload"
SLOT_PREFIX = "sfc-"
DEVICE_NODES = ("onload", "onload_epoll", "sfc_char")
LIBRARY_PREFIXES = ("libonload.so", "libonload_ext.so")  # upstream mounts every file starting so
HOST_LIB_DIR = "/usr/lib64"  # under hostOnloadPath, fixed upstream
HOST_BIN_DIR = "/usr/bin"
SCRIPT = "onload"
MAX_PODS = 10000
_TRUE = ("1", "t", "T", "TRUE", "true", "True")  # Go's strconv.ParseBool
_FALSE = ("0", "f", "F", "FALSE", "false", "False")
_OCTAL = re.compile(r"^0[0-7_]+$")


@dataclass(frozen=True)
class OnloadPluginConfig:
    """AMD's settings with AMD's defaults (``deviceplugin.DefaultConfig`` upstream)."""

    max_pods: int = 100
    need_nic: bool = True
    set_preload: bool = True
    mount_onload: bool = False
    host_onload_path: str = "/opt/onload"
    base_mount_path: str = "/opt/onload"
    bin_mount_path: str = "/usr/bin"
    lib_mount_path: str = "/usr/lib64"

    @property
    def host_lib_dir(self) -> str:
        return go_join(self.host_onload_path, HOST_LIB_DIR)

    @property
    def host_script(self) -> str:
        return go_join(self.host_onload_path, HOST_BIN_DIR, SCRIPT)

    @property
    def container_lib_dir(self) -> str:
        return go_join(self.base_mount_path, self.lib_mount_path)

    @property
    def container_script(self) -> str:
        return go_join(self.base_mount_path, self.bin_mount_path, SCRIPT)


# setting -> (flag name, Onload CR key(s), kind)
_SETTINGS: dict[str, tuple[str, tuple[str, ...], str]] = {
    "max_pods": ("maxPods", ("maxPodsPerNode",), "int"),
    "need_nic": ("needNic", (), "bool"),
    "set_preload": ("setPreload", ("setPreload",), "bool"),
    "mount_onload": ("mountOnload", ("mountOnload",), "bool"),
    "host_onload_path": ("hostOnloadPath", ("hostOnloadPath",), "str"),
    "base_mount_path": ("baseMountPath", ("baseMountPath",), "str"),
    "bin_mount_path": ("binMountPath", ("binMountPath",), "str"),
    # the CR's JSON name carries a typo ("libMounthPath"); the flag and the docs say libMountPath
    "lib_mount_path": ("libMountPath", ("libMounthPath", "libMountPath"), "str"),
}
_FLAGS = {flag: (setting, kind) for setting, (flag, _, kind) in _SETTINGS.items()}
# flags glog registers on the same command line: accepted, with no effect (dpkit has log_level)
_GLOG_FLAGS = {"logtostderr": "bool", "alsologtostderr": "bool", "v": "int32", "stderrthreshold": "str",
               "vmodule": "str", "log_dir": "str", "log_backtrace_at": "str"}
#: one argument of the command line; a YAML number stands for its text
Arg = Annotated[str | int | float, Meta(description="a string")]
NotACrKey = Annotated[None, Meta(description="-needNic=false in vendor.args instead (needNic is a command-line "
                                             "flag only)")]


class DevicePluginSpec(Section, frozen=True):
    """The Onload CR's ``spec.devicePlugin`` block as written (AMD's ``DevicePluginSpec``); null is an unset field."""

    maxPodsPerNode: int | None = None
    setPreload: bool | None = None
    mountOnload: bool | None = None
    hostOnloadPath: str | None = None
    baseMountPath: str | None = None
    binMountPath: str | None = None
    libMounthPath: str | None = None
    libMountPath: str | None = None
    #: configure the DaemonSet AMD's operator creates, not the plugin: warned about
    imagePullPolicy: str | None = None
    devicePluginImage: str | None = None
    needNic: NotACrKey = None

    def __post_init__(self) -> None:
        if None not in (self.libMounthPath, self.libMountPath) and self.libMounthPath != self.libMountPath:
            raise Invalid(f"libMounthPath and libMountPath disagree ({self.libMounthPath!r} vs {self.libMountPath!r})",
                          "libMountPath")

    def settings(self, where: str) -> tuple[dict[str, Any], list[str]]:
        """(settings, warnings): what the block sets, and the DaemonSet keys it sets to no effect here."""
        given = {setting: getattr(self, key) for setting, (_, keys, _) in _SETTINGS.items() for key in keys
                 if getattr(self, key) is not None}
        return given, [f"{where}.{key}: configures the DaemonSet AMD's operator creates; set it on dpkit's "
                       "DaemonSet instead (ignored here)" for key in ("imagePullPolicy", "devicePluginImage")
                       if getattr(self, key) is not None]


def go_join(*parts: str) -> str:
    """Go's ``path.Join``: non-empty parts joined with '/', then cleaned ("" when all are empty)."""
    joined = "/".join(p for p in parts if p)
    if not joined:
        return ""
    clean = posixpath.normpath(joined)
    return "/" + clean.lstrip("/") if clean.startswith("//") else clean


def go_bool(text: str) -> bool | None:
    return True if text in _TRUE else False if text in _FALSE else None


def go_int(text: str, bits: int = 64) -> int | None:
    """Go's ``strconv.ParseInt(text, 0, bits)``: sign, 0x/0o/0b prefixes, a leading 0 for octal, '_'."""
    if not text.isascii() or text.strip() != text:
        return None
    body = text.lstrip("+-")
    try:
        if _OCTAL.match(body):  # Go reads "010" as 8; Python refuses the leading zero
            value = int(body, 8) * (-1 if text.startswith("-") else 1)
        else:
            value = int(text, 0)
    except ValueError:
        return None
    return value if -(2 ** (bits - 1)) <= value < 2 ** (bits - 1) else None


def parse_flags(args: Sequence[str | int | float], where: str) -> tuple[dict[str, Any], list[str]]:
    """The plugin's command line as Go's ``flag`` package reads it: (settings, warnings).

    ``-name=value``, ``--name=value``, ``-name value`` (not for bools), ``-name`` (bools: true);
    parsing stops at ``--`` or at the first argument that is not a flag, and upstream ignores
    the rest, so it is ignored here too, with a warning.
    """
    items = [str(a) for a in args]
    settings: dict[str, Any] = {}
    warnings: list[str] = []
    index = 0
    while index < len(items):
        arg, here = items[index], f"{where}[{index}]"
        if arg == "--":
            index += 1
            break
        if len(arg) < 2 or arg[0] != "-":
            break
        body = arg[2:] if arg.startswith("--") else arg[1:]
        if not body or body[0] in "-=":
            raise ConfigError(f"{here}: bad flag syntax: {arg}")
        name, has_value, value = body.partition("=")
        index += 1
        if name in ("h", "help"):
            raise ConfigError(f"{here}: {arg} makes the upstream plugin print its usage and exit; remove it")
        kind = _FLAGS[name][1] if name in _FLAGS else _GLOG_FLAGS.get(name)
        if kind is None:
            known = ", ".join(f"-{f}" for f in (*_FLAGS, *_GLOG_FLAGS))
            raise ConfigError(f"{here}: flag provided but not defined: -{name} (the Onload device plugin's "
                              f"flags: {known})")
        if kind == "bool" and not has_value:
            value = "true"
        elif not has_value:
            if index >= len(items):
                raise ConfigError(f"{here}: flag needs an argument: -{name}")
            value, index = items[index], index + 1
        parsed: Any = value
        if kind == "bool":
            parsed = go_bool(value)
        elif kind in ("int", "int32"):
            parsed = go_int(value, 32 if kind == "int32" else 64)
        if parsed is None:
            raise ConfigError(f"{here}: invalid value {value!r} for flag -{name}: expected "
                              f"{'true or false' if kind == 'bool' else 'a whole number'}")
        if name in _FLAGS:
            settings[_FLAGS[name][0]] = parsed
        else:
            warnings.append(f"{here}: glog flag -{name} has no effect in dpkit (use log_level / log_format)")
    rest = [str(a) for a in items[index:]]
    if rest:
        warnings.append(f"{where}: arguments after the flags are ignored, as the upstream plugin ignores them: "
                        f"{' '.join(rest)[:200]} (a bool flag takes its value with '=', e.g. -setPreload=false)")
    return settings, warnings


def _checked(config: OnloadPluginConfig, sources: Mapping[str, str]) -> OnloadPluginConfig:
    """Reject what AMD's plugin rejects, and what would produce paths no container runtime accepts."""
    if config.set_preload and config.mount_onload:
        raise ConfigError(f"{sources.get('mount_onload', 'vendor')}: mountOnload needs setPreload false: the "
                          "Onload plugin refuses both (setPreload defaults to true); LD_PRELOAD and the onload "
                          "script are two ways to load Onload")
    if not 0 <= config.max_pods <= MAX_PODS:
        raise ConfigError(f"{sources.get('max_pods', 'vendor')}: expected 0 to {MAX_PODS} Onload slots per node, "
                          f"got {config.max_pods}")
    for setting, path in (("host_onload_path", config.host_lib_dir), ("base_mount_path", config.container_lib_dir),
                          ("bin_mount_path", config.container_script), ("lib_mount_path", config.container_lib_dir)):
        where = sources.get(setting, "vendor")
        if "\x00" in path or "\n" in path:
            raise ConfigError(f"{where}: the path contains a control character")
        if not path.startswith("/"):
            raise ConfigError(f"{where}: gives {path!r}, not an absolute path; the kubelet needs absolute host and "
                              "container paths")
    return config


def onload_plugin_config(device_plugin: DevicePluginSpec | None, args: Sequence[str | int | float] | None, *,
                         where: str = "vendor") -> OnloadPluginConfig:
    """Settings from ``vendor.devicePlugin`` (CR keys) and ``vendor.args`` (flags); both optional.

    A setting given in both places must agree: AMD's operator derives the flags from the CR, so
    two different values mean a copy-paste mistake, and guessing which one wins would hide it.
    """
    from_cr, warnings = device_plugin.settings(f"{where}.devicePlugin") if device_plugin is not None else ({}, [])
    from_flags, flag_warnings = parse_flags(args, f"{where}.args") if args is not None else ({}, [])
    for setting in from_cr.keys() & from_flags.keys():
        if from_cr[setting] != from_flags[setting]:
            flag = _SETTINGS[setting][0]
            raise ConfigError(f"{where}: {flag} is {from_flags[setting]!r} in args but {from_cr[setting]!r} in "
                              "devicePlugin; give it once")
    for warning in warnings + flag_warnings:
        log.warning(warning)
    sources = {s: f"{where}.devicePlugin.{_SETTINGS[s][1][0]}" for s in from_cr}
    sources.update({s: f"{where}.args (-{_SETTINGS[s][0]})" for s in from_flags})
    known = {f.name for f in fields(OnloadPluginConfig)}
    config = replace(OnloadPluginConfig(), **{k: v for k, v in {**from_cr, **from_flags}.items() if k in known})
    checked = _checked(config, sources)
    log.debug("Onload plugin settings", extra=kv(**{k: str(getattr(checked, k)) for k in known}))
    return checked


def slot_ids(count: int) -> tuple[str, ...]:
    """AMD's device IDs, so a node switching plugins keeps the kubelet's checkpoint valid."""
    return tuple(f"{SLOT_PREFIX}{n}" for n in range(count))


def library_files(names: Sequence[str]) -> list[str]:
    """The files AMD's plugin mounts: every name starting with ``libonload.so`` or ``libonload_ext.so``."""
    return [n for n in names if n.startswith(LIBRARY_PREFIXES)]
