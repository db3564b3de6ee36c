"""``as_backbone``: a ready-made classifier as manpp units (what :func:`manpp.wrap` trains).

The wrapped backbone holds the model's OWN modules (not copies), sometimes inside small adapter
modules, so training it trains the model. What can be wrapped:

- **torchvision** classifiers: ResNet / ResNeXt / Wide ResNet (the stem, then every residual
  block); VGG, AlexNet, MobileNet, EfficientNet, ConvNeXt and RegNet (every layer of
  ``features`` / ``trunk_output``, stages opened into their blocks); VisionTransformer (the
  embedding, then every encoder block); Swin (see channels-last below).
- **timm** classifiers (anything with ``forward_features`` and ``forward_head``), cut along timm's
  own structure: the stages named by ``feature_info`` (``layer1..4``, ``stages``, ``blocks``,
  ``layers``) opened into their blocks, the stem being what ``forward_features`` runs before them
  (for ViTs: ``patch_embed``, ``_pos_embed`` with the class token, ``norm_pre``), the head being
  what it runs after them followed by the model's own ``forward_head``: ResNet / ResNeXt,
  ConvNeXt, EfficientNet, MobileNetV3, RegNet, ViT / DeiT at any ``img_size``, Swin, ...
- **channels-last** models (timm Swin, torchvision Swin: stages give (B, H, W, C)): every unit is
  wrapped in permutations so that between units the features are (B, C, H, W) maps, which the
  auxiliary networks read; the head permutes back.
- an **nn.Sequential**: every child is a unit and the last child is the head. ``head="<child
  name>"`` makes that child and the ones after it the head; ``head=<module>`` (not one of its
  children) appends that module as the head and every child is a unit.
- **any model, given its parts**: ``units=[dotted names]`` of its units in forward order (or the
  modules themselves) and ``head=`` (a dotted name or a module) turning the last unit's output
  into the logits; or a **list of units** (no model) with ``head=<module>``.

Units must output (B, C, H, W) feature maps (``aux_family="imagenet"``) or (B, tokens, width)
token sequences with the class token first (``aux_family="vit"``); the head must give (B, classes)
logits. ``as_backbone`` checks this with one forward pass on random images of ``image_size``, and
for a model it recognised itself also that the cut network computes exactly what the model does;
anything it cannot cut is refused with one :class:`~manpp.base.errors.ManppError` saying why and how to
pass ``units=`` and ``head=`` instead.

``export_state_dict()`` gives the trained weights under the model's own state-dict keys (found by
tensor identity), so they load with ``strict=True`` into a fresh instance of the model. A head
module passed as ``head=`` that is not part of the model is not in it (it is your module, trained
in place). For a list of units it is the backbone's own state dict.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from ...base.errors import ManppError
from . import children, timm_models, torchvision_models
from .adapters import Permute, WrappedBackbone
from .cut import HOW_TO, Cut, kind_of
from .probe import default_image_size, export_keys, first_conv_channels, probe, stages_from_shapes
from .user import cut_list, cut_named, cut_sequential

__all__ = ["Permute", "WrappedBackbone", "as_backbone"]


# every family manpp cuts by itself, as (predicate, cutter) pairs tried in order (the generic chain of
# children last); a new family is a file with its own FAMILIES list, added here
RECOGNISED = [*timm_models.FAMILIES, *torchvision_models.FAMILIES, *children.FAMILIES]


def recognised_cutters(model: nn.Module) -> list:
    """The cutters that may cut ``model``, most specific first; one clear error when none applies."""
    cutters = [cutter for recognises, cutter in RECOGNISED if recognises(model)]
    if not cutters:
        named = [n for n, _ in model.named_children()]
        raise ManppError(f"cannot cut {kind_of(model)} into units: it is not a torchvision or timm classifier manpp "
                         f"recognises (none of its modules ({', '.join(named) or 'none'}) is a known stage list such "
                         f"as ResNet 'layer1..4', 'features', timm 'stages'/'blocks' or a ViT 'encoder.layers'); "
                         f"{HOW_TO}")
    return cutters


def as_backbone(model: nn.Module | Sequence[nn.Module], *, units: Sequence | None = None, head=None,
                in_channels: int | None = None, image_size: int | None = None,
                num_classes: int | None = None) -> WrappedBackbone:
    """``model`` as a manpp backbone of its own modules (see the module docstring for what is accepted).

    ``in_channels`` defaults to the first convolution's input channels (else 3), ``image_size`` to the
    model's own (a ViT's) or 224; they shape the one probe batch the cut is checked on. ``num_classes``
    defaults to the width of the head's output (and must match it when given).
    """
    if isinstance(model, (list, tuple, nn.ModuleList)):
        if units is not None:
            raise ManppError("units= names modules of a model; a list of units is already the units: pass head= only")
        cut_first = cut_list(model, head)
        roots = [m for _, m, _ in cut_first.units]
    elif isinstance(model, nn.Module):
        cut_first, roots = None, [model]
    else:
        raise ManppError(f"manpp.wrap takes an nn.Module or a list of unit modules, got {type(model).__name__}")
    in_channels = int(in_channels or first_conv_channels(roots) or 3)
    image_size = int(image_size or default_image_size(model))
    p = next((t for r in roots for t in r.parameters()), None)
    x = torch.randn(2, in_channels, image_size, image_size, generator=torch.Generator().manual_seed(0))
    if p is not None:
        x = x.to(device=p.device, dtype=p.dtype if p.dtype.is_floating_point else x.dtype)

    if cut_first is not None:
        cut = cut_first
    elif units is not None:
        cut = cut_named(model, units, head, x)
    elif isinstance(model, nn.Sequential):
        cut = cut_sequential(model, head)
    elif head is not None:
        raise ManppError(f"head= without units= is for an nn.Sequential or a list of units; for {kind_of(model)} "
                         f"pass units= too, or neither to let manpp cut it")
    else:  # a model manpp cuts by itself: the first cutter whose cut computes what the model does
        cutters = recognised_cutters(model)
        first_error = None
        for cutter in cutters:
            try:
                return _checked(_cut_with(cutter, model, x), in_channels, image_size, num_classes, x)
            except ManppError as exc:
                first_error = first_error or exc
        if cutters == [children.cut_children]:  # no family knows it, and it is not a plain chain either
            named = [n for n, _ in model.named_children()]
            why = str(first_error).split(": ", 1)[-1].split("; pass its parts")[0]
            raise ManppError(f"cannot cut {kind_of(model)} into units: it is not a torchvision or timm classifier manpp "
                             f"recognises (its modules: {', '.join(named)}), and {why}; {HOW_TO}") from first_error
        raise first_error
    return _checked(cut, in_channels, image_size, num_classes, x)


def _cut_with(cutter, model: nn.Module, x: torch.Tensor) -> Cut:
    try:
        return cutter(model, x)
    except ManppError:
        raise
    except (AttributeError, KeyError, TypeError, IndexError, ValueError) as exc:
        raise ManppError(f"cannot cut {kind_of(model)} into units: its structure is not the one manpp expected "
                         f"({type(exc).__name__}: {exc}); {HOW_TO}") from exc


def _checked(cut: Cut, in_channels: int, image_size: int, num_classes: int | None, x: torch.Tensor) -> WrappedBackbone:
    """The backbone of ``cut``, with its export keys, after the probe's checks."""
    backbone = WrappedBackbone([m for _, m, _ in cut.units], [n for n, _, _ in cut.units],
                               [s or 0 for _, _, s in cut.units], cut.head, arch=cut.arch, aux_family="imagenet",
                               num_classes=num_classes or 0, in_channels=in_channels, image_size=image_size)
    if cut.reference is not None:
        backbone.export_keys = export_keys(backbone, cut.reference, cut.label)
        backbone.__dict__["reference_"] = cut.reference  # the model itself (sharing these modules), not registered
    backbone.aux_family, shapes, out = probe(cut, backbone, x)
    if any(s is None for _, _, s in cut.units):
        backbone.unit_stages = stages_from_shapes(shapes)
    if num_classes is not None and int(num_classes) != out.shape[1]:
        raise ManppError(f"num_classes={num_classes} does not match the model, whose head gives {out.shape[1]} "
                         f"logits")
    backbone.num_classes = int(out.shape[1])
    return backbone
