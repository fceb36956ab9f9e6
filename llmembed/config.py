"""Typed configs: nested dataclasses built from plain dicts (JSON/YAML), unknown keys refused.

``from_dict(Cls, data, where="file.yaml")`` names the offending key path in every error, e.g.
``model.pooling.kind``, so a typo in a config file never passes silently.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Any, TypeVar

T = TypeVar("T")


class ConfigError(ValueError):
    """A config value or key is wrong; the message names it."""


@dataclasses.dataclass(frozen=True)
class Range:
    """Where a numeric setting may lie; ``None`` bounds are open. ``None`` values (unset
    optional settings) are always in range."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None

    def problem(self, value: Any) -> str | None:
        """What is wrong with ``value`` (each item of a list), or None."""
        if value is None:
            return None
        if isinstance(value, (list, tuple)):
            return next((p for p in map(self.problem, value) if p), None)
        for bound, fails, words in ((self.ge, lambda b: value < b, ">="), (self.gt, lambda b: value <= b, ">"),
                                    (self.le, lambda b: value > b, "<="), (self.lt, lambda b: value >= b, "<")):
            if bound is not None and fails(bound):
                return f"must be {words} {bound}, got {value!r}"
        return None


def bounded(default: Any, *, ge: float | None = None, gt: float | None = None, le: float | None = None,
            lt: float | None = None) -> Any:
    """A dataclass field whose numeric value must lie in a range, checked by :func:`from_dict`
    (with the key's full path) and by :func:`check_ranges` for objects built in Python."""
    return dataclasses.field(default=default, metadata={"range": Range(ge, gt, le, lt)})


def check_ranges(obj: Any) -> None:
    """Raise ValueError for the first field of dataclass ``obj`` outside its declared range;
    call it from ``__post_init__``."""
    for f in dataclasses.fields(obj):
        declared = f.metadata.get("range")
        problem = declared.problem(getattr(obj, f.name)) if declared else None
        if problem:
            raise ValueError(f"{f.name} {problem}")


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return args[0], True
    return tp, False


def _convert(tp: Any, value: Any, key: str) -> Any:
    inner, optional = _unwrap_optional(tp)
    if value is None:
        if optional or tp is Any:
            return None
        raise ConfigError(f"{key}: may not be null")
    if dataclasses.is_dataclass(inner):
        if isinstance(value, inner):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__}")
        return from_dict(inner, value, prefix=key)
    origin = typing.get_origin(inner)
    if inner is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true/false, got {value!r}")
        return value
    if inner is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if inner is float:
        if isinstance(value, str):
            # YAML 1.1 reads "1e-4" (no dot) as a string; accept it as the number it means.
            try:
                number = float(value)
            except ValueError:
                raise ConfigError(f"{key}: expected a number, got {value!r}") from None
        elif isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        else:
            number = float(value)
        # NaN passes every "> 0" check and trains NaN losses to a "final" model: refuse it here,
        # for every float setting at once.
        if not math.isfinite(number):
            raise ConfigError(f"{key}: expected a finite number, got {value!r}")
        return number
    if inner is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (item_tp, *_) = typing.get_args(inner) or (Any,)
        return [_convert(item_tp, v, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        _, val_tp = typing.get_args(inner) or (Any, Any)
        return {k: _convert(val_tp, v, f"{key}.{k}") for k, v in value.items()}
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(inner):
            try:
                return _convert(option, value, key)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: {value!r} does not match {inner}")
    return value


def from_dict(cls: type[T], data: dict[str, Any], prefix: str = "") -> T:
    """Build dataclass ``cls`` from ``data``; refuse unknown keys and wrong types."""
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(known))
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(f"unknown key(s) {', '.join(where + k for k in unknown)}; known: {', '.join(sorted(known))}")
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else name
        kwargs[name] = _convert(hints[name], value, key)
        declared = known[name].metadata.get("range")
        problem = declared.problem(kwargs[name]) if declared else None
        if problem:
            raise ConfigError(f"{key}: {problem}")
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as err:
        if isinstance(err, ConfigError):
            raise
        raise ConfigError(f"{prefix or cls.__name__}: {err}") from err


def to_dict(obj: Any) -> Any:
    return dataclasses.asdict(obj)
