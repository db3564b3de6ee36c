"""``manpp.wrap``: cut a ready-made torchvision classifier into units and make it a local model.

Recognised structures (the model's own modules are used, not copies, so training the wrapped
model trains ``model``):

- ResNet / ResNeXt / Wide ResNet (``conv1``, ``bn1``, ``relu``, ``maxpool``, ``layer1..4``, ``fc``):
  the stem, then every residual block;
- VGG, AlexNet, MobileNet, EfficientNet, ConvNeXt, RegNet-like models with ``features`` (or
  ``trunk_output``) + ``avgpool`` + ``classifier``/``fc``: every layer of ``features``, with the
  stages that are ``nn.Sequential`` of blocks opened into their blocks;
- VisionTransformer (``conv_proj``, ``class_token``, ``encoder.layers``, ``heads``): the embedding,
  then every encoder block.

Anything else is refused with an error naming the module that could not be cut.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from .errors import ManppError

# layers that are not worth a unit of their own: they join the unit before them
_LIGHT = (nn.ReLU, nn.ReLU6, nn.SiLU, nn.GELU, nn.Hardswish, nn.Dropout, nn.Identity, nn.BatchNorm2d, nn.LayerNorm,
          nn.MaxPool2d)


class WrappedBackbone(nn.Module):
    """Units, names, stages and head of a recognised model (see the module docstring)."""

    def __init__(self, units: Sequence[nn.Module], names: Sequence[str], stages: Sequence[int], head: nn.Module,
                 arch: str, family: str, num_classes: int, in_channels: int = 3):
        super().__init__()
        self.units = nn.ModuleList(units)
        self.unit_names, self.unit_stages = list(names), list(stages)
        self.head = head
        self.arch, self.aux_family = arch, family
        self.num_classes, self.in_channels = num_classes, in_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for unit in self.units:
            x = unit(x)
        return self.head(x)


class _PoolHead(nn.Module):
    """Global average pooling (or the model's own pool), flatten, the model's classifier."""

    def __init__(self, pool: nn.Module | None, classifier: nn.Module):
        super().__init__()
        self.pool = pool if pool is not None else nn.AdaptiveAvgPool2d(1)
        self.classifier = classifier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(x)
        first = next(iter(self.classifier.children()), self.classifier)
        if isinstance(first, (nn.Linear, nn.Dropout)):  # VGG, MobileNet, EfficientNet flatten first;
            x = torch.flatten(x, 1)  # ConvNeXt's classifier starts with a LayerNorm2d and a Flatten
        return self.classifier(x)


def _last_linear(module: nn.Module) -> nn.Linear:
    linears = [m for m in module.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ManppError(f"cannot find the final Linear layer in {type(module).__name__}")
    return linears[-1]


def _resnet(model: nn.Module):
    from .models.imagenet import _PoolLinear, resnet_units

    units, names, stages = resnet_units(model)
    return units, names, stages, _PoolLinear(model.fc), "imagenet", model.fc.out_features


def _features(model: nn.Module):
    features = getattr(model, "features", None)
    if features is None:
        features = getattr(model, "trunk_output")
    units, names, stages = [], [], []
    for i, (name, layer) in enumerate(features.named_children()):
        children = list(layer.named_children()) if isinstance(layer, nn.Sequential) else []
        blocks = [(f"{name}.{n}", c) for n, c in children] if len(children) > 1 and not all(
            isinstance(c, (nn.Conv2d, *_LIGHT)) for _, c in children) else [(str(name), layer)]
        for block_name, block in blocks:
            if units and isinstance(block, _LIGHT):  # an activation, norm or pool joins the unit before it
                units[-1] = nn.Sequential(units[-1], block)
                continue
            units.append(block)
            names.append(f"features.{block_name}")
            stages.append(i)
    classifier = getattr(model, "classifier", None) or getattr(model, "fc", None)
    if classifier is None:
        raise ManppError(f"cannot cut {type(model).__name__}: it has 'features' but no 'classifier' or 'fc'")
    pool = getattr(model, "avgpool", None)
    return units, names, stages, _PoolHead(pool, classifier), "imagenet", _last_linear(classifier).out_features


def _vit(model: nn.Module):
    from .models.imagenet import TokenHead, _ViTEmbed

    embed = _ViTEmbed(model.conv_proj, model.class_token, model.encoder.pos_embedding, model.encoder.dropout)
    layers = list(model.encoder.layers)
    units = [embed, *layers]
    names = ["embed"] + [f"encoder.layers.{i}" for i in range(len(layers))]
    head_linear = _last_linear(model.heads)
    if len(list(model.heads.children())) != 1:
        raise ManppError("cannot cut this VisionTransformer: its 'heads' has more than one layer (representation "
                         "layer); only the plain Linear head is supported")
    return units, names, [0] + [1] * len(layers), TokenHead(model.encoder.ln, head_linear), "vit", \
        head_linear.out_features


def cut(model: nn.Module):
    """``(units, names, stages, head, family, num_classes)`` of a recognised model, else a clear error."""
    kind = type(model).__name__
    if all(hasattr(model, a) for a in ("conv1", "bn1", "maxpool", "layer1", "layer4", "fc")):
        return _resnet(model)
    if all(hasattr(model, a) for a in ("conv_proj", "class_token", "encoder", "heads")):
        return _vit(model)
    if hasattr(model, "features") and isinstance(model.features, nn.Sequential):
        if kind.lower().startswith("swin"):
            raise ManppError(f"cannot cut {kind}: its stages output channels-last (B, H, W, C) maps, which the "
                             f"auxiliary heads do not read; supported are ResNets, VGG, MobileNet, EfficientNet, "
                             f"ConvNeXt and ViT")
        return _features(model)
    named = [n for n, _ in model.named_children()]
    raise ManppError(f"cannot cut {kind} into units: none of its modules ({', '.join(named) or 'none'}) is a "
                     f"recognised stage list (ResNet 'layer1..4', 'features', or a ViT 'encoder.layers')")


def wrap(model: nn.Module, k: int | None = 4, method: str = "manpp", objective: str = "dgl",
         split: str | Sequence = "even", *, image_size: int = 224, in_channels: int = 3, batch_size: int = 2,
         **options):
    """A :class:`~manpp.engine.LocalModel` training ``model`` (its own modules) with ``method`` in ``k``
    modules.

    ``split`` is ``"even"`` (equal unit counts), ``"memory"`` (modules of balanced activation memory,
    measured on one batch of ``batch_size`` random images of ``image_size``), or a list of module end
    units (names or indices). ``options`` go to :func:`manpp.local_model` (``ema_momentum``, ...).
    """
    from . import local_model

    units, names, stages, head, family, num_classes = cut(model)
    arch = type(model).__name__.lower()
    backbone = WrappedBackbone(units, names, stages, head, arch, family, num_classes, in_channels)
    if isinstance(split, str) and split == "memory":
        from .plan import unit_activation_bytes, balanced_ends

        per_unit = unit_activation_bytes(backbone, batch_size, in_channels, image_size)
        split = balanced_ends(per_unit, k) if k and k > 1 else "even"
    return local_model(backbone, method, k, split=split, objective=objective, image_size=image_size,
                       image_channels=in_channels, num_classes=num_classes, **options)
