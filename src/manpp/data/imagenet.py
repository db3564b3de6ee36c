"""ImageNet-style folders ``train/<class>/*`` and ``val/<class>/*``, read with torchvision's ImageFolder
(imported only when built)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable

import torch
from torch.utils.data import Dataset

from ..base.errors import ManppError
from .common import data_root, describe_exception
from .info import IMAGENET_MEAN, IMAGENET_STD, DatasetInfo, register_dataset

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".JPEG")
# The classic evaluation: resize to 256 pixels, then centre-crop 224 (scaled to any image size).
EVAL_RESIZE, EVAL_CROP = 256, 224


def _eval_resize(image_size: int) -> int:
    """The side to resize to before the centre crop of ``image_size`` pixels."""
    return round(image_size * EVAL_RESIZE / EVAL_CROP)


def imagenet_transforms(image_size: int, augment: bool = True) -> tuple[Callable, Callable]:
    """RandomResizedCrop + flip for training; resize to 256/224 of the size + centre crop for testing."""
    from torchvision.transforms import v2

    to_tensor = [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(IMAGENET_MEAN), list(IMAGENET_STD)),
                 v2.ToPureTensor()]
    crop = [v2.RandomResizedCrop(image_size, antialias=True), v2.RandomHorizontalFlip()] if augment else \
        [v2.Resize(_eval_resize(image_size), antialias=True), v2.CenterCrop(image_size)]
    train = v2.Compose([v2.ToImage(), *crop, *to_tensor])
    test = v2.Compose([v2.ToImage(), v2.Resize(_eval_resize(image_size), antialias=True),
                       v2.CenterCrop(image_size), *to_tensor])
    return train, test


def _class_folders(split: Path) -> list[str]:
    return sorted(d.name for d in split.iterdir() if d.is_dir() and not d.name.startswith("."))


def build_image_folders(data_dir: str | Path | None, info: DatasetInfo,
                        augment: bool) -> tuple[Dataset, Dataset, DatasetInfo]:
    """``train/<class>/*`` and ``val/<class>/*`` under ``data_dir``, read with torchvision's ImageFolder;
    the returned info takes its class count from the folders."""
    root = data_root(data_dir)
    layout = "train/<class>/<image> and val/<class>/<image>"
    splits = {}
    for split in ("train", "val"):
        folder = root / split
        if not folder.is_dir():
            raise ManppError(f"imagenet: '{folder}' is not a folder; the data folder '{root}' must hold {layout}")
        classes = _class_folders(folder)
        if not classes:
            raise ManppError(f"imagenet: '{folder}' has no class folders; expected {layout}")
        splits[split] = classes
    if splits["train"] != splits["val"]:
        only_train = sorted(set(splits["train"]) - set(splits["val"]))[:3]
        only_val = sorted(set(splits["val"]) - set(splits["train"]))[:3]
        raise ManppError(f"imagenet: the class folders of train/ and val/ differ (only in train: {only_train}, "
                         f"only in val: {only_val}); both must have the same classes")
    from torchvision.datasets import ImageFolder

    train_tf, test_tf = imagenet_transforms(info.image_size, augment)
    try:
        train = ImageFolder(str(root / "train"), transform=train_tf)
        test = ImageFolder(str(root / "val"), transform=test_tf)
    except (FileNotFoundError, RuntimeError) as exc:  # a class folder without images
        raise ManppError(f"imagenet: cannot read '{root}': {describe_exception(exc)}; every class folder needs "
                         f"images ({', '.join(IMAGE_EXTENSIONS[:4])}, ...)") from None
    return train, test, dataclasses.replace(info, num_classes=len(splits["train"]), class_names=tuple(splits["train"]))


# any ImageNet-style folder; the class count is read from the folder
@register_dataset("imagenet", reads_files=True,
                  classes_from=lambda data_dir: len(_class_folders(data_root(data_dir) / "train")), channels=3, image_size=224, classes=1000, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                  resizable=True)
def _build(info, *, data_dir, augment: bool, **_):
    return build_image_folders(data_dir, info, augment)
