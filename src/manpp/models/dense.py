"""Backbones for dense tasks, exposed as units like the classifiers.

- ``retinanet_resnet50/101/152`` (and the lighter ``retinanet_resnet18/34``): RetinaNet
  (docs/method.md, paper settings; docs/release.md: auxiliary heads). Units are the ResNet stem
  and residual blocks; they pass ``(current, C3, C4)`` tuples along, the last block of ``layer2`` and of ``layer3`` keeping its output. The head is the FPN (P3-P5 from
  C3-C5, P6 from C5, P7 from P6) and torchvision's RetinaNet classification and box subnets.
  Across a module boundary C3 and C4 are detached with everything else, so, as in the release,
  the detection loss trains ``layer4`` + FPN + heads and earlier modules learn from their
  auxiliary detection heads only. The paper's K = 4: stem+layer1 | layer2 | layer3 | layer4+FPN+heads.
- ``deeplabv3_resnet50/101``: DeepLabV3 on a dilated ResNet (output stride 8), units as above;
  the head is torchvision's ASPP head and gives stride-8 logits (the plain forward upsamples
  them to the input size).

Both keep torchvision's modules and parameter names under a prefix mapping, so
``export_state_dict()`` loads into ``torchvision.models.detection.retinanet_resnet50_fpn``-style
models (our FPN takes P6 from C5, so torchvision's ``RetinaNet`` with this backbone) and
``torchvision.models.segmentation.deeplabv3_resnet50``.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn
from torch.nn import functional as F

from .chain import UnitChain
from .imagenet import PlainStateDict, resnet_reinit, resnet_units, resnet_units_count, torchvision_resnet
from .registry import register_backbone

DETECTORS = ("retinanet_resnet18", "retinanet_resnet34", "retinanet_resnet50", "retinanet_resnet101",
             "retinanet_resnet152")
SEGMENTERS = ("deeplabv3_resnet50", "deeplabv3_resnet101")
FPN_CHANNELS = 256
ANCHOR_RATIOS = (0.5, 1.0, 2.0)
ANCHOR_SCALES = (1.0, 2 ** (1 / 3), 2 ** (2 / 3))


def anchor_sizes(base: int, strides) -> tuple[tuple[int, ...], ...]:
    """Anchor sizes per level: ``base * stride / 8`` times the three scales (base 32: 32 ... 512)."""
    return tuple(tuple(int(round(base * s / 8 * scale)) for scale in ANCHOR_SCALES) for s in strides)


def retinanet_parts(head: nn.Module, num_classes: int, sizes, image_size: int | None, max_size: int | None):
    """torchvision's RetinaNet around ``head`` (no backbone of its own): its transform, anchor
    generator, matcher, loss and post-processing, used by the detection task and the auxiliary
    heads. Regression uses smooth-L1 (beta 1) as the release."""
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.retinanet import RetinaNet

    stub = nn.Module()
    stub.out_channels = FPN_CHANNELS
    anchors = AnchorGenerator(sizes, (ANCHOR_RATIOS,) * len(sizes))
    min_size = image_size or 600
    detector = RetinaNet(stub, num_classes, min_size=min_size, max_size=max_size or max(1000, min_size),
                         anchor_generator=anchors, head=head, detections_per_img=100)
    head.regression_head._loss_type = "smooth_l1"
    return detector


def retinanet_subnets(num_classes: int, convs: int = 4) -> nn.Module:
    from torchvision.models.detection.retinanet import RetinaNetHead

    head = RetinaNetHead(FPN_CHANNELS, len(ANCHOR_RATIOS) * len(ANCHOR_SCALES), num_classes)
    if convs != 4:  # the auxiliary heads use 2 conv layers per subnet (--aux-head-convs 2 in the release)
        head.classification_head.conv = head.classification_head.conv[:convs]
        head.regression_head.conv = head.regression_head.conv[:convs]
    return head


class PyramidUnit(nn.Module):
    """A stem or residual block on ``(current, kept...)``; with ``keep`` its output is also kept."""

    def __init__(self, block: nn.Module, keep: bool = False):
        super().__init__()
        self.block, self.keep = block, keep

    def forward(self, p):
        p = (p,) if isinstance(p, torch.Tensor) else tuple(p)
        y = self.block(p[0])
        return (y, *p[1:], y) if self.keep else (y, *p[1:])


class RetinaTop(nn.Module):
    """FPN on (C5, C3, C4) and the RetinaNet subnets; returns head outputs and the pyramid."""

    def __init__(self, in_channels: list[int], num_classes: int):
        super().__init__()
        from torchvision.ops.feature_pyramid_network import FeaturePyramidNetwork, LastLevelP6P7

        self.fpn = FeaturePyramidNetwork(in_channels, FPN_CHANNELS, extra_blocks=LastLevelP6P7(in_channels[-1],
                                                                                              FPN_CHANNELS))
        self.head = retinanet_subnets(num_classes)

    def forward(self, p) -> dict:
        c5, c3, c4 = p
        features = list(self.fpn(OrderedDict([("c3", c3), ("c4", c4), ("c5", c5)])).values())
        return {**self.head(features), "features": features}


def _width(block: nn.Module) -> int:
    """Output channels of a torchvision residual block (Bottleneck or BasicBlock)."""
    last = getattr(block, "bn3", None) or block.bn2
    return last.num_features


class RetinaNetBackbone(PlainStateDict, UnitChain):
    """RetinaNet with a ResNet + FPN backbone, cut into units (see the module docstring)."""

    aux_family = "detection"
    task_name = "detection"  # the task (manpp.tasks) reads ``detector`` and ``anchor_base`` from here

    def __init__(self, arch: str = "retinanet_resnet50", num_classes: int = 80, in_channels: int = 3,
                 image_size: int | None = None, anchor_base: int = 32, max_size: int | None = None):
        super().__init__()
        resnet = arch.split("_", 1)[1]
        units, self.unit_names, self.unit_stages = resnet_units(torchvision_resnet(resnet, 1, in_channels))
        last = {s: max(i for i, st in enumerate(self.unit_stages) if st == s) for s in (2, 3)}
        self.units = nn.ModuleList(PyramidUnit(u, keep=i in last.values()) for i, u in enumerate(units))
        widths = [_width(units[last[2]]), _width(units[last[3]]), _width(units[-1])]
        self.head = RetinaTop(widths, num_classes)
        self.arch, self.resnet, self.num_classes, self.anchor_base = arch, resnet, num_classes, anchor_base
        self.in_channels = in_channels
        self.strides = (8, 16, 32, 64, 128)
        detector = retinanet_parts(self.head.head, num_classes, anchor_sizes(anchor_base, self.strides),
                                   image_size, max_size)
        object.__setattr__(self, "detector", detector)  # shares the head's modules; not registered twice

    def reinit_(self, module: nn.Module) -> None:
        resnet_reinit(module)

    def _plain_prefixes(self) -> list[tuple[str, str]]:
        # torchvision's RetinaNet(backbone=resnet_fpn_backbone(...)) names
        pairs = [("units.0.block.0.", "backbone.body.conv1."), ("units.0.block.1.", "backbone.body.bn1."),
                 ("head.fpn.", "backbone.fpn."), ("head.head.", "head.")]
        pairs += [(f"units.{i}.block.", f"backbone.body.{name}.") for i, name in enumerate(self.unit_names) if i > 0]
        return pairs

    def _make_plain(self) -> nn.Module:
        """torchvision's ``RetinaNet`` on ``resnet_fpn_backbone`` (P6 from C5, as here)."""
        import torchvision
        from torchvision.models.detection.backbone_utils import BackboneWithFPN
        from torchvision.ops.feature_pyramid_network import LastLevelP6P7

        body = getattr(torchvision.models, self.resnet)(weights=None)
        widths = [_width(body.layer2[-1]), _width(body.layer3[-1]), _width(body.layer4[-1])]
        fpn = BackboneWithFPN(body, {"layer2": "0", "layer3": "1", "layer4": "2"}, widths, FPN_CHANNELS,
                              extra_blocks=LastLevelP6P7(widths[-1], FPN_CHANNELS))
        det = self.detector
        return torchvision.models.detection.RetinaNet(
            fpn, self.num_classes, min_size=det.transform.min_size, max_size=det.transform.max_size,
            anchor_generator=det.anchor_generator, head=retinanet_subnets(self.num_classes))


