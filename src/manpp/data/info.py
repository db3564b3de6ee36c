"""Datasets by name: each one registers its builder with its facts (:class:`DatasetInfo`: channels,
image size, classes, normalisation, task) in its own file::

    @register_dataset("digits", channels=1, image_size=32, classes=10, mean=(0.3054,), std=(0.3237,))
    def build(info, *, augment, **_):
        ...

Reads no data and imports nothing heavy: :func:`dataset_info` only looks the facts up. Every list of
dataset names (``--help``, errors) reads the registry, so a new dataset is one file plus its import
in ``data/__init__.py``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from ..base.errors import ManppError, choices
from ..base.registry import Registry


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
    class_names: tuple[str, ...] | None = None  # in label order, where the dataset names them

    def names(self) -> list[str]:
        """The class names in label order: the dataset's, else the labels as text."""
        if self.class_names is not None and len(self.class_names) == self.num_classes:
            return list(self.class_names)
        return [str(i) for i in range(self.num_classes)]


MIN_IMAGE_SIZE = 16  # pixels; the smallest image side a resizable dataset accepts

# statistics that several datasets (or the release's recipe for them) share
CIFAR_MEAN = tuple(v / 255 for v in (125.3, 123.0, 113.9))
CIFAR_STD = tuple(v / 255 for v in (63.0, 62.1, 66.7))
HALF = (0.5, 0.5, 0.5)  # SVHN and STL-10: maps [0, 1] to [-1, 1]
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Dataset:
    """A registered dataset: its facts and its builder.

    ``build(info, *, data_dir, download, augment, seed, samples)`` returns ``(train, test)`` or, when
    the data changes the facts (the class count of an image folder), ``(train, test, info)``.
    ``classes_by_task``: for a dataset that serves several tasks (``task='dense'``), its classes in each."""

    info: DatasetInfo
    build: Callable
    resizable: bool = False  # its image size is a setting (image_size=)
    classes_by_task: dict | None = None
    reads_files: bool = False  # it reads (or downloads into) data_dir; the others refuse a data_dir
    classes_from: Callable | None = None  # data_dir -> its class count, read from folder names only


DATASETS: Registry = Registry("dataset")


def register_dataset(name: str, *, channels: int, image_size: int, classes: int, mean, std,
                     task: str = "classification", resizable: bool = False, classes_by_task: dict | None = None,
                     reads_files: bool = False, classes_from: Callable | None = None, class_names=None):
    """Decorator registering a dataset's builder with its facts (see :class:`Dataset`)."""
    def decorator(build: Callable) -> Callable:
        info = DatasetInfo(name, channels, image_size, classes, tuple(mean), tuple(std), task,
                           tuple(class_names) if class_names is not None else None)
        DATASETS.add(name, Dataset(info, build, resizable, classes_by_task, reads_files, classes_from))
        return build

    return decorator


def check_data_dir(name: str, data_dir) -> None:
    """A ``data_dir`` given to a dataset that reads no files would be ignored: refused in one line."""
    if data_dir is None:
        return
    key = str(name).strip().lower()
    if key in DATASETS and not DATASETS.get(key).reads_files:
        readers = [n for n, d in DATASETS.items() if d.reads_files]
        raise ManppError(f"dataset {key!r} reads no files, so --data-dir {str(data_dir)!r} would be ignored; for your "
                         f"own images give --dataset folder (one subfolder per class), or one of {choices(readers)}")


def datasets_for(task: str) -> list[str]:
    """The datasets a model of ``task`` can train on."""
    return [n for n, d in DATASETS.items() if d.info.task == task or task in (d.classes_by_task or {})]


def dataset_info(name: str, image_size: int | None = None, task: str | None = None) -> DatasetInfo:
    """Static information about dataset ``name`` (at ``image_size`` if given) for ``task``
    (a model's task; None: the dataset's own); reads no data."""
    key = str(name).strip().lower()
    if key not in DATASETS:
        raise ManppError(f"unknown dataset {name!r}; expected {choices(DATASETS.names())}")
    entry = DATASETS.get(key)
    info = entry.info
    if task is not None and task != info.task and task not in (entry.classes_by_task or {}):
        fits = datasets_for(task)
        raise ManppError(f"dataset {key!r} is for {info.task if info.task != 'dense' else 'dense tasks'}, but the "
                         f"model does {task}: use {choices(fits)}")
    if entry.classes_by_task:
        chosen = task or next(iter(entry.classes_by_task))
        info = dataclasses.replace(info, task=chosen, num_classes=entry.classes_by_task[chosen])
    if image_size is None or image_size == info.image_size:
        return info
    if not entry.resizable:
        resizable = [n for n, d in DATASETS.items() if d.resizable]
        raise ManppError(f"dataset {key!r} has a fixed image size of {info.image_size} px; image_size="
                         f"{image_size} is possible for {choices(resizable)}")
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
