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
(IBM's parser ignores them too) but reported with a did-you-mean, to catch typos. The classes
below declare each field's type and range; the core's schema layer converts the file into them.

The file is untrusted input that may change under a running plugin: its size, nesting and
numbers are bounded, and every way it can be wrong (not JSON, nested too deep, a number beyond
Go's int, a bad value) is a :class:`ConfigError`, so a running plugin rejects the change and
keeps the last good version. Every check is linear in the file's size (a file may pin one APQN
to tens of thousands of machines).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from dpkit.core import ConfigError, Invalid, Meta, Section, ValidationError, check_resource_name, load_section

RESOURCE_DOMAIN = "cex.s390.ibm.com"
MAX_FILE_BYTES = 4 * 1024 * 1024  # a ConfigMap holds at most 1 MiB; room for a hand-made file, not for abuse
DOCS = "docs/cex.md, section 'Crypto config sets (cex_resources.json)'"
MODES = ("cca", "ep11", "accel")
MAX_SET_OVERCOMMIT = 1000  # IBM's plugin has no cap; this one keeps a typo from flooding the kubelet
# bytes.EqualFold folds these non-ASCII letters onto ASCII ones (Kelvin sign, long s)
_FOLD = {"\u212a": "k", "\u017f": "s"}

Byte = Annotated[int, Meta(ge=0, le=255)]
Name = Annotated[str, Meta(min_length=1)]


class ApqnDef(Section, frozen=True):
    """One APQN of a set; ``machineid`` pins it to one machine ("" = any machine)."""

    adapter: Byte
    domain: Byte
    machineid: str = ""

    def applies_to(self, machine_id: str | None) -> bool:
        return not self.machineid or self.machineid == machine_id


class SetEntry(Section, frozen=True):
    """One set as the file writes it; :class:`ConfigSet` is the set with the cluster defaults filled in."""

    setname: Name
    project: Name
    cexmode: Annotated[Literal["", "cca", "ep11", "accel"], Meta(description="one of cca, ep11, accel")] = ""
    mincexgen: Annotated[str, Meta(pattern="^(cex([4-9]|[1-9][0-9]))?$", description="'cex4', 'cex5', ...")] = ""
    overcommit: int = 0  # 0 or negative: the cluster default (IBM: APQN_OVERCOMMIT_LIMIT)
    livesysfs: Annotated[bool | int, Meta(description="an integer (0 off, 1 on)")] = -1  # negative: not given
    apqns: tuple[ApqnDef, ...] = ()

    def __post_init__(self) -> None:
        try:
            check_resource_name(f"{RESOURCE_DOMAIN}/{self.setname}")
        except ValidationError as exc:
            raise Invalid(f"{self.setname!r} cannot name a resource: {exc}", "setname") from None
        if self.overcommit > MAX_SET_OVERCOMMIT:
            raise Invalid(f"expected an integer of at most {MAX_SET_OVERCOMMIT} (dpkit's limit per set; IBM's "
                          f"plugin has none), got {self.overcommit}", "overcommit")


class CryptoFile(Section, frozen=True):
    cryptoconfigsets: tuple[SetEntry, ...] = ()


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

    @classmethod
    def of(cls, entry: SetEntry, overcommit: int, livesysfs: bool) -> ConfigSet:
        """``entry`` with the cluster defaults where it gives no value (IBM: absent, <= 0, negative)."""
        live = entry.livesysfs
        return cls(entry.setname, entry.project, entry.cexmode, int(entry.mincexgen[3:]) if entry.mincexgen else None,
                   entry.overcommit if entry.overcommit > 0 else overcommit,
                   # IBM's plugin: any positive number switches it on
                   live if isinstance(live, bool) else livesysfs if live < 0 else live > 0, entry.apqns)


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


#: the keys of each level of the file, and the key holding the next level's list
_LEVELS: tuple[tuple[tuple[str, ...], str], ...] = (
    (tuple(CryptoFile.__struct_fields__), "cryptoconfigsets"), (tuple(SetEntry.__struct_fields__), "apqns"),
    (tuple(ApqnDef.__struct_fields__), ""))


def _go_keys(raw: Any, where: str, ignored: list[str], level: int = 0) -> Any:
    """``raw`` with its keys matched as Go's ``encoding/json`` matches them for IBM's plugin.

    A key names the field it equals, else the one it equals ignoring case; keys are taken in
    file order, so of two keys for one field (``setname`` and ``SetName``) the later wins and
    the earlier is reported. An unknown key is left out (IBM's parser ignores it) and reported
    with a did-you-mean; a null is left out too (Go: not given). The schema layer checks the rest.
    """
    if not isinstance(raw, Mapping):
        return raw
    known, inner = _LEVELS[level]
    fields: dict[str, Any] = {}
    used: dict[str, str] = {}
    for key, value in raw.items():
        name = key if key in known else next((k for k in known if _fold(key) == k), None)
        if name is None:
            import difflib  # only for a mistake in the file: a serving process never needs it

            close = difflib.get_close_matches(_fold(key), known, n=1)
            ignored.append(where + key + (f" (did you mean {close[0]!r}?)" if close else ""))
            continue
        if name in used:
            ignored.append(f"{where}{used[name]} (overridden by a later {key!r})")
        fields[name], used[name] = value, key
    if inner and isinstance(fields.get(inner), list):
        fields[inner] = [_go_keys(item, f"{where}{inner}[{i}].", ignored, level + 1)
                         for i, item in enumerate(fields[inner])]
    return {key: value for key, value in fields.items() if value is not None}


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
    ignored: list[str] = []
    document = load_section(_go_keys(raw, "", ignored), CryptoFile, source=source)
    sets = tuple(ConfigSet.of(entry, overcommit, livesysfs) for entry in document.cryptoconfigsets)
    names: set[str] = set()
    for config_set in sets:
        if config_set.setname in names:
            raise ConfigError(f"{source}: setname {config_set.setname!r} is used by more than one set")
        names.add(config_set.setname)
    _check_overlaps(sets, source)
    return CryptoConfig(sets, _digest(text.encode()), source, tuple(f"{source}: {key}" for key in ignored))


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


def _digest(data: bytes) -> str:
    """The file's length and its keyed 64-bit hash (SipHash, keyed per process): enough to notice a
    change within this process, which is all it is for. Not sha256: hashlib starts OpenSSL's digest
    provider, about 0.6 MB resident for every node's serving process (docs/performance.md)."""
    return f"{len(data)}-{hash(data) & 0xFFFFFFFFFFFFFFFF:016x}"


def file_digest(path: str | Path) -> str | None:
    """The digest :func:`parse_crypto_config` would record, or None when unreadable."""
    try:
        return _digest(_read_bounded(path))
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
