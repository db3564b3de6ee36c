"""Backbones that expose their ordered units.

A backbone for manpp is an ``nn.Module`` with:

- ``units``: an ``nn.ModuleList`` of the units in forward order (stem, residual blocks, ...);
- ``unit_names``: one name per unit (``"stem"``, ``"layer1.0"``, ...);
- ``unit_stages``: the stage index of each unit (0 for the stem), used by the paper presets;
- ``head``: the task head that turns the last unit's output into logits;
- ``forward(x)``: ``head(units(x))``, the plain network;
- optionally ``aux_family`` (``"cifar"``, ``"imagenet"`` or ``"vit"``: which auxiliary heads
  fit its features) and ``export_state_dict()`` (the weights under the plain model's names).

``build_backbone(name, ...)`` builds one by name.
"""

from __future__ import annotations

from . import cifar_resnet, dense, imagenet, library  # noqa: F401  (each registers its backbones)
from .cifar_resnet import CifarResNet
from .dense import DeepLabV3Backbone, RetinaNetBackbone
from .registry import BACKBONES, Backbone, register_backbone

__all__ = ["BACKBONES", "Backbone", "CifarResNet", "DeepLabV3Backbone", "MODELS", "RetinaNetBackbone",
           "build_backbone", "model_names", "model_task", "register_backbone"]


def model_names() -> list[str]:
    """Model names ``build_backbone`` accepts, patterns included (``resnet<6n+2>``, ``<library>/<name>``)."""
    return BACKBONES.names()


MODELS = tuple(model_names())


def model_task(name: str) -> str:
    """'detection', 'segmentation' or 'classification' (what the model named ``name`` does)."""
    return BACKBONES.find(name).task


def build_backbone(name: str, *, num_classes: int = 10, in_channels: int = 3, image_size: int = 32,
                   anchor_base: int | None = None, pretrained: str | None = None):
    """Build a registered backbone by name (:mod:`manpp.models.registry`).

    ``resnet<6n+2>`` (``resnet32``, ``resnet110``, ...) is a CIFAR ResNet, except the torchvision
    names ``resnet18/34/50/101/152``, which are the ImageNet ResNets; ``cifar_resnet<6n+2>`` is
    always the CIFAR one. ``resnext50_32x4d``, ``resnext101_32x8d``, ``wide_resnet50_2`` and
    ``vit_tiny``/``vit_small``/``vit_base`` (patch 16, depth 12, any image size divisible by 16)
    are ImageNet backbones. ``timm/<name>`` and ``torchvision/<name>`` build that library's classifier
    and cut it as :func:`manpp.wrap` does (:mod:`manpp.models.library`; ``pretrained``: its weights).
    """
    entry = BACKBONES.find(name)
    return entry.build(str(name).strip() if entry.matches is not None else entry.name, num_classes=num_classes,
                       in_channels=in_channels, image_size=image_size, anchor_base=anchor_base, pretrained=pretrained)
