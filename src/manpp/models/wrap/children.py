"""Any classifier whose forward runs its top-level children one after another (torchvision's
ShuffleNet, MNASNet, MaxViT; timm's legacy SENet and Xception, ...): the children in the order the
forward calls them, stage containers opened into their blocks, up to the last child that still gives
feature maps (or tokens); the rest is the head, with global average pooling in front when it starts
with a linear layer. Tried after the families that know a model's structure, and only kept when the
cut network computes exactly what the model does (the probe's check)."""

from __future__ import annotations

import torch
from torch import nn

from ...base.errors import ManppError
from .adapters import PoolHead
from .cut import HOW_TO, Cut, arch_of, evaluating, kind_of, run_model


def runs_children(model: nn.Module) -> bool:
    return len(list(model.children())) >= 2


def _opened(name: str, child: nn.Module) -> list[tuple[str, nn.Module]]:
    """A Sequential / ModuleList of blocks as one unit per block; anything else as one unit."""
    if isinstance(child, (nn.Sequential, nn.ModuleList)) and len(child) > 1:
        return [(f"{name}.{n}", c) for n, c in child.named_children()]
    return [(name, child)]


def _callable_children(model: nn.Module) -> dict[str, nn.Module]:
    """Top-level children, a ModuleList opened into its items (a forward loops over those, never calls it)."""
    out: dict[str, nn.Module] = {}
    for name, child in model.named_children():
        if isinstance(child, nn.ModuleList):
            out.update({f"{name}.{n}": c for n, c in child.named_children()})
        else:
            out[name] = child
    return out


def _pooled(h: torch.Tensor) -> torch.Tensor:
    return torch.flatten(nn.functional.adaptive_avg_pool2d(h, 1), 1)


def cut_children(model: nn.Module, x: torch.Tensor) -> Cut:
    kind = kind_of(model)
    children = _callable_children(model)
    order: list[str] = []

    def called(name: str):
        def hook(_module, _args) -> None:
            order.append(name)
        return hook

    hooks = [child.register_forward_pre_hook(called(name)) for name, child in children.items()]
    try:
        with evaluating(model):
            run_model(model, lambda: model(x), x)
    finally:
        for h in hooks:
            h.remove()
    if len(set(order)) != len(order) or len(order) < 2:
        what = "a child more than once" if len(set(order)) != len(order) else "fewer than two children"
        raise ManppError(f"cannot cut {kind} into units: its forward calls {what}; {HOW_TO}")
    head_at, pool = None, False  # where the head starts; whether the forward pools before it (x.mean outside modules)
    with evaluating(model):  # the children run one after another on the probe batch
        h = x
        for i, name in enumerate(order):
            try:
                out = children[name](h)
            except Exception:  # noqa: BLE001 - perhaps the forward pooled the maps in between
                if not (isinstance(h, torch.Tensor) and h.dim() == 4 and head_at is None):
                    raise ManppError(f"cannot cut {kind} into units: its children do not run one after another "
                                     f"({name} does not take what the child before it gives); {HOW_TO}") from None
                try:
                    out = children[name](_pooled(h))
                except Exception:  # noqa: BLE001
                    raise ManppError(f"cannot cut {kind} into units: its children do not run one after another "
                                     f"({name} takes neither the feature maps nor their average); {HOW_TO}") from None
                head_at, pool = i, True
            if head_at is None and not (isinstance(out, torch.Tensor) and out.dim() in (3, 4)):
                head_at = i  # the first child that no longer gives feature maps or tokens starts the head
            h = out
    if head_at is None or head_at < 1:
        raise ManppError(f"cannot cut {kind} into units: no part of its forward turns feature maps into logits "
                         f"by a module of its own; {HOW_TO}")
    units = [(n, m, None) for name in order[:head_at] for n, m in _opened(name, children[name])]
    tail = [children[n] for n in order[head_at:]]
    head_module = tail[0] if len(tail) == 1 else nn.Sequential(*tail)
    head = PoolHead(None, head_module) if pool else head_module
    return Cut(units, head, arch_of(model), model, "error", label=kind)


# (predicate, cutter): the fallback for any model, tried last
FAMILIES = [(runs_children, cut_children)]

__all__ = ["FAMILIES", "cut_children", "runs_children"]
