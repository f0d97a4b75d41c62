"""Crypto config sets: the ``cex_resources.json`` file of IBM's ``cex-resources-config`` ConfigMap.

The file is accepted unchanged::

    {"cryptoconfigsets": [{"setname": "cca1", "project": "blue", "cexmode": "cca",
                           "mincexgen": "cex7", "overcommit": 2, "livesysfs": 1,
                           "apqns": [{"adapter": 1, "domain": 6, "machineid": ""}]}]}

Each set becomes the extended resource ``cex.s390.ibm.com/<setname>``. Every error names the
file and the key path (``cryptoconfigsets[1].apqns[0].domain``). As in IBM's plugin, an APQN
may appear once in the whole file unless every occurrence is pinned to a different machine.
Keys match as Go's ``encoding/json`` matches them for IBM's plugin: exactly, else ignoring case
(``SetName``, ``Adapter``); of two keys for one field the later wins. Unknown keys are ignored
(IBM's parser ignores them too) but reported, to catch typos.

The file is untrusted input that may change under a running plugin: its size, nesting and
numbers are bounded, and every way it can be wrong (not JSON, nested too deep, a number beyond
Go's int, a bad value) is a :class:`ConfigError`, so a running plugin rejects the change and
keeps the last good version. Every check is linear in the file's size (a file may pin one APQN
to tens of thousands of machines).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dpkit.core import ConfigError, ValidationError, check_resource_name

RESOURCE_DOMAIN = "cex.s390.ibm.com"
MAX_FILE_BYTES = 4 * 1024 * 1024  # a ConfigMap holds at most 1 MiB; room for a hand-made file, not for abuse
DOCS = "docs/cex.md, section 'Crypto config sets (cex_resources.json)'"
MODES = ("cca", "ep11", "accel")
MAX_SET_OVERCOMMIT = 1000  # IBM's plugin has no cap; this one keeps a typo from flooding the kubelet
_GEN = re.compile(r"^cex([1-9][0-9]?)$")
_SET_KEYS = {"setname", "project", "cexmode", "mincexgen", "overcommit", "livesysfs", "apqns"}
_APQN_KEYS = {"adapter", "domain", "machineid"}
_TOP_KEYS = {"cryptoconfigsets"}
# bytes.EqualFold folds these non-ASCII letters onto ASCII ones (Kelvin sign, long s)
_FOLD = {"\u212a": "k", "\u017f": "s"}


@dataclass(frozen=True)
class ApqnDef:
    """One APQN of a set; ``machineid`` pins it to one machine ("" = any machine)."""

    adapter: int
    domain: int
    machineid: str = ""

    def applies_to(self, machine_id: str | None) -> bool:
        return not self.machineid or self.machineid == machine_id


@dataclass(frozen=True)
class ConfigSet:
    """One crypto config set; ``cexmode`` "" accepts any mode, ``mincexgen`` None any generation."""

    setname: str
    project: str
    cexmode: str
    mincexgen: int | None
    overcommit: int
    livesysfs: bool
    apqns: tuple[ApqnDef, ...]

    @property
    def resource(self) -> str:
        return f"{RESOURCE_DOMAIN}/{self.setname}"


@dataclass(frozen=True)
class CryptoConfig:
    """A verified config file: its sets, a digest to notice changes, and ignored keys."""

    sets: tuple[ConfigSet, ...]
    digest: str
    source: str
    ignored: tuple[str, ...] = ()

    def by_resource(self, resource: str) -> ConfigSet | None:
        return next((s for s in self.sets if s.resource == resource), None)

    def uses_machine_ids(self) -> bool:
        return any(a.machineid for s in self.sets for a in s.apqns)


def _fold(key: str) -> str:
    """``key`` folded as Go's ``bytes.EqualFold`` compares it with an ASCII field name."""
    return "".join(c.lower() if c.isascii() else _FOLD.get(c, c) for c in key)


def _fields(where: str, raw: Mapping[str, Any], known: set[str], ignored: list[str]) -> dict[str, Any]:
    """``raw`` by field name, matched as Go's ``encoding/json`` does; unknown keys go to ``ignored``.

    A key names the field it equals, else the one it equals ignoring case; keys are taken in
    file order, so of two keys for one field (``setname`` and ``SetName``) the later wins, and
    the earlier is reported with the ignored keys.
    """
    fields: dict[str, Any] = {}
    used: dict[str, str] = {}
    prefix = f"{where}." if where else ""
    for key, value in raw.items():
        name = key if key in known else next((k for k in sorted(known) if _fold(key) == k), None)
        if name is None:
            ignored.append(prefix + key)
            continue
        if name in used:
            ignored.append(f"{prefix}{used[name]} (overridden by a later {key!r})")
        fields[name], used[name] = value, key
    return fields


