"""Core configuration: one YAML file plus ``DPKIT_*`` environment overrides, validated on load.

:class:`Config` declares each key's type, range and default; :mod:`dpkit.core.support.schema`
converts the file (and the variables) into it, so every error names the file (or variable), the
key and what was expected, and a misspelt key gets a did-you-mean. The ``vendor:`` section is
passed to the vendor as is; the vendor declares and validates its own.

Files are read with bounds (size, nesting depth, alias expansion, message length), because a
config or devices file may come from anywhere a ConfigMap can, and SIGHUP re-reads it while the
plugin serves: a hostile file must be refused cheaply, never expanded.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from msgspec import Meta

from dpkit.core.support.logs import get_logger
from dpkit.core.support.schema import load_section, show
from dpkit.core.vendorapi.errors import ConfigError

DEFAULT_PLUGIN_DIR = "/var/lib/kubelet/device-plugins"
DEFAULT_POD_RESOURCES_SOCKET = "/var/lib/kubelet/pod-resources/kubelet.sock"
DEFAULT_NFD_FEATURES_DIR = "/etc/kubernetes/node-feature-discovery/features.d"
ENV_PREFIX = "DPKIT_"

MAX_FILE_BYTES = 1024 * 1024  # a config or devices file; larger ones are refused unread
MAX_DEPTH = 64  # nested mappings and lists
MAX_NODES = 250_000  # values after every alias is expanded (about what 1 MiB holds without aliases)
MAX_MESSAGE = 500  # characters of file content quoted in an error
MAX_SECONDS = 7 * 86400  # a timeout or interval; larger ones overflow the waits they feed
Seconds = Annotated[float, Meta(gt=0, le=MAX_SECONDS, description="a number of seconds")]

log = get_logger("config")
# The C parser when PyYAML has it (much faster on big devices files); the bounds below hold for both.
_LOADER: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
def clip(text: str, limit: int = MAX_MESSAGE) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


@dataclass(frozen=True)
class Config:
    """Settings the core acts on; see docs/configuration.md for each key."""

    plugin_dir: str = DEFAULT_PLUGIN_DIR
    kubelet_socket: str = "kubelet.sock"  # relative to plugin_dir unless absolute
    state_dir: str = "/run/dpkit"  # control and event sockets (0600, in dpkit's own private dir; see files.py)
    log_format: Literal["human", "json"] = "human"
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    probe_heartbeat_timeout: Seconds = 10.0
    register_backoff_max: Seconds = 5.0
    vendor_call_timeout: Seconds = 10.0  # every vendor hook but the hardware scans and watch
    vendor_scan_timeout: Seconds = 60.0  # discover, probes, explain, doctor: scans of the whole node
    metrics_address: str = ""  # host:port; empty disables the endpoint
    cdi_dir: str = "/var/run/cdi"  # empty disables CDI spec files
    cdi_allocate: bool = False  # answer Allocate with cdi_devices instead of raw specs
    nfd_features_dir: str = DEFAULT_NFD_FEATURES_DIR  # empty disables node-feature-discovery labels
    pod_resources_socket: str = DEFAULT_POD_RESOURCES_SOCKET
    vendor: Mapping[str, Any] = field(default_factory=dict)
    source: str = "<defaults>"

    @property
    def kubelet_socket_path(self) -> Path:
        return Path(self.plugin_dir) / self.kubelet_socket

    def replace(self, **changes: Any) -> Config:
        return dataclasses.replace(self, **changes)


#: every key but ``vendor`` can be set by ``DPKIT_<KEY>``
_ENV = {ENV_PREFIX + f.name.upper(): f.name for f in dataclasses.fields(Config) if f.name not in ("vendor", "source")}


def parse_address(address: str) -> tuple[str, int]:
    """``host:port``, ``[v6]:port`` or ``:port`` (all interfaces); ConfigError naming the key."""
    host, sep, port_text = address.rpartition(":")
    if not sep or not port_text.isdigit() or int(port_text) > 65535:
        raise ConfigError(f"key 'metrics_address': expected host:port (e.g. 0.0.0.0:9400), got {address!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if ":" in host and not address.startswith("["):
        raise ConfigError(f"key 'metrics_address': write an IPv6 host in brackets, like [::]:9400; got {address!r}")
    return host or "0.0.0.0", int(port_text)


def read_text(path: str | Path, what: str) -> str:
    """A file's UTF-8 text, at most :data:`MAX_FILE_BYTES`; ConfigError naming the file and its purpose."""
    try:
        with open(path, "rb") as handle:
            data = handle.read(MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read {what}: {exc.strerror or exc}") from exc
    if len(data) > MAX_FILE_BYTES:
        raise ConfigError(f"{path}: {what} is larger than {MAX_FILE_BYTES // 1024} KiB; refusing to read it")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: {what} is not UTF-8 text (byte {exc.start})") from None


def _at(mark: Any) -> str:
    return f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""


class _NotPlain(Exception):
    """The document uses what :class:`_PlainBuilder` leaves to the loader."""


class _PlainBuilder:
    """Builds a document from the parser's events as they pass, for plain YAML: no anchors, aliases,
    explicit tags or merge keys, as configs and devices files are written; anything else raises
    :class:`_NotPlain` and the loader builds it.

    Why: the loader first builds a node tree, each node with two marks, about five times the data at
    once (2.3 MB for a 1,000-device file), and a serving process keeps the memory a peak touched
    (docs/performance.md). Scalars are resolved and constructed by the loader's own resolver and
    constructors, so the result is what ``yaml.load`` returns (tests/core/test_bounded_config.py).
    """

    _PLAIN_KEY_TAGS = frozenset({"tag:yaml.org,2002:merge", "tag:yaml.org,2002:value"})

    def __init__(self, loader: Any) -> None:
        self._loader = loader
        self._stack: list[tuple[Any, list[Any]]] = []  # (open dict or list, [pending key]) innermost last
        self._documents = 0
        self.result: Any = None

    def feed(self, event: Any) -> None:
        if isinstance(event, yaml.ScalarEvent):
            self._add(self._scalar(event), is_key_ok=True)
        elif isinstance(event, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
            if event.anchor is not None or event.tag is not None:
                raise _NotPlain
            self._stack.append(({} if isinstance(event, yaml.MappingStartEvent) else [], []))
        elif isinstance(event, yaml.CollectionEndEvent):
            container, _ = self._stack.pop()
            self._add(container, is_key_ok=False)
        elif isinstance(event, yaml.AliasEvent):
            raise _NotPlain
        elif isinstance(event, yaml.DocumentStartEvent):
            self._documents += 1
            if self._documents > 1:
                raise _NotPlain  # the loader says why a second document is refused

    def _scalar(self, event: Any) -> Any:
        if event.anchor is not None or event.tag not in (None, "!"):
            raise _NotPlain
        tag = self._loader.resolve(yaml.ScalarNode, event.value, event.implicit)
        construct = self._loader.yaml_constructors.get(tag)
        if construct is None or tag in self._PLAIN_KEY_TAGS:
            raise _NotPlain
        try:
            return construct(self._loader, yaml.ScalarNode(tag, event.value, style=event.style))
        except yaml.YAMLError:
            raise _NotPlain from None  # the loader's error names the line

    def _add(self, value: Any, *, is_key_ok: bool) -> None:
        if not self._stack:
            self.result = value
            return
        container, pending = self._stack[-1]
        if isinstance(container, list):
            container.append(value)
        elif pending:
            container[pending.pop()] = value
        elif is_key_ok:
            pending.append(value)
        else:
            raise _NotPlain  # a mapping or list as a key: the loader refuses it


def _read_document(text: str, where: str) -> Any:
    """Refuse, from the parser's events alone, a document too deep or whose aliases expand too far;
    return the document when it is plain YAML (see :class:`_PlainBuilder`), else raise _NotPlain.

    Aliases are not copied by the loader, but every consumer that walks or prints the result
    expands them (a 655-byte "billion laughs" file becomes gigabytes), so the expanded size is
    what is bounded. The pass stops at the first excess.
    """
    sizes: dict[str, int] = {}  # anchor -> nodes it expands to
    stack: list[list[Any]] = []  # [anchor, nodes so far] of each open mapping or list
    total = 0
    loader = _LOADER(text)
    builder: _PlainBuilder | None = _PlainBuilder(loader)
    try:
        while loader.check_event():
            event = loader.get_event()
            if builder is not None:
                try:
                    builder.feed(event)
                except _NotPlain:
                    builder = None  # the bounds are still checked to the end
            if isinstance(event, yaml.CollectionStartEvent):
                if len(stack) >= MAX_DEPTH:
                    raise ConfigError(f"{where}: nested deeper than {MAX_DEPTH} levels{_at(event.start_mark)}")
                stack.append([event.anchor, 1])
                continue
            if isinstance(event, yaml.CollectionEndEvent):
                anchor, size = stack.pop()
            elif isinstance(event, yaml.ScalarEvent):
                anchor, size = event.anchor, 1
            elif isinstance(event, yaml.AliasEvent):
                anchor, size = None, sizes.get(event.anchor or "", 1)
            else:
                continue
            if anchor is not None:
                sizes[anchor] = size
            if stack:
                stack[-1][1] += size
                current = stack[-1][1]
            else:
                total += size
                current = total
            if current > MAX_NODES:
                raise ConfigError(f"{where}: more than {MAX_NODES} values once aliases are expanded"
                                  f"{_at(event.start_mark)}; write the values out or use fewer aliases")
    finally:
        loader.dispose()
    if builder is None:
        raise _NotPlain
    return builder.result


def parse_yaml(text: str, where: str) -> Any:
    """YAML (safe subset), within the bounds above; ConfigError naming ``where`` and the line and column."""
    if len(text) > MAX_FILE_BYTES:
        raise ConfigError(f"{where}: larger than {MAX_FILE_BYTES // 1024} KiB; refusing to read it")
    try:
        try:
            return _read_document(text, where)
        except _NotPlain:
            return yaml.load(text, Loader=_LOADER)  # _LOADER is a safe loader
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        raise ConfigError(clip(f"{where}: not valid YAML{_at(mark)}: {getattr(exc, 'problem', None) or exc}")) from exc
    except (ValueError, RecursionError, OverflowError, MemoryError) as exc:  # e.g. an integer over 4300 digits
        raise ConfigError(clip(f"{where}: cannot read a value: {exc}")) from None


def load_config(path: str | Path | None = None, environ: Mapping[str, str] | None = None) -> Config:
    """Read ``path`` (if given), then apply ``DPKIT_<KEY>`` overrides from ``environ``."""
    environ = os.environ if environ is None else environ
    raw: Any = {}
    source = "<defaults>"
    if path is not None:
        source = str(path)
        raw = parse_yaml(read_text(path, "config file"), source)
        if raw is None:  # an empty file (or only comments): most likely a ConfigMap key gone wrong
            log.warning(f"{source}: the config file is empty; running with the defaults")
            raw = {}
        if not isinstance(raw, Mapping):
            raise ConfigError(f"{source}: expected a mapping of settings at the top level, got {type(raw).__name__}")
        raw = _vendor_section(raw, source)
    config = load_section(raw, Config, source=source if path is not None else "", environ=environ, env=_ENV)
    if config.metrics_address:
        where = f"environment {ENV_PREFIX}METRICS_ADDRESS" if ENV_PREFIX + "METRICS_ADDRESS" in environ else source
        try:
            parse_address(config.metrics_address)
        except ConfigError as exc:
            raise ConfigError(f"{where}: {exc}") from None
    return dataclasses.replace(config, source=source)


def _vendor_section(raw: Mapping[str, Any], source: str) -> Mapping[str, Any]:
    """``vendor:`` left empty means no settings; a vendor's name there gets a hint; ``source`` is no key."""
    if "source" in raw:
        raise ConfigError(f"{source}: key 'source': unknown key (known keys: {', '.join(sorted(_ENV.values()))})")
    value = raw.get("vendor", {})
    if value is None:  # "vendor:" with every setting commented out
        return {k: v for k, v in raw.items() if k != "vendor"}
    if isinstance(value, str):
        raise ConfigError(f"{source}: key 'vendor': expected a mapping of the vendor's own settings, got the string "
                          f"{show(value)}; the vendor is chosen on the command line (`dpkit run {clip(value, 40)}`), "
                          "and 'vendor:' holds that vendor's settings (see its page in the docs)")
    return raw
