"""Semantic segmentation: per-pixel cross-entropy, mIoU."""

from __future__ import annotations

import torch
from torch.nn import functional as F

from ..base import distributed
from ..core.engine import LocalContext
from ..data import IGNORE_INDEX
from .classification import Task
from .registry import register_task


@register_task
class SegmentationTask(Task):
    """Per-pixel cross-entropy (``ignore_index`` ignored) on logits upsampled to the mask; mIoU."""

    name = "segmentation"
    metric = "miou"
    metric_label = "mIoU"
    metric_title = "mIoU"

    def __init__(self, num_classes: int, ignore_index: int = IGNORE_INDEX):
        self.num_classes, self.ignore_index = num_classes, ignore_index

    @classmethod
    def for_backbone(cls, backbone) -> "SegmentationTask":
        return cls(backbone.num_classes, getattr(backbone, "ignore_index", IGNORE_INDEX))

    def upsample(self, logits: torch.Tensor, size) -> torch.Tensor:
        if logits.shape[-2:] == tuple(size):
            return logits
        return F.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=False)

    def loss(self, output, ctx: LocalContext) -> torch.Tensor:
        return pixel_cross_entropy(self.upsample(output, ctx.targets.shape[-2:]), ctx.targets, self.ignore_index)

    def train_hits(self, output, targets):
        pred = self.upsample(output, targets.shape[-2:]).argmax(1)
        valid = targets != self.ignore_index
        return torch.stack([((pred == targets) & valid).sum().double(), valid.sum().double()])

    @torch.no_grad()
    def evaluate(self, model, batches, device, *, reduce: bool = False) -> dict[str, float]:
        was_training = model.training
        model.eval()
        confusion = torch.zeros(self.num_classes, self.num_classes, dtype=torch.float64, device=device)
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        amp = getattr(model, "amp_dtype", None)
        for batch in batches:
            inputs, targets = self.prepare(batch, device)
            with torch.autocast(inputs.device.type, dtype=amp, enabled=amp is not None):
                logits = self.upsample(model(inputs), targets.shape[-2:]).float()
            loss_sum += F.cross_entropy(logits, targets, ignore_index=self.ignore_index, reduction="sum").double()
            confusion += confusion_matrix(logits.argmax(1), targets, self.num_classes, self.ignore_index)
        model.train(was_training)
        if reduce:
            confusion = distributed.all_reduce_sum(confusion)
            loss_sum = distributed.all_reduce_sum(loss_sum)
        return segmentation_metrics(confusion.cpu(), float(loss_sum))

    def example_batch(self, n: int, info, device):
        g = torch.Generator().manual_seed(0)
        x = torch.randn(n, info.in_channels, info.image_size, info.image_size, generator=g)
        y = torch.randint(0, self.num_classes, (n, info.image_size, info.image_size), generator=g)
        return self.prepare((x, y), device)


def pixel_cross_entropy(logits: torch.Tensor, target: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Mean cross-entropy over the pixels that are not ``ignore_index``; 0 (not NaN) when a batch has none."""
    total = F.cross_entropy(logits.float(), target, ignore_index=ignore_index, reduction="sum")
    return total / (target != ignore_index).sum().clamp(min=1)


def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int, ignore_index: int = IGNORE_INDEX):
    """``m[t, p]``: number of pixels of true class t predicted as p (ignored pixels left out)."""
    valid = target != ignore_index
    idx = target[valid].long() * num_classes + pred[valid].long()
    return torch.bincount(idx, minlength=num_classes ** 2).reshape(num_classes, num_classes).double()


def segmentation_metrics(confusion: torch.Tensor, loss_sum: float = 0.0) -> dict[str, float]:
    """mIoU over the classes present in the ground truth or the prediction, per-class IoU, pixel accuracy."""
    tp = confusion.diag()
    union = confusion.sum(0) + confusion.sum(1) - tp
    iou = tp / union.clamp(min=1)
    seen = union > 0
    total = float(confusion.sum())
    out = {"miou": float(iou[seen].mean()) if seen.any() else 0.0,
           "pixel_accuracy": float(tp.sum()) / max(total, 1.0), "loss": loss_sum / max(total, 1.0)}
    out.update({f"iou_{c}": float(iou[c]) if seen[c] else float("nan") for c in range(len(iou))})
    return out
