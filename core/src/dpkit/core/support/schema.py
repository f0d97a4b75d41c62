"""Declarative configuration sections: one converter for the core's settings and every vendor's.

A section is a frozen class (a :class:`Section`, or a dataclass) whose annotations say the types,
whose defaults are the defaults, and whose ``Meta`` constraints say the ranges and patterns;
``__post_init__`` holds what types cannot say (cross-key rules, normalising) and raises
:class:`Invalid` naming the key. :func:`load_section` turns a mapping (already read within the
bounds of :mod:`dpkit.core.support.config`) plus environment overrides into that object, or raises
one :class:`ConfigError` naming the file or variable, the full key path, what was expected and what
was found; an unknown key gets a did-you-mean.

msgspec does the converting: chosen by measurement (docs/performance.md, "Configuration layer:
library choice"): about 3 ms and 1 MiB where pydantic costs 45 ms and 10 MiB.
"""

from __future__ import annotations

import re
import reprlib
from collections.abc import Mapping
from typing import Any, TypeVar

import msgspec
import msgspec.inspect as mi
from msgspec import Meta
from msgspec.structs import force_setattr

from dpkit.core.vendorapi.errors import ConfigError

__all__ = ["Derived", "Invalid", "Meta", "Section", "force_setattr", "load_section", "setting", "show"]

T = TypeVar("T")
setting = msgspec.field  # a default and, where the file's key is no Python name, ``name="class"``
_MARK = "\x1f"  # separates the key an Invalid names from its message inside msgspec's error text
_BOOL_WORDS = {"1": True, "t": True, "true": True, "yes": True, "0": False, "f": False, "false": False, "no": False}
#: marks a field that ``__post_init__`` fills from others: ``x: Annotated[T, Derived] = None``; no key sets it
Derived = Meta(extra={"dpkit": "derived"})
_REPR = reprlib.Repr()
_REPR.maxstring, _REPR.maxother, _REPR.maxlevel, _REPR.maxlist, _REPR.maxdict = 80, 80, 2, 5, 5


def show(value: Any) -> str:
    """A bounded repr for error messages: a value from a file may be huge or deeply shared."""
    return _REPR.repr(value)


class Section(msgspec.Struct, frozen=True):
    """Base of a declared section: immutable, hashable, compared by value.

    Subclasses say ``frozen=True`` again (``class Pool(Section, frozen=True)``): msgspec would inherit
    it, but type checkers read each class's own arguments.
    """


class Invalid(ValueError):
    """A value the types allow but a rule refuses; ``key`` (dotted, relative to the section) names it."""

    def __init__(self, message: str, key: str = "") -> None:
        super().__init__(f"{_MARK}{key}{_MARK}{message}" if key else message)


def load_section(raw: Any, kind: type[T], *, source: str = "", root: str = "",
                 environ: Mapping[str, str] | None = None, env: Mapping[str, str] | None = None) -> T:
    """``raw`` as a ``kind``; ``env`` maps variable names to the key paths they override (environment wins).

    Errors read ``<source>: key '<path>': ...`` (``source`` is the file), or ``<root>.<path>: ...``
    for a section with no file of its own (``root`` is e.g. ``vendor``), or
    ``environment <NAME>: key '<path>': ...`` for a value a variable set.
    """
    info = mi.type_info(kind)
    document: Any = {} if raw is None else raw
    origin: dict[str, str] = {}
    for name, path in (env or {}).items():
        if environ is None or name not in environ:
            continue
        value = _from_env(environ[name], _type_at(info, path))
        if value is not None:
            if not isinstance(document, Mapping):
                break  # the shape error below names the file
            placed = _set(document, path, value)
            if placed is not None:
                document = placed
                origin[path] = name
    where = _Where(source, root, origin)
    _check_keys(document, info, "", where)
    try:
        return msgspec.convert(document, kind)
    except msgspec.ValidationError as exc:
        raise where.error_from(str(exc), document, info) from None


