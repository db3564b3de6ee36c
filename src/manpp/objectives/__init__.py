"""Local objectives: the auxiliary networks that train a module from its own output.

An objective is an ``nn.Module`` whose ``forward(features, ctx)`` returns a scalar loss,
where ``ctx`` is a :class:`LocalContext` (targets, and the un-normalised image for
reconstruction losses). ``build_objective(name, spec, cfg)`` makes one for a module.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..errors import ManppError, choices


@dataclass
class LocalContext:
    """What a local loss may look at besides the features: the batch's targets and image."""

    inputs: torch.Tensor
    targets: torch.Tensor
    denormalize: Callable[[torch.Tensor], torch.Tensor] | None = None
    _image01: torch.Tensor | None = None

    @property
    def image01(self) -> torch.Tensor:
        """The un-normalised input in [0, 1] (InfoPro's reconstruction target), computed once."""
        if self._image01 is None:
            x = self.inputs.detach()
            self._image01 = (self.denormalize(x) if self.denormalize else x).clamp(0, 1)
        return self._image01


@dataclass(frozen=True)
class AuxSpec:
    """Where an auxiliary network sits: the feature it reads and the module it trains."""

    channels: int
    size: int  # spatial side of the feature map
    stage: int  # stage index of the unit that produced the feature (for the release's lambda schedule)
    index: int  # module j (0-based)
    num_modules: int  # true K
    nominal_k: int  # K of the paper preset (the release's "K"), else the true K
    num_classes: int
    image_channels: int
    image_size: int
    family: str = "cifar"  # the backbone's head family: 'cifar', 'imagenet' (InfoPro heads) or 'vit' (tokens)


@dataclass
class ObjectiveConfig:
    """Settings of the local heads; defaults are the paper's CIFAR settings."""

    aux_config: str = "2c2f"  # InfoPro classifier: '1c2f' or '2c2f'
    aux_loss: str = "cross_entropy"  # InfoPro classifier loss: 'cross_entropy' or 'contrast' (SupCon)
    feature_dim: int = 128  # F of the InfoPro and DGL heads
    widen: int = 1
    ixx_1: float = 5.0
    ixy_1: float = 0.5
    ixx_2: float = 0.0
    ixy_2: float = 0.0
    lambda_schedule: str = "auto"  # 'module' (InfoPro), 'stage' (MAN/MAN++ release) or 'auto'


def build_objective(name: str, spec: AuxSpec, cfg: ObjectiveConfig, *, momentum: bool = False,
                    next_unit=None, task=None):
    """The auxiliary head ``name`` ('dgl' or 'infopro') for the module described by ``spec``.

    On ViTs (``spec.family == 'vit'``) the head is a classifier on the class token; ``next_unit``
    (MAN/MAN++: the block after the copied one) adds a learnable copy of it first, as the release.
    """
    from .dgl import DGLHead, TokenHead
    from .infopro import InfoProHead

    if spec.family == "vit":
        if name != "dgl":
            raise ManppError(f"objective '{name}' needs convolutional feature maps; on a ViT use objective 'dgl' "
                             f"(a class-token classifier, the release's ViT head)")
        return TokenHead(spec.channels, spec.num_classes, next_unit)
    if spec.family in ("segmentation", "detection"):
        from .dense import DetectionHead, SegmentationHead

        if name != "dgl":
            raise ManppError(f"objective '{name}' is for classifiers; on a {spec.family} model use objective 'dgl' "
                             f"(the task's own light head, as the release's COCO code)")
        if spec.family == "segmentation":
            return SegmentationHead(spec.channels, spec.num_classes, ignore_index=task.ignore_index)
        stride = max(1, spec.image_size // max(1, spec.size))
        # the module reading stride-32 features also covers the P6 and P7 anchors (the release's block 2)
        return DetectionHead(spec.channels, stride, spec.num_classes, task, extra_levels=2 if stride >= 32 else 0)
    if name == "dgl":
        return DGLHead(spec.channels, spec.num_classes, cfg.feature_dim)
    if name == "infopro":
        return InfoProHead.from_spec(spec, cfg, momentum=momentum)
    raise ManppError(f"unknown objective '{name}': accepted are {choices(OBJECTIVES)}")


OBJECTIVES = ("dgl", "infopro")


def task_loss(logits: torch.Tensor, ctx: LocalContext) -> torch.Tensor:
    """The last module's loss: cross-entropy on the backbone's logits."""
    return torch.nn.functional.cross_entropy(logits, ctx.targets)
