"""Models described by the user: ``units=`` (dotted names or modules) and ``head=`` of any model, an
``nn.Sequential`` (its children), or a list of unit modules with a head."""

from __future__ import annotations

import warnings
from typing import Iterable, Sequence

import torch
from torch import nn

from ...base.errors import ManppError
from .cut import Cut, evaluating, kind_of


def find_submodule(model: nn.Module, name: str, what: str) -> nn.Module:
    try:
        module = model.get_submodule(name)
    except AttributeError:
        top = [n for n, _ in model.named_children()]
        raise ManppError(f"{what} '{name}' is not a module of {kind_of(model)}: give a dotted name such as "
                         f"'layer1.0'; its top-level modules are {', '.join(top) or 'none'}") from None
    if not name or module is model:
        raise ManppError(f"{what} '{name}' is the whole {kind_of(model)}: name one of its parts")
    return module


def check_disjoint(parts: list[tuple[str, nn.Module]]) -> None:
    """No part may be, or contain, another (it would run twice)."""
    for i, (a, ma) in enumerate(parts):
        inside = {id(m) for m in ma.modules()}
        for j, (b, mb) in enumerate(parts):
            if i != j and id(mb) in inside:
                relation = "is the same module as" if ma is mb else "contains"
                raise ManppError(f"'{a}' {relation} '{b}': units and head must be separate modules, each run once")


def check_unit_order(model: nn.Module, parts: list[tuple[str, nn.Module]], x: torch.Tensor | None) -> None:
    """The units run in the order ``units=`` lists them, as the model's own forward runs them (checked on
    the probe batch, in eval mode). Units of the same shape in the wrong order would run without an
    error and compute something else; a model whose forward does not take the probe batch is not checked."""
    if x is None:
        return
    first_call: dict[int, int] = {}

    def seen(i: int):
        def hook(_module, _args) -> None:  # returns None: the unit's input is left as it is
            first_call.setdefault(i, len(first_call))
        return hook

    hooks = [m.register_forward_pre_hook(seen(i)) for i, (_, m) in enumerate(parts)]
    try:
        with evaluating(model):
            model(x)
    except Exception:  # noqa: BLE001 - the model takes other inputs: nothing to compare with
        return
    finally:
        for h in hooks:
            h.remove()
    ran = sorted(first_call, key=first_call.get)
    if ran != sorted(ran):
        a, b = next((a, b) for a, b in zip(ran, ran[1:]) if a > b)
        raise ManppError(f"units= lists '{parts[b][0]}' before '{parts[a][0]}', but {kind_of(model)}'s forward runs "
                         f"'{parts[a][0]}' first: list the units in the order the model runs them")
    skipped = [parts[i][0] for i in range(len(parts)) if i not in first_call]
    if skipped and first_call:
        warnings.warn(f"{kind_of(model)}'s forward never runs unit{'s' if len(skipped) > 1 else ''} "
                      f"{', '.join(skipped)}: check units=", stacklevel=4)


def cut_named(model: nn.Module, units: Sequence, head, x: torch.Tensor | None = None) -> Cut:
    """``units=`` (dotted names or modules of ``model``) and ``head=`` (a dotted name or a module); ``x``,
    the probe batch, checks that the units are listed in the order the model runs them."""
    if isinstance(units, str) or not isinstance(units, Iterable):
        raise ManppError(f"units= must be a list of dotted module names in forward order, got {units!r}")
    names_of = {id(m): n for n, m in model.named_modules() if n}
    parts = []
    for i, ref in enumerate(units):
        if isinstance(ref, str):
            parts.append((ref, find_submodule(model, ref, "unit")))
        elif isinstance(ref, nn.Module):
            parts.append((names_of.get(id(ref), f"unit{i}"), ref))
        else:
            raise ManppError(f"units= holds {type(ref).__name__} {ref!r}: give dotted module names (or modules)")
    if not parts:
        raise ManppError("units= is empty: name at least one unit")
    if head is None:
        raise ManppError(f"units= needs head=: the module (or its dotted name) of {kind_of(model)} that turns the "
                         f"last unit's output into the logits")
    head_module = find_submodule(model, head, "head") if isinstance(head, str) else head
    if not isinstance(head_module, nn.Module):
        raise ManppError(f"head= must be a module or a dotted module name, got {type(head).__name__}")
    check_disjoint(parts + [("head", head_module)])
    check_unit_order(model, parts, x)
    inside = id(head_module) in names_of
    return Cut([(n, m, None) for n, m in parts], head_module, kind_of(model).lower(), model,
               "warn" if inside else None, label=kind_of(model))


def cut_sequential(model: nn.Sequential, head) -> Cut:
    children = list(model.named_children())
    names = [n for n, _ in children]
    if isinstance(head, nn.Module) and any(head is c for _, c in children):
        head = names[[c for _, c in children].index(head)]
    if head is None:
        if len(children) < 2:
            raise ManppError(f"cannot wrap a Sequential of {len(children)} module(s): it needs at least one unit and "
                             f"a head (its last child), or head=<module>")
        head = names[-1]
    if isinstance(head, str):
        if head not in names:
            raise ManppError(f"head '{head}' is not a child of the Sequential: its children are {', '.join(names)}")
        at = names.index(head)
        if at == 0:
            raise ManppError(f"head '{head}' is the Sequential's first child: no units would be left before it")
        tail = [c for _, c in children[at:]]
        head_module, inside = tail[0] if len(tail) == 1 else nn.Sequential(*tail), True
        children = children[:at]
    elif isinstance(head, nn.Module):
        head_module, inside = head, False
        check_disjoint(children + [("head", head)])
    else:
        raise ManppError(f"head= must be a child name or a module, got {type(head).__name__}")
    return Cut([(n, c, None) for n, c in children], head_module, "sequential", model, "warn" if inside else None,
               sequential=True, label=kind_of(model))


def cut_list(units: Sequence, head) -> Cut:
    modules = list(units)
    bad = [f"{i} ({type(m).__name__})" for i, m in enumerate(modules) if not isinstance(m, nn.Module)]
    if bad or not modules:
        raise ManppError(f"a list of units must hold nn.Module objects, got {', '.join(bad) or 'an empty list'}")
    if not isinstance(head, nn.Module):
        raise ManppError("a list of units needs head=<module>: the module that turns the last unit's output into "
                         "the logits")
    parts = [(str(i), m) for i, m in enumerate(modules)]
    check_disjoint(parts + [("head", head)])
    return Cut([(n, m, None) for n, m in parts], head, "units", None, None, label="the list of units")


__all__ = ["cut_list", "cut_named", "cut_sequential"]