class _Where:
    """How an error names the place a value came from."""

    def __init__(self, source: str, root: str, origin: Mapping[str, str]) -> None:
        self.source, self.root, self.origin = source, root, origin

    def env_set(self, path: str) -> str | None:
        """The variable that set the value at ``path``, if one did."""
        return next((name for key, name in self.origin.items()
                     if path == key or path.startswith((key + ".", key + "["))), None)

    def __call__(self, path: str) -> str:
        full = _join(self.root, path)
        name = self.env_set(path)
        if name:
            return f"environment {name}: key {full!r}"
        if self.source:
            return f"{self.source}: key {full!r}" if full else self.source
        return full or "<top level>"

    def fail(self, path: str, problem: str) -> ConfigError:
        return ConfigError(f"{self(path)}: {problem}")

    def error_from(self, text: str, document: Any, info: mi.Type) -> ConfigError:
        """msgspec's ``<message> - at `$.a[0].b``` as a ConfigError in this module's words."""
        message, _, at = text.rpartition(" - at `")
        if not _:
            message, at = text, "$`"
        path = _path(at.rstrip("`"))
        if message.startswith(_MARK):
            key, _, problem = message[1:].partition(_MARK)
            return self.fail(_join(path, key), problem)
        missing = re.fullmatch(r"Object missing required field `(.+)`", message)
        if missing:
            path = _join(path, missing.group(1))
            return self.fail(path, f"required: expected {_expect(_type_at(info, path), None)}")
        if message.startswith(("Expected", "Invalid enum value")):
            value = _value_at(document, path)
            kind = _type_at(info, path)
            quoted = isinstance(_unwrap(kind), mi.BoolType) and isinstance(value, str) and not self.env_set(path)
            hint = " (quoted, so a string: write true or false without quotes)" if quoted else ""
            return self.fail(path, f"expected {_expect(kind, value)}, got {_got(value, kind)}{hint}")
        return self.fail(path, message)


def _check_keys(value: Any, kind: mi.Type, path: str, where: _Where) -> None:
    """Every key of every mapping is one the section declares; a stranger is refused with a did-you-mean."""
    kind = _unwrap(kind)
    if isinstance(kind, mi.UnionType):
        for member in kind.types:
            if _fits(value, _unwrap(member)):
                _check_keys(value, member, path, where)
                return
    elif isinstance(kind, (mi.StructType, mi.DataclassType)) and isinstance(value, Mapping):
        fields = {f.encode_name: f.type for f in kind.fields if not _derived(f.type)}
        for key, item in value.items():
            if key not in fields:
                import difflib  # only for an error: a serving process never needs it

                close = difflib.get_close_matches(str(key), list(fields), n=1)
                hint = f"did you mean {close[0]!r}?" if close else f"known keys: {', '.join(fields)}"
                raise where.fail(_join(path, str(key)), f"unknown key ({hint})")
            _check_keys(item, fields[key], _join(path, key), where)
    elif isinstance(kind, (mi.ListType, mi.VarTupleType)) and isinstance(value, list):
        for index, item in enumerate(value):
            _check_keys(item, kind.item_type, f"{path}[{index}]", where)
    elif isinstance(kind, mi.DictType) and isinstance(value, Mapping):
        for key, item in value.items():
            _check_keys(item, kind.value_type, _join(path, str(key)), where)


def _derived(kind: mi.Type) -> bool:
    return isinstance(kind, mi.Metadata) and kind.extra == Derived.extra


def _fits(value: Any, kind: mi.Type) -> bool:
    """Whether ``value`` has the shape of ``kind`` (which member of a union to describe or walk into)."""
    shapes: list[tuple[type, tuple[type, ...]]] = [
        (mi.BoolType, (bool,)), (mi.IntType, (int,)), (mi.FloatType, (int, float)), (mi.StrType, (str,)),
        (mi.LiteralType, (str, int)), (mi.ListType, (list,)), (mi.VarTupleType, (list,)),
        (mi.DictType, (Mapping,)), (mi.StructType, (Mapping,)), (mi.DataclassType, (Mapping,)),
        (mi.NoneType, (type(None),)),
    ]
    for shape, types in shapes:
        if isinstance(kind, shape):
            return isinstance(value, types) and (shape is mi.BoolType or not isinstance(value, bool))
    return isinstance(kind, mi.AnyType)


def _unwrap(kind: mi.Type) -> mi.Type:
    return kind.type if isinstance(kind, mi.Metadata) else kind


def _expect(kind: mi.Type, value: Any) -> str:
    """What a value at a key should be, in words: from the annotation's description, type and range."""
    schema = kind.extra_json_schema if isinstance(kind, mi.Metadata) else None
    described = str(schema["description"]) if schema and "description" in schema else None
    kind = _unwrap(kind)
    if isinstance(kind, mi.UnionType):
        matching = [m for m in kind.types if _fits(value, _unwrap(m))]
        if described is None and len(matching) == 1 and not isinstance(_unwrap(matching[0]), mi.NoneType):
            return _expect(matching[0], value)
        return described or " or ".join(_expect(m, value) for m in kind.types)
    if isinstance(kind, mi.LiteralType):
        return described or "one of " + ", ".join(map(str, kind.values))
    if isinstance(kind, (mi.IntType, mi.FloatType)):
        what = described or ("an integer" if isinstance(kind, mi.IntType) else "a number")
        if not _fits(value, kind):  # a wrong type: say the type, not the range
            return what
        if kind.gt == 0 and what.startswith("a "):
            what = "a positive " + what[2:]
        return what + _range(kind)
    if isinstance(kind, mi.StrType):
        if described:
            return described
        return "a non-empty string" if kind.min_length == 1 else "a string"
    if described:
        return described
    words = {mi.BoolType: "true or false", mi.ListType: "a list", mi.VarTupleType: "a list",
             mi.DictType: "a mapping", mi.StructType: "a mapping", mi.DataclassType: "a mapping",
             mi.NoneType: "null"}
    return next((w for t, w in words.items() if isinstance(kind, t)), type(kind).__name__)


