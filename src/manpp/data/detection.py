"""Detection items ``(image, target)``: mirroring their boxes and batching them.

``target = {"boxes": float32 (m, 4) xyxy, "labels": int64 (m,), "image_id": int}``.
"""

from __future__ import annotations

from typing import Any, Sequence

from torch import Tensor


def flip_boxes(boxes: Tensor, width: int) -> Tensor:
    """Mirror xyxy boxes of an image ``width`` pixels wide."""
    flipped = boxes.clone()
    flipped[:, 0] = width - boxes[:, 2]
    flipped[:, 2] = width - boxes[:, 0]
    return flipped


def detection_collate(batch: Sequence[tuple[Tensor, dict[str, Any]]]) -> tuple[list[Tensor], list[dict[str, Any]]]:
    """Batch detection items of any image size as (list of images, list of targets)."""
    images, targets = [], []
    for image, target in batch:
        images.append(image)
        targets.append(target)
    return images, targets
