"""Image classification: cross-entropy on the logits, accuracy."""

from __future__ import annotations

from typing import Any

import torch

from ..core.engine import LocalContext, cross_entropy_loss, evaluate
from .registry import register_task


class Task:
    name = "classification"
    metric = "accuracy"  # the key of evaluate()'s result that scores a run
    metric_label = "acc"  # the score in tables and progress lines
    metric_title = "accuracy"  # the score in sentences
    collate = None  # DataLoader collate_fn (None: the default)

    @classmethod
    def for_backbone(cls, backbone) -> "Task":
        """The task for ``backbone`` (dense tasks read their settings from it)."""
        return cls()

    def prepare(self, batch, device: torch.device, memory_format=torch.contiguous_format):
        inputs, targets = batch
        return (inputs.to(device, non_blocking=True, memory_format=memory_format),
                targets.to(device, non_blocking=True))

    def loss(self, output, ctx: LocalContext) -> torch.Tensor:
        return cross_entropy_loss(output, ctx)

    def train_hits(self, output, targets) -> torch.Tensor | None:
        """``[correct, count]`` of a training batch (float64), or None where it means nothing."""
        return torch.stack([(output.argmax(1) == targets).sum().double(),
                            torch.tensor(targets.numel(), dtype=torch.float64, device=targets.device)])

    def evaluate(self, model, batches, device, *, reduce: bool = False) -> dict[str, float]:
        return evaluate(model, batches, device, reduce=reduce)

    def example_batch(self, n: int, info, device) -> tuple[Any, Any]:
        """A batch of random data of the dataset's shape (for ``bench`` and ``describe``)."""
        g = torch.Generator().manual_seed(0)
        x = torch.randn(n, info.in_channels, info.image_size, info.image_size, generator=g)
        y = torch.randint(0, info.num_classes, (n,), generator=g)
        return self.prepare((x, y), device)


@register_task
class ClassificationTask(Task):
    """The task of every classifier (the base class's behaviour)."""
