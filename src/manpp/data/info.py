"""Static facts about every dataset (:class:`DatasetInfo`) and the normalisation they use.

Reads no data and imports nothing heavy: :func:`dataset_info` only looks up the table below.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import ManppError, choices


@dataclass(frozen=True)
class DatasetInfo:
    """Static facts about a dataset after our preprocessing."""

    name: str
    in_channels: int
    image_size: int  # square side in pixels
    num_classes: int
    mean: tuple[float, ...]  # per-channel normalisation mean
    std: tuple[float, ...]
    task: str = "classification"  # or 'detection', 'segmentation', 'dense' (both)


DATASETS: tuple[str, ...] = ("digits", "fashion-mnist", "cifar10", "svhn", "stl10", "imagenet", "synthetic", "shapes",
                             "coco", "cityscapes")
TASK_DATASETS = {"detection": ("shapes", "coco"), "segmentation": ("shapes", "cityscapes")}
RESIZABLE_DATASETS = ("imagenet", "synthetic", "shapes", "coco", "cityscapes")  # their image size is a setting
MIN_IMAGE_SIZE = 16  # pixels; the smallest image side a resizable dataset accepts

# digits and fashion-mnist: computed once from their training split (after resizing / padding).
DIGITS_MEAN, DIGITS_STD = 0.3054, 0.3237
FASHION_MEAN, FASHION_STD = 0.2190, 0.3318
CIFAR_MEAN = tuple(v / 255 for v in (125.3, 123.0, 113.9))
CIFAR_STD = tuple(v / 255 for v in (63.0, 62.1, 66.7))
HALF = (0.5, 0.5, 0.5)  # SVHN and STL-10: maps [0, 1] to [-1, 1]
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

# The shapes data has 3 shape classes; segmentation adds the background.
SHAPES_DETECTION_CLASSES, SHAPES_SEGMENTATION_CLASSES = 3, 4

_INFO = {
    "digits": DatasetInfo("digits", 1, 32, 10, (DIGITS_MEAN,), (DIGITS_STD,)),
    "fashion-mnist": DatasetInfo("fashion-mnist", 1, 32, 10, (FASHION_MEAN,), (FASHION_STD,)),
    "cifar10": DatasetInfo("cifar10", 3, 32, 10, CIFAR_MEAN, CIFAR_STD),
    "svhn": DatasetInfo("svhn", 3, 32, 10, HALF, HALF),
    "stl10": DatasetInfo("stl10", 3, 96, 10, HALF, HALF),
    # any ImageNet-style folder; the class count is read from the folder
    "imagenet": DatasetInfo("imagenet", 3, 224, 1000, IMAGENET_MEAN, IMAGENET_STD),
    "synthetic": DatasetInfo("synthetic", 3, 32, 10, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)),
    # dense tasks: generated shapes, COCO (image_size: the shorter side after resizing),
    # Cityscapes (image_size: the training crop)
    "shapes": DatasetInfo("shapes", 3, 64, SHAPES_SEGMENTATION_CLASSES, IMAGENET_MEAN, IMAGENET_STD, task="dense"),
    "coco": DatasetInfo("coco", 3, 600, 80, IMAGENET_MEAN, IMAGENET_STD, task="detection"),
    "cityscapes": DatasetInfo("cityscapes", 3, 768, 19, IMAGENET_MEAN, IMAGENET_STD, task="segmentation"),
}


def dataset_info(name: str, image_size: int | None = None, task: str | None = None) -> DatasetInfo:
    """Static information about dataset ``name`` (at ``image_size`` if given) for ``task``
    (a model's task; None: the dataset's own); reads no data."""
    key = str(name).strip().lower()
    if key not in _INFO:
        raise ManppError(f"unknown dataset {name!r}; expected {choices(DATASETS)}")
    info = _INFO[key]
    if task is not None and task != info.task and not (info.task == "dense" and task in TASK_DATASETS):
        fits = TASK_DATASETS.get(task) or [n for n, i in _INFO.items() if i.task == "classification"]
        raise ManppError(f"dataset {key!r} is for {info.task if info.task != 'dense' else 'dense tasks'}, but the "
                         f"model does {task}: use {choices(fits)}")
    if info.task == "dense":
        classes = SHAPES_DETECTION_CLASSES if task == "detection" else SHAPES_SEGMENTATION_CLASSES
        info = dataclasses.replace(info, task=task or "segmentation", num_classes=classes)
    if image_size is None or image_size == info.image_size:
        return info
    if key not in RESIZABLE_DATASETS:
        raise ManppError(f"dataset {key!r} has a fixed image size of {info.image_size} px; image_size="
                         f"{image_size} is possible for {choices(RESIZABLE_DATASETS)}")
    if not isinstance(image_size, int) or image_size < MIN_IMAGE_SIZE:
        raise ManppError(f"image_size must be an integer of at least {MIN_IMAGE_SIZE} pixels, got {image_size!r}")
    return dataclasses.replace(info, image_size=image_size)


def _stats(mean: tuple[float, ...], std: tuple[float, ...], like: Tensor) -> tuple[Tensor, Tensor]:
    """``mean`` and ``std`` as (C, 1, 1) tensors of the dtype and device of ``like``."""
    return (torch.tensor(mean, dtype=like.dtype, device=like.device).view(-1, 1, 1),
            torch.tensor(std, dtype=like.dtype, device=like.device).view(-1, 1, 1))


def normalize(x: Tensor, info: DatasetInfo) -> Tensor:
    """Map [0, 1] pixels (N, C, H, W or C, H, W) to normalised values: (x - mean) / std."""
    mean, std = _stats(info.mean, info.std, x)
    return (x - mean) / std


def denormalize(x: Tensor, info: DatasetInfo) -> Tensor:
    """Map a normalised batch (N, C, H, W or C, H, W) back to [0, 1] pixels: x * std + mean."""
    mean, std = _stats(info.mean, info.std, x)
    return x * std + mean


def normalize_imagenet(image: Tensor) -> Tensor:
    """Map [0, 1] RGB pixels of a CPU image (3, H, W or N, 3, H, W) to ImageNet-normalised values."""
    mean = torch.tensor(IMAGENET_MEAN, dtype=image.dtype).view(-1, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=image.dtype).view(-1, 1, 1)
    return (image - mean) / std
