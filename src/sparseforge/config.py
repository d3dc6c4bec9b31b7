"""Frozen, typed configuration objects that round-trip through TOML.

Why a small home-grown base rather than a library: configs are the one thing
every method, recipe and CLI flag shares, so their semantics must be exact --
one meaning per field, unknown names rejected (never silently ignored), and an
error that names the field, what was given and what is accepted.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import tomllib
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

from .errors import ConfigError

CONFIG_VERSION = 1


def opt(default: Any = dataclasses.MISSING, help: str = "", *, min: float | None = None,
        max: float | None = None, choices: tuple | None = None, factory=None) -> Any:
    """A config field with a help text (used by the CLI) and optional bounds."""
    md = {"help": help, "min": min, "max": max, "choices": choices}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=md)
    return dataclasses.field(default=default, metadata=md)


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in get_args(tp))
    if origin in (tuple, list):
        args = [a for a in get_args(tp) if a is not Ellipsis]
        return f"list of {_type_name(args[0])}" if args else "list"
    if tp is type(None):
        return "none"
    return getattr(tp, "__name__", str(tp))


class _Mismatch(Exception):
    pass


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Return ``value`` converted to ``tp`` or raise _Mismatch."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin is Literal:
        if any(value == a and type(value) is type(a) for a in get_args(tp)):
            return value
        raise _Mismatch
    if origin in (Union, types.UnionType):
        for arg in get_args(tp):
            try:
                return _coerce(value, arg, where)
            except (_Mismatch, ConfigError):
                continue
        raise _Mismatch
    if tp is type(None):
        if value is None:
            return None
        raise _Mismatch
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise _Mismatch
        args = get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis or origin is list:
            elem = args[0] if args else Any
            return tuple(_coerce(v, elem, where) for v in value)
        if len(args) != len(value):
            raise _Mismatch
        return tuple(_coerce(v, a, where) for v, a in zip(value, args))
    if origin is dict:
        if not isinstance(value, dict):
            raise _Mismatch
        _, vt = get_args(tp) or (str, Any)
        return {str(k): _coerce(v, vt, where) for k, v in value.items()}
    if isinstance(tp, type) and issubclass(tp, Config):
        if isinstance(value, tp):
            return value
        if isinstance(value, dict):
            return tp.from_dict(value, where=where)
        raise _Mismatch
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _Mismatch
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise _Mismatch
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise _Mismatch
    if tp is str:
        if isinstance(value, str):
            return value
        raise _Mismatch
    if isinstance(value, tp):
        return value
    raise _Mismatch


@dataclasses.dataclass(frozen=True)
class Config:
    """Base of every config: validated on construction, immutable, TOML round-trip."""

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            where = f"{type(self).__name__}.{f.name}"
            try:
                value = _coerce(value, hints[f.name], where)
            except _Mismatch:
                raise ConfigError(
                    f"{where}: got {value!r} ({type(value).__name__}); expected {_type_name(hints[f.name])}"
                ) from None
            md = f.metadata
            if md.get("choices") and value not in md["choices"]:
                raise ConfigError(f"{where}: got {value!r}; accepted values: {', '.join(map(repr, md['choices']))}")
            # bounds hold for a number and for every number of a tuple/list (batch sizes: batches=[-1])
            for item in (value if isinstance(value, (tuple, list)) else (value,)):
                if isinstance(item, (int, float)) and not isinstance(item, bool):
                    if isinstance(item, float) and not math.isfinite(item):
                        raise ConfigError(f"{where}: got {value!r}; expected finite numbers")
                    if md.get("min") is not None and item < md["min"]:
                        raise ConfigError(f"{where}: got {value!r}; every value must be >= {md['min']}")
                    if md.get("max") is not None and item > md["max"]:
                        raise ConfigError(f"{where}: got {value!r}; every value must be <= {md['max']}")
            object.__setattr__(self, f.name, value)
        self.validate()

    def validate(self) -> None:
        """Cross-field checks; raise ConfigError with the field name and the fix."""

    # ---- dict / TOML -------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            out[f.name] = _plain(v)
        return out

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str | None = None):
        where = where or cls.__name__
        if not isinstance(data, dict):
            raise ConfigError(f"{where}: expected a table of fields, got {type(data).__name__}")
        names = cls.field_names()
        unknown = [k for k in data if k not in names]
        if unknown:
            k = unknown[0]
            close = difflib.get_close_matches(k, names, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"{where}: unknown field {k!r}{hint}; valid fields: {', '.join(names)}")
        try:
            return cls(**data)
        except TypeError as e:  # a required field is missing
            raise ConfigError(f"{where}: {e}") from None

    def replace(self, **changes):
        return self.from_dict({**self.to_dict(), **changes})

    def to_toml(self) -> str:
        return dumps_toml(self.to_dict())

    @classmethod
    def from_toml(cls, text: str, where: str | None = None):
        return cls.from_dict(loads_toml(text, where or cls.__name__), where)

    def save(self, path: str | Path) -> None:
        from .utils import atomic_write_text

        atomic_write_text(Path(path), self.to_toml())

    @classmethod
    def load(cls, path: str | Path):
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {p} not found; check the path")
        return cls.from_toml(p.read_text(), where=str(p))


def _plain(v: Any) -> Any:
    if isinstance(v, Config):
        return v.to_dict()
    if isinstance(v, tuple):
        return [_plain(x) for x in v]
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    return v


def loads_toml(text: str, where: str = "TOML") -> dict[str, Any]:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{where}: not valid TOML ({e}); fix the syntax at that position") from None


# ---- a small TOML writer (tomllib reads only) ---------------------------
def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v) or math.isinf(v):
            raise ConfigError(f"cannot write non-finite float {v} to TOML")
        return repr(v)
    if isinstance(v, str):
        esc = v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\t", "\\t")
        return f'"{esc}"'
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{_toml_key(k)} = {_toml_value(x)}" for k, x in v.items()) + " }"
    raise ConfigError(f"cannot write {type(v).__name__} to TOML")


def _toml_key(k: str) -> str:
    if k and all(c.isalnum() or c in "-_" for c in k):
        return k
    return _toml_value(k)


def dumps_toml(data: dict[str, Any], _prefix: str = "") -> str:
    """Write a dict of scalars, lists, tables and arrays of tables. ``None`` values are omitted."""
    lines: list[str] = []
    tables: list[tuple[str, dict]] = []
    arrays: list[tuple[str, list]] = []
    for k, v in data.items():
        if v is None:
            continue
        if isinstance(v, dict):
            tables.append((k, v))
        elif isinstance(v, (list, tuple)) and v and all(isinstance(x, dict) for x in v):
            arrays.append((k, list(v)))
        else:
            lines.append(f"{_toml_key(k)} = {_toml_value(v)}")
    out = "\n".join(lines)
    for k, v in tables:
        name = f"{_prefix}{_toml_key(k)}"
        body = dumps_toml(v, name + ".")
        out += f"\n\n[{name}]\n{body}" if out else f"[{name}]\n{body}"
    for k, arr in arrays:
        name = f"{_prefix}{_toml_key(k)}"
        for item in arr:
            body = dumps_toml(item, name + ".")
            out += f"\n\n[[{name}]]\n{body}" if out else f"[[{name}]]\n{body}"
    return out.strip("\n") + "\n" if _prefix == "" else out.strip("\n")


def content_hash(d: dict) -> str:
    """8 hex digits of sha256 over ``d`` as TOML: how run directories are named after what they compute."""
    import hashlib

    return hashlib.sha256(dumps_toml(d).encode()).hexdigest()[:8]