def _range(kind: mi.IntType | mi.FloatType) -> str:
    low, high = (kind.ge, kind.le)
    if kind.gt is not None and kind.gt != 0:
        return f" greater than {_number(kind.gt)}"
    if low is not None and high is not None:
        return f" from {_number(low)} to {_number(high)}"
    if low is not None:
        return f" of at least {_number(low)}"
    return f" up to {_number(high)}" if high is not None else ""


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


def _got(value: Any, kind: mi.Type) -> str:
    """The value found; with its type where the type is what is wrong."""
    if value is _MISSING:
        return "nothing"
    kind = _unwrap(kind)
    members = kind.types if isinstance(kind, mi.UnionType) else (kind,)
    right_type = any(_fits(value, _unwrap(m)) for m in members)
    return show(value) if right_type else f"{type(value).__name__} {show(value)}"


_MISSING = object()
_STEP = re.compile(r"\.([^.\[]+)|\[(\d+|\.\.\.)\]")


def _path(at: str) -> str:
    """msgspec's ``$.a[0].b`` as ``a[0].b``."""
    return at.removeprefix("$").removeprefix(".")


def _steps(path: str) -> list[str | int]:
    return [m.group(1) if m.group(1) is not None else (int(m.group(2)) if m.group(2) != "..." else "...")
            for m in _STEP.finditer("." + path if path and not path.startswith("[") else path)]


def _value_at(document: Any, path: str) -> Any:
    value = document
    for step in _steps(path):
        if isinstance(step, int) and isinstance(value, list) and step < len(value):
            value = value[step]
        elif isinstance(step, str) and isinstance(value, Mapping) and step in value:
            value = value[step]
        else:
            return _MISSING
    return value


def _type_at(kind: mi.Type, path: str) -> mi.Type:
    for step in _steps(path):
        kind = _unwrap(kind)
        if isinstance(kind, mi.UnionType):  # the member a step can enter
            kind = next((_unwrap(m) for m in kind.types if isinstance(_unwrap(m), (
                mi.StructType, mi.DataclassType, mi.DictType) if isinstance(step, str) else (
                mi.ListType, mi.VarTupleType))), kind)
        if isinstance(kind, (mi.StructType, mi.DataclassType)) and isinstance(step, str):
            kind = next((f.type for f in kind.fields if f.encode_name == step), mi.AnyType())
        elif isinstance(kind, (mi.ListType, mi.VarTupleType)):
            kind = kind.item_type
        elif isinstance(kind, mi.DictType):
            kind = kind.value_type
        else:
            return mi.AnyType()
    return kind


def _join(path: str, key: str) -> str:
    if not path:
        return key
    return f"{path}{key}" if key.startswith("[") or not key else f"{path}.{key}"


def _set(document: Mapping[str, Any], path: str, value: Any) -> dict[str, Any] | None:
    """A copy of ``document`` with ``value`` at the dotted ``path`` (missing mappings made on the way);
    None when the file has something else than a mapping on the way: its own error must show, not
    vanish under a variable (with the keys beside it)."""
    head, _, rest = path.partition(".")
    out = dict(document)
    if rest:
        inner = out.get(head)
        if inner is not None and not isinstance(inner, Mapping):
            return None
        placed = _set(inner or {}, rest, value)
        if placed is None:
            return None
        out[head] = placed
    else:
        out[head] = value
    return out


def _from_env(text: str, kind: mi.Type) -> Any:
    """A variable's text as the key's type would read it; None where it counts as unset (empty, not a string)."""
    kind = _unwrap(kind)
    members = [_unwrap(m) for m in kind.types] if isinstance(kind, mi.UnionType) else [kind]
    listed = next((m for m in members if isinstance(m, (mi.ListType, mi.VarTupleType))), None)
    if listed is not None:
        items = [part.strip() for part in text.split(",") if part.strip()]
        return [_scalar(item, _unwrap(listed.item_type)) for item in items] or None
    if not any(isinstance(m, (mi.StrType, mi.LiteralType, mi.AnyType)) for m in members) and not text.strip():
        return None  # as NVIDIA's and Go's flag libraries read it: an empty boolean or number is unset
    return _scalar(text, members[0])


def _scalar(text: str, kind: mi.Type) -> Any:
    """``text`` converted when it reads as ``kind``; else the text itself, for the converter to refuse by name."""
    try:
        if isinstance(kind, mi.BoolType):
            return _BOOL_WORDS.get(text.strip().lower(), text)
        if isinstance(kind, mi.IntType):
            return int(text)
        if isinstance(kind, mi.FloatType):
            return float(text)
    except (ValueError, OverflowError):
        return text
    return text
