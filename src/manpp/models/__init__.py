"""Backbones that expose their ordered units.

A backbone for manpp is an ``nn.Module`` with:

- ``units``: an ``nn.ModuleList`` of the units in forward order (stem, residual blocks, ...);
- ``unit_names``: one name per unit (``"stem"``, ``"layer1.0"``, ...);
- ``unit_stages``: the stage index of each unit (0 for the stem), used by the paper presets;
- ``head``: the task head that turns the last unit's output into logits;
- ``forward(x)``: ``head(units(x))``, the plain network.

``build_backbone(name, ...)`` builds one by name.
"""

from __future__ import annotations

from ..errors import ManppError, choices
from .cifar_resnet import CifarResNet, cifar_resnet_depths

__all__ = ["CifarResNet", "MODELS", "build_backbone", "model_names"]


def model_names() -> list[str]:
    """Every model name ``build_backbone`` accepts."""
    return [f"resnet{d}" for d in cifar_resnet_depths()]


MODELS = tuple(model_names())


def build_backbone(name: str, *, num_classes: int = 10, in_channels: int = 3):
    """Build a backbone by name, e.g. ``resnet32`` or ``resnet110`` (any CIFAR depth 6n+2)."""
    key = name.lower()
    if key.startswith("resnet") and key[6:].isdigit():
        depth = int(key[6:])
        if (depth - 2) % 6 == 0 and depth >= 8:
            return CifarResNet(depth, num_classes=num_classes, in_channels=in_channels)
    raise ManppError(
        f"unknown model '{name}': accepted are CIFAR ResNets 'resnet<6n+2>' such as "
        f"{choices(['resnet20', 'resnet32', 'resnet56', 'resnet110'])}"
    )
