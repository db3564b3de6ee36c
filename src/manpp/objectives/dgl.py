"""DGL's local classifier as configured in the MAN++ release (RELEASE.md section 2.2)."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from ..models.cifar_resnet import init_weights


def _conv_bn_relu(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


def _fc_bn_relu(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Linear(cin, cout), nn.BatchNorm1d(cout), nn.ReLU(inplace=True)]


class DGLHead(nn.Module):
    """Pool to 8x8, three 1x1 conv-BN-ReLU to F, GAP, three Linear-BN-ReLU of width 4F, Linear."""

    def __init__(self, channels: int, num_classes: int, feature_dim: int = 128):
        super().__init__()
        f = feature_dim
        self.convs = nn.Sequential(*_conv_bn_relu(channels, f), *_conv_bn_relu(f, f), *_conv_bn_relu(f, f))
        self.mlp = nn.Sequential(*_fc_bn_relu(f, 4 * f), *_fc_bn_relu(4 * f, 4 * f), *_fc_bn_relu(4 * f, 4 * f))
        self.fc = nn.Linear(4 * f, num_classes)
        init_weights(self.convs)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        x = self.convs(F.adaptive_avg_pool2d(x, 8))
        return self.fc(self.mlp(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)))

    def forward(self, x: torch.Tensor, ctx) -> torch.Tensor:
        return F.cross_entropy(self.logits(x), ctx.targets)
