"""Typed settings: values from YAML or ``key=value`` checked and converted against a dataclass."""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Union

from .errors import ManppError


def coerce(name: str, value: Any, hint: Any) -> Any:
    """``value`` as the type ``hint`` (``int``, ``float``, ``bool``, ``str``, optional ones, ``Any``), or a
    clear error naming the setting."""
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        hint = args[0]
    if hint is Any:
        return value
    if typing.get_origin(hint) is dict or hint is dict:
        if isinstance(value, dict):
            return dict(value)
    elif hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lstrip("-").isdigit():
            return int(value)
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        try:
            return float(value)
        except (TypeError, ValueError):
            pass
    elif hint is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    raise ManppError(f"bad value {value!r} for '{name}': expected {getattr(hint, '__name__', hint)}")


def field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def coerce_fields(cls: type, values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``values`` converted field by field to the types of dataclass ``cls`` (names must be its fields)."""
    types_ = field_types(cls)
    return {key: coerce(prefix + key, value, types_[key]) for key, value in values.items()}
