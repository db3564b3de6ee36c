"""The auxiliary head of a detection module: a one-level RetinaNet head with the detector's loss."""

from __future__ import annotations

import torch
from torch import nn

from ..models.dense import FPN_CHANNELS, anchor_sizes, retinanet_parts, retinanet_subnets


class DetectionHead(nn.Module):
    """The release's auxiliary detection head (docs/release.md: auxiliary heads).

    A 1x1 projection to 256 channels + ReLU gives the first level; each extra level is ReLU then
    a stride-2 3x3 conv. RetinaNet classification and box subnets with two conv layers run on
    these levels, with anchors of ``anchor_base * stride / 8`` (32 at stride 8 in the paper), and
    the loss is the detector's focal + smooth-L1 loss restricted to these anchors.
    """

    def __init__(self, channels: int, stride: int, num_classes: int, task, extra_levels: int = 0):
        super().__init__()
        self.project = nn.Sequential(nn.Conv2d(channels, FPN_CHANNELS, 1), nn.ReLU(inplace=True))
        self.extra = nn.ModuleList(nn.Sequential(nn.ReLU(), nn.Conv2d(FPN_CHANNELS, FPN_CHANNELS, 3, 2, 1))
                                   for _ in range(extra_levels))
        self.subnets = retinanet_subnets(num_classes, convs=2)
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
