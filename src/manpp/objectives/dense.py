"""Auxiliary heads for dense tasks: a light segmentation head and a one-level RetinaNet head."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class SegmentationHead(nn.Module):
    """3x3 conv-BN-ReLU to ``width`` channels, 1x1 conv to the classes; pixel cross-entropy on the
    logits upsampled to the mask (``ignore_index`` left out)."""

    def __init__(self, channels: int, num_classes: int, width: int = 256, ignore_index: int = 255):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width),
                                  nn.ReLU(inplace=True), nn.Conv2d(width, num_classes, 1))
        self.ignore_index = ignore_index

    def forward(self, x: torch.Tensor, ctx) -> torch.Tensor:
        from ..tasks import pixel_cross_entropy

        logits = F.interpolate(self.body(x), size=ctx.targets.shape[-2:], mode="bilinear", align_corners=False)
        return pixel_cross_entropy(logits, ctx.targets, self.ignore_index)


class DetectionHead(nn.Module):
    """The release's auxiliary detection head (RELEASE.md section 2.5).

    A 1x1 projection to 256 channels + ReLU gives the first level; each extra level is ReLU then
    a stride-2 3x3 conv. RetinaNet classification and box subnets with two conv layers run on
    these levels, with anchors of ``anchor_base * stride / 8`` (32 at stride 8 in the paper), and
    the loss is the detector's focal + smooth-L1 loss restricted to these anchors.
    """

    def __init__(self, channels: int, stride: int, num_classes: int, task, extra_levels: int = 0):
        super().__init__()
        from ..models.dense import FPN_CHANNELS, _subnets, anchor_sizes, retinanet_parts

        self.project = nn.Sequential(nn.Conv2d(channels, FPN_CHANNELS, 1), nn.ReLU(inplace=True))
        self.extra = nn.ModuleList(nn.Sequential(nn.ReLU(), nn.Conv2d(FPN_CHANNELS, FPN_CHANNELS, 3, 2, 1))
                                   for _ in range(extra_levels))
        self.subnets = _subnets(num_classes, convs=2)
        strides = [stride * 2 ** i for i in range(1 + extra_levels)]
        parts = retinanet_parts(self.subnets, num_classes, anchor_sizes(task.anchor_base, strides), None, None)
        object.__setattr__(self, "parts", parts)  # matcher, anchors and loss; shares self.subnets
        object.__setattr__(self, "task", task)

    def forward(self, x: torch.Tensor, ctx) -> torch.Tensor:
        levels = [self.project(x)]
        for extra in self.extra:
            levels.append(extra(levels[-1]))
        out = self.subnets(levels)
        anchors = self.task.anchors(ctx.inputs, ctx.targets.image_sizes, levels, self.parts.anchor_generator)
        losses = self.parts.compute_loss(ctx.targets.boxes, {k: v.float() for k, v in out.items()}, anchors)
        return losses["classification"] + losses["bbox_regression"]
