"""The auxiliary head of a segmentation module: a light per-pixel classifier."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from ..data import IGNORE_INDEX
from ..tasks.segmentation import pixel_cross_entropy


class SegmentationHead(nn.Module):
    """3x3 conv-BN-ReLU to ``width`` channels, 1x1 conv to the classes; pixel cross-entropy on the
    logits upsampled to the mask (``ignore_index`` left out)."""

    def __init__(self, channels: int, num_classes: int, width: int = 256, ignore_index: int = IGNORE_INDEX):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width),
                                  nn.ReLU(inplace=True), nn.Conv2d(width, num_classes, 1))
        self.ignore_index = ignore_index

    def forward(self, x: torch.Tensor, ctx) -> torch.Tensor:
        logits = F.interpolate(self.body(x), size=ctx.targets.shape[-2:], mode="bilinear", align_corners=False)
        return pixel_cross_entropy(logits, ctx.targets, self.ignore_index)
