"""Typed building of dataclasses from plain data (YAML, JSON, command-line values).

Unknown keys and values of the wrong type raise :class:`~disel.errors.UserError` naming the key, so a typo
never silently falls back to a default.
"""

from __future__ import annotations

import copy
import dataclasses
import types
import typing
from dataclasses import fields
from typing import Any

from ..errors import UserError


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def coerce(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against the annotation ``tp``; ints are accepted for floats."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return coerce(value, a, where)
            except UserError as e:
                errors.append(e)
        want = " or ".join(_type_name(a) for a in args)
        raise UserError(f"{where}={value!r} has the wrong type: use {want}.")
    if tp is Any:
        return value
    if origin is list:
        if not isinstance(value, list):
            raise UserError(f"{where}={value!r} has the wrong type: use a list such as [a, b].")
        (inner,) = typing.get_args(tp) or (Any,)
        return [coerce(v, inner, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise UserError(f"{where}={value!r} has the wrong type: use a mapping such as {{key: value}}.")
        return copy.deepcopy(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise UserError(f"{where}={value!r} has the wrong type: use true or false.")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise UserError(f"{where}={value!r} has the wrong type: use an integer.")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML reads "1e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise UserError(f"{where}={value!r} has the wrong type: use a number such as 1e-4.")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise UserError(f"{where}={value!r} has the wrong type: use a string.")
    return value


def build_dataclass(cls: type, data: Any, where: str, hint: str = "") -> Any:
    """``cls(**data)`` with every key checked (unknown keys name the valid ones, plus ``hint``) and every value
    coerced to its annotation; nested dataclass fields are built the same way."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise UserError(f"{where or 'the config'} must be a mapping of keys to values, got {data!r}.")
    hints = _hints(cls)
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise UserError(
            f"Unknown key {(where + '.' if where else '') + str(unknown[0])!r}: "
            f"valid keys{' of ' + where if where else ''} are {', '.join(sorted(names))}.{hint}"
        )
    kwargs = {}
    for name, value in data.items():
        tp = hints[name]
        path = f"{where}.{name}" if where else name
        if dataclasses.is_dataclass(tp):
            kwargs[name] = build_dataclass(tp, value, path)
        else:
            kwargs[name] = coerce(value, tp, path)
    return cls(**kwargs)
