"""What every cutter returns (:class:`Cut`) and the helpers they share: running a model on the probe
batch in eval mode, the order in which its forward calls its children, and the advice given when a
model cannot be cut."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from ...base.errors import ManppError

PARTS = ("manpp.wrap(model, units=[dotted names of the units in forward order], head=<dotted name or module>), "
         "or a list of unit modules with head=<module>")
HOW_TO = "pass its parts instead: " + PARTS


@dataclass
class Cut:
    """Units ``(name, module, stage or None)`` and head of a model, and how to check them."""

    units: list[tuple[str, nn.Module, int | None]]
    head: nn.Module
    arch: str
    reference: nn.Module | None  # the model whose state-dict keys are exported (None: the backbone's own)
    check: str | None  # compare the cut network with reference(x): 'error', 'warn' or None
    sequential: bool = False  # an nn.Sequential cut by children (the error advice names head='<child>')
    label: str = ""  # how error messages name the model (default: ``arch``)

    def __post_init__(self):
        self.label = self.label or self.arch


def kind_of(model) -> str:
    return type(model).__name__


def arch_of(model: nn.Module) -> str:
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None)
    arch = cfg.get("architecture") if isinstance(cfg, dict) else None
    return str(arch or kind_of(model).lower())


@contextlib.contextmanager
def evaluating(*roots: nn.Module | None):
    """Eval mode for every module under ``roots`` inside the block, each module's own mode after."""
    modes = {}
    for root in roots:
        if root is not None:
            for m in root.modules():
                modes[id(m)] = (m, m.training)
    for m, _ in modes.values():
        m.training = False
    try:
        with torch.no_grad():
            yield
    finally:
        for m, mode in modes.values():
            m.training = mode


def call_order(model: nn.Module, run: Callable[[], object]) -> list[str]:
    """The names of ``model``'s children in the order ``run()`` calls them."""
    order: list[str] = []
    handles = [child.register_forward_pre_hook(lambda *_, name=name: order.append(name))
               for name, child in model.named_children()]
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    return order


def run_model(model: nn.Module, run: Callable[[], object], x: torch.Tensor):
    try:
        return run()
    except Exception as exc:  # the model's own error on our probe batch, explained
        raise ManppError(f"cannot wrap {kind_of(model)}: it does not run on a batch of shape {tuple(x.shape)} "
                         f"({first_line(exc)}); pass the image_size= and in_channels= it takes") from exc


def first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


def around(order: list[str], trunk: list[str], model: nn.Module) -> tuple[list[str], list[str]]:
    """The children called before and after the trunk (which must run once, in order)."""
    if not trunk or trunk[0] not in order or trunk[-1] not in order:
        raise ManppError(f"cannot cut {kind_of(model)} into units: its forward does not run its stages "
                         f"({', '.join(trunk)}); {HOW_TO}")
    first = order.index(trunk[0])
    last = len(order) - 1 - order[::-1].index(trunk[-1])
    before, middle, after = order[:first], order[first:last + 1], order[last + 1:]
    twice = sorted({n for n in before + after if (before + after).count(n) > 1 or n in trunk})
    if middle != trunk or twice:
        what = f"calls {', '.join(twice)} more than once" if twice else f"runs {', '.join(middle)} between its stages"
        raise ManppError(f"cannot cut {kind_of(model)} into units: its forward {what}; {HOW_TO}")
    return before, after


__all__ = ["Cut", "HOW_TO", "PARTS", "arch_of", "around", "call_order", "evaluating", "first_line", "kind_of",
           "run_model"]