def _int(where: str, value: Any, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ConfigError(f"{where}: expected an integer from {low} to {high}, got {value!r}")
    return value


def _str(where: str, value: Any, *, required: bool = False) -> str:
    if value is None and not required:
        return ""
    if not isinstance(value, str) or (required and not value):
        raise ConfigError(f"{where}: expected a non-empty string, got {value!r}")
    return value


def _parse_apqn(where: str, raw: Any, ignored: list[str]) -> ApqnDef:
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where}: expected an object with adapter and domain, got {raw!r}")
    raw = _fields(where, raw, _APQN_KEYS, ignored)
    for key in ("adapter", "domain"):
        if key not in raw:
            raise ConfigError(f"{where}.{key}: missing")
    return ApqnDef(_int(f"{where}.adapter", raw["adapter"], 0, 255),
                   _int(f"{where}.domain", raw["domain"], 0, 255),
                   _str(f"{where}.machineid", raw.get("machineid")))


def _parse_set(where: str, raw: Any, overcommit: int, livesysfs: bool, ignored: list[str]) -> ConfigSet:
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where}: expected an object, got {type(raw).__name__}")
    raw = _fields(where, raw, _SET_KEYS, ignored)
    setname = _str(f"{where}.setname", raw.get("setname"), required=True)
    try:
        check_resource_name(f"{RESOURCE_DOMAIN}/{setname}")
    except ValidationError as exc:
        raise ConfigError(f"{where}.setname: {setname!r} cannot name a resource: {exc}") from None
    where = f"{where} ({setname})"
    cexmode = _str(f"{where}.cexmode", raw.get("cexmode"))
    if cexmode and cexmode not in MODES:
        raise ConfigError(f"{where}.cexmode: expected one of {', '.join(MODES)}, got {cexmode!r}")
    gen_text = _str(f"{where}.mincexgen", raw.get("mincexgen"))
    match = _GEN.match(gen_text)
    if gen_text and (match is None or int(match.group(1)) < 4):
        raise ConfigError(f"{where}.mincexgen: expected 'cex4', 'cex5', ..., got {gen_text!r}")
    set_overcommit = raw.get("overcommit")
    if set_overcommit is not None:
        if isinstance(set_overcommit, bool) or not isinstance(set_overcommit, int) \
                or set_overcommit > MAX_SET_OVERCOMMIT:
            raise ConfigError(f"{where}.overcommit: expected an integer of at most {MAX_SET_OVERCOMMIT} "
                              f"(dpkit's limit per set; IBM's plugin has none), got {set_overcommit!r}")
    live_raw = raw.get("livesysfs")
    if isinstance(live_raw, bool):
        live = live_raw
    elif live_raw is None or (isinstance(live_raw, int) and live_raw < 0):
        live = livesysfs  # absent (or negative, IBM's "not given"): the cluster default, APQN_LIVE_SYSFS
    elif isinstance(live_raw, int):
        live = live_raw > 0  # IBM's plugin: any positive number switches it on
    else:
        raise ConfigError(f"{where}.livesysfs: expected an integer (0 off, 1 on), got {live_raw!r}")
    apqns_raw = raw.get("apqns") or []
    if not isinstance(apqns_raw, list):
        raise ConfigError(f"{where}.apqns: expected a list, got {type(apqns_raw).__name__}")
    return ConfigSet(
        setname=setname,
        project=_str(f"{where}.project", raw.get("project"), required=True),
        cexmode=cexmode,
        mincexgen=int(match.group(1)) if match else None,
        # absent, 0 or negative: the cluster default (IBM: APQN_OVERCOMMIT_LIMIT)
        overcommit=set_overcommit if set_overcommit and set_overcommit > 0 else overcommit,
        livesysfs=live,
        apqns=tuple(_parse_apqn(f"{where}.apqns[{i}]", a, ignored) for i, a in enumerate(apqns_raw)),
    )


@dataclass
class _Uses:
    """Where one APQN was used so far: by machine id, and the set of an unpinned use (if any)."""

    first: str
    unpinned: str | None
    machines: dict[str, str]


def _check_overlaps(sets: tuple[ConfigSet, ...], source: str) -> None:
    """An APQN twice in the file is an error unless each use is pinned to a different machine.

    IBM's rule (two uses clash when their machine ids are equal or either is empty), checked in
    one pass with O(1) work per entry instead of comparing every pair.
    """
    seen: dict[tuple[int, int], _Uses] = {}
    for s in sets:
        for a in s.apqns:
            key = (a.adapter, a.domain)
            uses = seen.get(key)
            if uses is None:
                seen[key] = _Uses(s.setname, None if a.machineid else s.setname,
                                  {a.machineid: s.setname} if a.machineid else {})
                continue
            other = uses.unpinned or (uses.first if not a.machineid else uses.machines.get(a.machineid))
            if other is not None:
                where = "twice in set" if other == s.setname else f"in sets {other!r} and"
                raise ConfigError(
                    f"{source}: APQN ({a.adapter},{a.domain}) appears {where} {s.setname!r}; "
                    "sets must not overlap (pin each use to a different machineid, or remove one)")
            uses.machines[a.machineid] = s.setname


