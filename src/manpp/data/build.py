"""The datasets of the experiments, built as ``(train, test, info)``: :func:`build_datasets`
checks the name and settings with :func:`~manpp.data.info.dataset_info` and hands over to the
builder of the dataset's family."""

from __future__ import annotations

from pathlib import Path

from torch.utils.data import Dataset

from .cityscapes import build_cityscapes
from .coco import build_coco
from .digits import build_digits
from .fashion import build_fashion
from .imagenet import build_image_folders
from .info import DatasetInfo, dataset_info
from .shapes import build_shapes
from .synthetic import build_synthetic
from .torchvision_sets import build_torchvision


def build_datasets(name: str, data_dir: str | Path | None = None, *, augment: bool = True, download: bool = True,
                   synthetic_samples: tuple[int, int] = (512, 128), seed: int = 0,
                   image_size: int | None = None, task: str | None = None) -> tuple[Dataset, Dataset, DatasetInfo]:
    """Build ``(train, test, info)`` for one of :data:`DATASETS`.

    ``data_dir`` (default ``./data``) is where file-based datasets live; ``digits`` and
    ``synthetic`` ignore it. ``augment`` switches the training augmentation, ``download`` lets
    torchvision fetch what is missing, ``synthetic_samples`` and ``seed`` shape ``synthetic``.
    ``image_size`` sets the side of ``imagenet`` (default 224) and ``synthetic`` images; the
    ``imagenet`` info takes its class count from the folder.
    """
    info = dataset_info(name, image_size=image_size, task=task)
    if info.name == "shapes":
        return build_shapes(info, seed, augment)
    if info.name == "coco":
        return build_coco(info, data_dir, augment)
    if info.name == "cityscapes":
        return build_cityscapes(info, data_dir, augment)
    if info.name == "imagenet":
        return build_image_folders(data_dir, info, augment)
    if info.name == "digits":
        train, test = build_digits(augment)
    elif info.name == "fashion-mnist":
        train, test = build_fashion(data_dir, download, augment)
    elif info.name == "synthetic":
        train, test = build_synthetic(synthetic_samples, seed, info)
    else:
        train, test = build_torchvision(info.name, data_dir, download, augment)
    return train, test, info
