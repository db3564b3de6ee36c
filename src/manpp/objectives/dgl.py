"""DGL's local classifier as configured in the MAN++ release (docs/release.md: auxiliary heads).

On backbones whose features are not plain CIFAR/ImageNet maps the same idea, a small supervised
head per module, takes the shape the release gives it: the class-token classifier on a ViT
(:mod:`.vit`), the one-level RetinaNet head on a detector (:mod:`.detection`) and a light
segmentation head on a segmenter (:mod:`.segmentation`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from ..base.registry import register_objective
from ..base.settings import setting
from ..models.cifar_resnet import init_weights
from .detection import DetectionHead
from .layers import conv_bn_relu
from .segmentation import SegmentationHead
from .spec import FEATURE_DIM
from .vit import TokenHead


@dataclass
class DGLSettings:
    feature_dim: int = setting(FEATURE_DIM, help="F, the width of the 1x1 convolutions (the MLP is 4F wide)")


def _fc_bn_relu(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Linear(cin, cout), nn.BatchNorm1d(cout), nn.ReLU(inplace=True)]


class DGLHead(nn.Module):
    """Pool to 8x8, three 1x1 conv-BN-ReLU to F, GAP, three Linear-BN-ReLU of width 4F, Linear."""

    def __init__(self, channels: int, num_classes: int, feature_dim: int = FEATURE_DIM):
        super().__init__()
        f = feature_dim
        self.convs = nn.Sequential(*conv_bn_relu(channels, f), *conv_bn_relu(f, f), *conv_bn_relu(f, f))
        self.mlp = nn.Sequential(*_fc_bn_relu(f, 4 * f), *_fc_bn_relu(4 * f, 4 * f), *_fc_bn_relu(4 * f, 4 * f))
        self.fc = nn.Linear(4 * f, num_classes)
        init_weights(self.convs)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        x = self.convs(F.adaptive_avg_pool2d(x, 8))
        return self.fc(self.mlp(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)))

    def forward(self, x: torch.Tensor, ctx) -> torch.Tensor:
        return F.cross_entropy(self.logits(x), ctx.targets)


@register_objective("dgl", settings=DGLSettings, families=("cifar", "imagenet", "vit", "detection", "segmentation"),
                    default_for=("vit", "detection", "segmentation"),
                    summary="DGL: a small classifier per module (the task's light head on ViTs and dense models)")
def build(spec, settings: DGLSettings, *, next_unit=None, task=None, **_) -> nn.Module:
    if spec.family == "vit":  # MAN/MAN++: ``next_unit`` is the release's second learnable block
        return TokenHead(spec.channels, spec.num_classes, next_unit)
    if spec.family == "segmentation":
        return SegmentationHead(spec.channels, spec.num_classes, ignore_index=task.ignore_index)
    if spec.family == "detection":
        stride = max(1, spec.image_size // max(1, spec.size))
        # the module reading stride-32 features also covers the P6 and P7 anchors (the release's block 2)
        return DetectionHead(spec.channels, stride, spec.num_classes, task, extra_levels=2 if stride >= 32 else 0)
    return DGLHead(spec.channels, spec.num_classes, settings.feature_dim)