def _go_int(source: str) -> Any:
    """``parse_int`` for :func:`json.loads`: what fits Go's int (IBM's fields are ints), else an error.

    Bounding the digits first also keeps a 5,000-digit number from reaching ``int()``.
    """
    def parse(text: str) -> int:
        digits = text.lstrip("-")
        value = int(text) if len(digits) <= 19 else None
        if value is None or not -2**63 <= value < 2**63:
            shown = text if len(text) <= 24 else f"{text[:20]}... ({len(digits)} digits)"
            raise ConfigError(f"{source}: number {shown} is out of range (IBM's plugin reads integers "
                              "into Go's 64-bit int)")
        return value

    return parse


def parse_crypto_config(text: str, source: str, *, overcommit: int = 1, livesysfs: bool = True) -> CryptoConfig:
    """Verify a ``cex_resources.json`` text; ``overcommit``/``livesysfs`` fill absent set fields."""
    if len(text) > MAX_FILE_BYTES:
        raise ConfigError(f"{source}: {len(text)} characters; at most {MAX_FILE_BYTES} are read "
                          "(a ConfigMap holds 1 MiB)")
    try:
        raw = json.loads(text, parse_int=_go_int(source)) if text.strip() else {}
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{source}: not valid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}") from None
    except RecursionError:
        raise ConfigError(f"{source}: JSON nested too deeply (a crypto config set file is 4 levels deep)") from None
    except ValueError as exc:  # anything else json or int() refuses
        raise ConfigError(f"{source}: not valid JSON: {str(exc)[:200]}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{source}: expected a JSON object with 'cryptoconfigsets', got {type(raw).__name__}")
    ignored: list[str] = []
    sets_raw = _fields("", raw, _TOP_KEYS, ignored).get("cryptoconfigsets") or []
    if not isinstance(sets_raw, list):
        raise ConfigError(f"{source}: cryptoconfigsets: expected a list, got {type(sets_raw).__name__}")
    sets = tuple(_parse_set(f"{source}: cryptoconfigsets[{i}]", s, overcommit, livesysfs, ignored)
                 for i, s in enumerate(sets_raw))
    names: set[str] = set()
    for config_set in sets:
        if config_set.setname in names:
            raise ConfigError(f"{source}: setname {config_set.setname!r} is used by more than one set")
        names.add(config_set.setname)
    _check_overlaps(sets, source)
    digest = hashlib.sha256(text.encode()).hexdigest()
    return CryptoConfig(sets, digest, source, tuple(ignored))


def unreadable(path: str | Path, reason: str) -> str:
    """Why ``path`` could not be read, what the file is and how to get one (for discover and doctor)."""
    return (f"cannot read {path} ({reason}): this is cex_resources.json, the crypto config sets of "
            f"IBM's cex-resources-config ConfigMap, which the plugin pod mounts as a whole volume "
            f"(not subPath) at {Path(path).parent}; point vendor.config_file (or CCS_JSON_FILE) "
            f"elsewhere if it lives elsewhere. Format and an example: {DOCS}")


def _read_bounded(path: str | Path) -> bytes:
    with open(path, "rb") as f:
        data = f.read(MAX_FILE_BYTES + 1)
    return data


def read_crypto_config(path: str | Path, *, overcommit: int = 1, livesysfs: bool = True) -> CryptoConfig:
    """Read and verify the file; a missing or unreadable one says what the file is and where it is expected."""
    try:
        text = _read_bounded(path).decode()
    except OSError as exc:
        raise ConfigError(f"vendor.config_file: {unreadable(path, exc.strerror or str(exc))}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start})") from None
    return parse_crypto_config(text, str(path), overcommit=overcommit, livesysfs=livesysfs)


def file_digest(path: str | Path) -> str | None:
    """The digest :func:`parse_crypto_config` would record, or None when unreadable."""
    try:
        return hashlib.sha256(_read_bounded(path)).hexdigest()
    except OSError:
        return None


def read_machine_id(sysinfo_path: str | Path) -> str | None:
    """``<Manufacturer>-<Type>-<Sequence Code>`` from /proc/sysinfo, as IBM's machineid field."""
    try:
        text = Path(sysinfo_path).read_text(errors="replace")
    except OSError:
        return None
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() in ("Manufacturer", "Type", "Sequence Code") and key.strip() not in fields:
            fields[key.strip()] = value.strip()
    parts = [fields.get(k, "") for k in ("Manufacturer", "Type", "Sequence Code")]
    return "-".join(parts) if all(parts) else None
