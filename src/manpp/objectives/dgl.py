"""DGL's local classifier as configured in the MAN++ release (RELEASE.md section 2.2), and the
class-token classifier that plays its part on ViTs (RELEASE.md sections 1.3 and 2.4)."""

from __future__ import annotations

import copy

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


class TokenHead(nn.Module):
    """ViT auxiliary head: [learnable copy of a block], LayerNorm, class token, Linear, cross-entropy.

    For MAN/MAN++ the release puts a learnable copy of the block after the copied one here (its
    second LB block); ``block`` is copied, not shared.
    """

    def __init__(self, width: int, num_classes: int, block: nn.Module | None = None):
        super().__init__()
        self.block = copy.deepcopy(block) if block is not None else None
        self.ln = nn.LayerNorm(width, eps=1e-6)
        self.fc = nn.Linear(width, num_classes)
        nn.init.trunc_normal_(self.fc.weight, std=0.02)
        nn.init.zeros_(self.fc.bias)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        if self.block is not None:
            x = self.block(x)
        return self.fc(self.ln(x)[:, 0])

    def forward(self, x: torch.Tensor, ctx) -> torch.Tensor:
        return F.cross_entropy(self.logits(x).float(), ctx.targets)
