"""The checks of a cut: one forward pass on a probe batch (every unit's output shape, the feature family,
logits from the head, and for a recognised model that the cut computes what the model does), the
export keys found by tensor identity, and the defaults read off the model."""

from __future__ import annotations

import warnings
from typing import Iterable

import torch
from torch import nn

from ...base.errors import ManppError
from .adapters import WrappedBackbone
from .cut import HOW_TO, PARTS, Cut, evaluating, first_line, run_model


def export_keys(backbone: nn.Module, reference: nn.Module, label: str) -> dict[str, str]:
    """The reference model's state-dict key -> the backbone's key holding the same tensor."""
    ours: dict[int, str] = {}
    for key, tensor in backbone.state_dict(keep_vars=True).items():
        ours.setdefault(id(tensor), key)
    mapping, missing = {}, []
    for key, tensor in reference.state_dict(keep_vars=True).items():
        if id(tensor) in ours:
            mapping[key] = ours[id(tensor)]
        else:
            missing.append(key)
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ManppError(f"cannot wrap {label}: its tensor '{missing[0]}'{more} is in none of the units or the head, "
                         f"so training would not update it and export_state_dict() could not give it back; add the "
                         f"module that holds it to units= or head=")
    return mapping


def feature_family(cut: Cut, shapes: list[tuple[int, ...]]) -> str:
    """'imagenet' for (B, C, H, W) unit outputs, 'vit' for (B, tokens, width), else a clear error
    (``shapes`` with the batch dimension)."""
    dims = {len(s) for s in shapes}
    if dims in ({4}, {3}):
        return "imagenet" if dims == {4} else "vit"
    index = next(i for i, s in enumerate(shapes) if len(s) not in (3, 4) or len(s) != len(shapes[0]))
    name, module, _ = cut.units[index]
    shape = shapes[index]
    if cut.sequential and len(shape) == 2 and index > 0:
        advice = f"pass head='{name}' so that this child and the ones after it form the head"
    else:
        advice = "cut the model where its units give feature maps or tokens: " + PARTS
    shown = "(B, " + ", ".join(map(str, shape[1:])) + ")"
    mixed = " after units that gave other shapes" if len(shape) in (3, 4) else ""
    raise ManppError(f"cannot wrap {cut.label}: unit '{name}' ({type(module).__name__}) outputs a {shown} tensor"
                     f"{mixed}, but manpp's auxiliary networks read (B, C, H, W) feature maps or (B, tokens, width) "
                     f"token sequences with the class token first, the same kind from every unit; {advice}")


def stages_from_shapes(shapes: list[tuple[int, ...]]) -> list[int]:
    """Stage 0 for the first unit (the stem), stage 1 for the next, then a new stage wherever the
    (C, H, W) feature map shrinks; tokens stay in stage 1 (``shapes`` without the batch dimension)."""
    stages = [0]
    for i, (prev, cur) in enumerate(zip(shapes, shapes[1:])):
        shrinks = len(cur) == len(prev) == 3 and cur[-1] < prev[-1]
        stages.append(1 if i == 0 else stages[-1] + int(shrinks))
    return stages


def first_conv_channels(modules: Iterable[nn.Module]) -> int | None:
    for root in modules:
        for m in root.modules():
            if isinstance(m, nn.Conv2d):
                return m.in_channels
    return None


def default_image_size(model) -> int:
    """The side the model is built for: a ViT's ``image_size`` / ``patch_embed.img_size``, a timm model's
    ``pretrained_cfg['input_size']``, else 224."""
    size = getattr(model, "image_size", None)
    patch_embed = getattr(model, "patch_embed", None)
    if size is None and patch_embed is not None:
        size = getattr(patch_embed, "img_size", None)
    cfg = getattr(model, "pretrained_cfg", None)
    if size is None and isinstance(cfg, dict) and cfg.get("input_size"):
        size = cfg["input_size"][-1]
    if isinstance(size, (tuple, list)):
        size = size[-1]
    return int(size) if isinstance(size, int) and size > 0 else 224


def probe(cut: Cut, backbone: WrappedBackbone, x: torch.Tensor) -> tuple[str, list[tuple[int, ...]], torch.Tensor]:
    """The feature family, every unit's output shape (without the batch) and the head's output on ``x``,
    in eval mode; checks that the head gives logits and (``cut.check``) that the cut network computes
    what the model does."""
    with evaluating(backbone, cut.reference):
        h, shapes = x, []
        for (name, _, _), unit in zip(cut.units, backbone.units):
            try:
                h = unit(h)
            except Exception as exc:
                raise ManppError(f"cannot wrap {cut.label}: unit '{name}' fails on its input of shape "
                                 f"{tuple(h.shape)} ({first_line(exc)}); check that the units are in forward "
                                 f"order, and pass the image_size= and in_channels= the model takes") from exc
            if not isinstance(h, torch.Tensor):
                raise ManppError(f"cannot wrap {cut.label}: unit '{name}' returns {type(h).__name__}, not a tensor; "
                                 f"manpp passes one tensor from unit to unit")
            shapes.append(tuple(h.shape))
        family = feature_family(cut, shapes)
        try:
            out = backbone.head(h)
        except Exception as exc:
            raise ManppError(f"cannot wrap {cut.label}: the head fails on the last unit's output of shape "
                             f"{tuple(h.shape)} ({first_line(exc)})") from exc
        if not isinstance(out, torch.Tensor) or out.dim() != 2:
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ManppError(f"cannot wrap {cut.label}: the head gives {got}, not (batch, classes) logits; manpp.wrap "
                             f"trains classifiers")
        if cut.check is not None and cut.reference is not None:
            if cut.check == "error":
                expected = run_model(cut.reference, lambda: cut.reference(x), x)
            else:
                try:
                    expected = cut.reference(x)
                except Exception:  # a model described by its parts may take other inputs: nothing to compare
                    expected = None
            # (on the meta device, where manpp.commands.strategies builds models to estimate them, there are no values to
            # compare: the check runs wherever the model is built for real)
            if isinstance(expected, torch.Tensor) and expected.shape == out.shape and expected.device.type != "meta":
                tol = 1e-4 * (1.0 + float(expected.abs().max()))
                gap = float((out - expected).abs().max())
                if not gap <= tol:
                    message = (f"the wrapped {cut.label} computes something else than the model itself (largest "
                               f"difference {gap:.3g})")
                    if cut.check == "error":
                        raise ManppError(f"cannot cut {cut.label} faithfully: {message}, so its forward does more "
                                         f"than manpp recognises; {HOW_TO}")
                    warnings.warn(f"{message}: check that units= lists every step of its forward in order and that "
                                  f"head= does the rest", stacklevel=4)
    return family, [s[1:] for s in shapes], out


__all__ = ["default_image_size", "export_keys", "first_conv_channels", "probe", "stages_from_shapes"]
