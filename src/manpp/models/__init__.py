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

from ..errors import ManppError, choices
from .cifar_resnet import CifarResNet, cifar_resnet_depths
from .dense import DETECTORS, SEGMENTERS, DeepLabV3Backbone, RetinaNetBackbone
from .imagenet import RESNETS, VITS, TorchvisionResNet, TorchvisionViT
from .library import LIBRARIES, build_library_backbone, split_name

__all__ = ["CifarResNet", "DeepLabV3Backbone", "MODELS", "RetinaNetBackbone", "TorchvisionResNet", "TorchvisionViT",
           "build_backbone", "model_names", "model_task"]


def model_names() -> list[str]:
    """Model names ``build_backbone`` accepts (CIFAR ResNets take any depth 6n+2; ``timm/<name>`` and
    ``torchvision/<name>`` take any classifier of those libraries)."""
    cifar = [f"resnet{d}" for d in cifar_resnet_depths() if f"resnet{d}" not in RESNETS]
    return cifar + list(RESNETS) + list(VITS) + list(DETECTORS) + list(SEGMENTERS) + \
        [f"{library}/<name>" for library in LIBRARIES]


MODELS = tuple(model_names())


def model_task(name: str) -> str:
    """'detection', 'segmentation' or 'classification' (what the model named ``name`` does)."""
    key = str(name).lower()
    return "detection" if key in DETECTORS else "segmentation" if key in SEGMENTERS else "classification"


def build_backbone(name: str, *, num_classes: int = 10, in_channels: int = 3, image_size: int = 32,
                   anchor_base: int | None = None, pretrained: str | None = None):
    """Build a backbone by name.

    ``resnet<6n+2>`` (``resnet32``, ``resnet110``, ...) is a CIFAR ResNet, except the torchvision
    names ``resnet18/34/50/101/152``, which are the ImageNet ResNets; ``cifar_resnet<6n+2>`` is
    always the CIFAR one. ``resnext50_32x4d``, ``resnext101_32x8d``, ``wide_resnet50_2`` and
    ``vit_tiny``/``vit_small``/``vit_base`` (patch 16, depth 12, any image size divisible by 16)
    are ImageNet backbones. ``timm/<name>`` and ``torchvision/<name>`` build that library's classifier
    and cut it as :func:`manpp.wrap` does (:mod:`manpp.models.library`; ``pretrained``: its weights).
    """
    if split_name(name) is not None:  # timm/<name>, torchvision/<name>: the library's model, cut by wrap
        return build_library_backbone(name, num_classes=num_classes, in_channels=in_channels, image_size=image_size,
                                      pretrained=pretrained)
    key = str(name).lower()
    if key in DETECTORS:  # anchors 32..512 (the paper) at image sizes of 300 px and more; 8..128 below
        base = anchor_base or (32 if image_size >= 300 else 8)
        return RetinaNetBackbone(key, num_classes=num_classes, in_channels=in_channels, image_size=image_size,
                                 anchor_base=base)
    if key in SEGMENTERS:
        return DeepLabV3Backbone(key, num_classes=num_classes, in_channels=in_channels)
    if key in RESNETS:
        return TorchvisionResNet(key, num_classes=num_classes, in_channels=in_channels)
    if key in VITS:
        return TorchvisionViT(key, num_classes=num_classes, in_channels=in_channels, image_size=image_size)
    cifar = key[len("cifar_"):] if key.startswith("cifar_") else key
    if cifar.startswith("resnet") and cifar[6:].isdigit():
        depth = int(cifar[6:])
        if (depth - 2) % 6 == 0 and depth >= 8:
            return CifarResNet(depth, num_classes=num_classes, in_channels=in_channels)
    raise ManppError(
        f"unknown model '{name}': accepted are CIFAR ResNets 'resnet<6n+2>' such as "
        f"{choices(['resnet20', 'resnet32', 'resnet56', 'resnet110'])} (also as 'cifar_resnet<6n+2>'), "
        f"ImageNet {choices(list(RESNETS))} and {choices(list(VITS))}, detection {choices(list(DETECTORS))}, "
        f"segmentation {choices(list(SEGMENTERS))}, or any classifier as timm/<name> or torchvision/<name>"
    )
