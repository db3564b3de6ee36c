"""Typed settings, each declared once: its type, default, rule (a range or choices) and help text.

A settings dataclass declares a field with :func:`setting`::

    lr: float = setting(0.1, rule=Number(low=0, low_open=True), help="the peak learning rate", flag="--lr")

and everything else reads that one declaration: validation (:func:`rule_of`, ``manpp.config.validate``),
the command line's options and ``--help`` (:func:`flag_of`, ``manpp.commands.cli``), and the conversion of
values from YAML or ``key=value`` (:func:`coerce`). The rules' choice lists live with the modules
that own them (``OPTIMIZERS`` in ``manpp.core.optim``, ``INITS`` in ``manpp.core.momentum``, ...).
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass
from typing import Any, Callable, Union

from .errors import ManppError, choices


@dataclass(frozen=True)
class Number:
    """A number in a range; ``integer`` for counts; ``optional`` lets None through."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    integer: bool = False
    optional: bool = False
    meaning: str = ""

    def accepted(self) -> str:
        kind = "an integer" if self.integer else "a number"
        if self.low is not None and self.high is not None:
            text = f"{kind} in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"
        elif self.low is not None:
            text = f"{kind} {'>' if self.low_open else '>='} {self.low:g}"
        elif self.high is not None:
            text = f"{kind} {'<' if self.high_open else '<='} {self.high:g}"
        else:
            text = f"a finite {kind.split()[1]}"
        return text + (" or none" if self.optional else "")

    def ok(self, value: Any) -> bool:
        if value is None:
            return self.optional
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        if self.integer and not isinstance(value, int) or not math.isfinite(value):
            return False
        if self.low is not None and (value < self.low or self.low_open and value == self.low):
            return False
        return not (self.high is not None and (value > self.high or self.high_open and value == self.high))


@dataclass(frozen=True)
class OneOf:
    """One of a fixed set of values; ``optional`` lets None through."""

    values: tuple
    optional: bool = False
    meaning: str = ""

    def accepted(self) -> str:
        return choices(self.values) + (" or none" if self.optional else "")

    def ok(self, value: Any) -> bool:
        if value is None:
            return self.optional
        return any(value is v or (not isinstance(v, bool) and not isinstance(value, bool) and value == v)
                   for v in self.values)


def positive_int(optional: bool = False, meaning: str = "") -> Number:
    return Number(low=1, integer=True, optional=optional, meaning=meaning)


def check_rule(name: str, rule: Number | OneOf | None, value: Any) -> None:
    """One value against its rule (no rule: nothing to check): one line naming it and what is accepted."""
    if rule is not None and not rule.ok(value):
        meaning = f" ({rule.meaning})" if rule.meaning else ""
        if isinstance(rule, OneOf):
            raise ManppError(f"unknown {name} {value!r}{meaning}: accepted are {rule.accepted()}")
        raise ManppError(f"bad {name} {value!r}{meaning}: accepted is {rule.accepted()}")


def setting(default: Any = None, *, rule: Number | OneOf | None = None, help: str | Callable[[], str] = "",
            flag: str | None = None, metavar: str | None = None, const: Any = None,
            factory: Callable | None = None) -> Any:
    """A dataclass field declared once: default (or ``factory``), ``rule``, ``help`` (text, or a callable
    giving it when the help is shown), and the command-line ``flag`` that sets it, if any (``const``: the
    value of the flag given without one)."""
    metadata = {"rule": rule, "help": help, "flag": flag, "metavar": metavar, "const": const}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def rule_of(field: dataclasses.Field) -> Number | OneOf | None:
    return field.metadata.get("rule")


def help_of(field: dataclasses.Field) -> str:
    text = field.metadata.get("help", "")
    return text() if callable(text) else text


def flag_of(field: dataclasses.Field) -> str | None:
    return field.metadata.get("flag")


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
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "on", "off", "1", "0"):
            return value.lower() in ("true", "yes", "on", "1")
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