class DeepLabV3Backbone(PlainStateDict, UnitChain):
    """DeepLabV3 on a dilated ResNet (strides of layer3 and layer4 replaced by dilation)."""

    aux_family = "segmentation"
    task_name = "segmentation"

    def __init__(self, arch: str = "deeplabv3_resnet50", num_classes: int = 19, in_channels: int = 3,
                 ignore_index: int = 255):
        super().__init__()
        from torchvision.models.segmentation.deeplabv3 import DeepLabHead

        resnet = arch.split("_", 1)[1]
        units, self.unit_names, self.unit_stages = resnet_units(
            torchvision_resnet(resnet, 1, in_channels, replace_stride_with_dilation=[False, True, True]))
        self.units = nn.ModuleList(units)
        self.head = DeepLabHead(_width(units[-1]), num_classes)
        self.arch, self.resnet, self.num_classes, self.in_channels = arch, resnet, num_classes, in_channels
        self.ignore_index = ignore_index

    def reinit_(self, module: nn.Module) -> None:
        resnet_reinit(module)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(self.head(self.run_units(x)), size=x.shape[-2:], mode="bilinear", align_corners=False)

    def _plain_prefixes(self) -> list[tuple[str, str]]:
        pairs = [("units.0.0.", "backbone.conv1."), ("units.0.1.", "backbone.bn1."), ("head.", "classifier.")]
        pairs += [(f"units.{i}.", f"backbone.{name}.") for i, name in enumerate(self.unit_names) if i > 0]
        return pairs

    def _make_plain(self) -> nn.Module:
        import torchvision

        builder = getattr(torchvision.models.segmentation, self.arch)
        net = builder(weights=None, weights_backbone=None, num_classes=self.num_classes, aux_loss=False)
        if self.in_channels != 3:
            net.backbone.conv1 = nn.Conv2d(self.in_channels, 64, 7, 2, 3, bias=False)
        return net


@register_backbone(*DETECTORS, family="detection", task="detection", units=resnet_units_count,
                   export=lambda *_: "torchvision.models.detection.RetinaNet (ResNet-FPN body, P6 from C5; see the "
                                     "README)")
def build_retinanet(name: str, *, num_classes: int = 80, in_channels: int = 3, image_size: int = 600,
                    anchor_base: int | None = None, **_) -> RetinaNetBackbone:
    """Anchors 32..512 (the paper) at image sizes of 300 px and more; 8..128 below."""
    base = anchor_base or (32 if image_size >= 300 else 8)
    return RetinaNetBackbone(name, num_classes=num_classes, in_channels=in_channels, image_size=image_size,
                             anchor_base=base)


@register_backbone(*SEGMENTERS, family="segmentation", task="segmentation", units=resnet_units_count,
                   export=lambda name, *_: f"torchvision.models.segmentation.{name}(aux_loss=False)")
def build_deeplabv3(name: str, *, num_classes: int = 19, in_channels: int = 3, **_) -> DeepLabV3Backbone:
    return DeepLabV3Backbone(name, num_classes=num_classes, in_channels=in_channels)
