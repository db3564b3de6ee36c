"""Your own images: ``--dataset folder --data-dir DIR``, one subfolder of images per class.

Two layouts are read:

- ``DIR/<class>/<image>``: the images of each class are split into training and held-out ones by the
  run's seed, ``val_fraction`` of each class held out (at least one image of every class with two or
  more), so every run of one seed sees the same split;
- ``DIR/train/<class>/<image>`` and ``DIR/val/<class>/<image>``: the split is yours.

An image is any file PIL reads with one of :data:`IMAGE_EXTENSIONS`; hidden files and folders are skipped.
Images are read as RGB and prepared as ImageNet's (random resized crop and flip for training, resize and
centre crop for evaluation; ImageNet's normalisation) at ``image_size`` (default 224; any, e.g. 64 for small
images and a CIFAR ResNet). The classes are the subfolders' names in sorted order; a run records them
(``classes`` in config.yaml, the checkpoint and the export's ``classes.json``).
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Callable

import torch
from torch.utils.data import Dataset

from ..base.errors import ManppError
from .common import describe_exception
from .imagenet import IMAGE_EXTENSIONS, imagenet_transforms
from .info import IMAGENET_MEAN, IMAGENET_STD, DatasetInfo, register_dataset

SPLIT_SEED = 7_919  # the held-out split of a one-folder layout comes from the run's seed plus this
VAL_FRACTION = 0.1  # the default share of each class held out
LAYOUTS = "DIR/<class>/<image> (split by val_fraction) or DIR/train/<class>/<image> with DIR/val/<class>/<image>"


def _visible(path: Path) -> bool:
    return not path.name.startswith(".")


def _class_folders(root: Path) -> list[Path]:
    return sorted((d for d in root.iterdir() if d.is_dir() and _visible(d)), key=lambda d: d.name)


def _images(folder: Path) -> list[Path]:
    """Every image file under ``folder`` (subfolders included), in a fixed order."""
    suffixes = {s.lower() for s in IMAGE_EXTENSIONS}
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in suffixes
                  and all(_visible(part) for part in p.relative_to(folder).parents if part.name) and _visible(p))


def folder_root(data_dir) -> Path:
    """``data_dir`` checked: the folder holding the images (``--data-dir`` is required: there is no default)."""
    if data_dir is None:
        raise ManppError(f"dataset 'folder' reads your images: give --data-dir DIR, laid out as {LAYOUTS}")
    root = Path(data_dir).expanduser()
    if not root.is_dir():
        raise ManppError(f"data folder '{data_dir}' {'is not a folder' if root.exists() else 'does not exist'}; "
                         f"dataset 'folder' reads {LAYOUTS}")
    return root


def layout_of(root: Path) -> str:
    """``"split"`` (``train/`` and ``val/``) or ``"classes"`` (one folder per class)."""
    names = {d.name for d in _class_folders(root)}
    if {"train", "val"} <= names:
        return "split"
    if "train" in names or "val" in names:
        missing = "val" if "train" in names else "train"
        raise ManppError(f"'{root}' has a '{({'train', 'val'} - {missing}).pop()}' folder but no '{missing}': "
                         f"give both (DIR/train/<class>, DIR/val/<class>), or put the class folders directly in "
                         f"'{root}'")
    return "classes"


def class_names(data_dir) -> list[str]:
    """The classes of the folder at ``data_dir``, in label order (reads folder names only)."""
    root = folder_root(data_dir)
    base = root / "train" if layout_of(root) == "split" else root
    names = [d.name for d in _class_folders(base)]
    if len(names) < 2:
        raise ManppError(f"'{base}' holds {len(names)} class folder{'s' if len(names) != 1 else ''}"
                         f"{' (' + names[0] + ')' if names else ''}: a classifier needs at least two, laid out as "
                         f"{LAYOUTS}")
    return names


class ImageFiles(Dataset):
    """Images read from files as RGB, with their labels; ``classes`` names the labels."""

    def __init__(self, items: list[tuple[Path, int]], classes: list[str], transform: Callable | None = None):
        self.items, self.classes, self.transform = items, classes, transform

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int):
        from PIL import Image

        path, label = self.items[index]
        try:
            with Image.open(path) as image:
                image = image.convert("RGB")
        except (OSError, ValueError) as exc:
            raise ManppError(f"cannot read image '{path}': {describe_exception(exc)}") from None
        return (self.transform(image) if self.transform is not None else image), label


def _labelled(base: Path, classes: list[str]) -> list[list[Path]]:
    """Each class's images under ``base``, by label; a class folder without images is an error."""
    out = []
    for name in classes:
        folder = base / name
        if not folder.is_dir():
            raise ManppError(f"'{base}' has no folder '{name}', but the training classes include it: train/ and "
                             f"val/ must hold the same class folders")
        images = _images(folder)
        if not images:
            raise ManppError(f"class folder '{folder}' holds no image ({', '.join(IMAGE_EXTENSIONS[:5])}, ...)")
        out.append(images)
    return out


def split_files(per_class: list[list[Path]], fraction: float, seed: int) -> tuple[list, list]:
    """``(train, held_out)`` lists of ``(path, label)``: ``fraction`` of each class (rounded up, at least one
    of a class with two images or more, never all of it) held out, drawn from ``seed``."""
    if not 0 < fraction < 1:
        raise ManppError(f"bad val_fraction {fraction!r}: accepted is a number between 0 and 1 (exclusive), e.g. 0.1")
    generator = torch.Generator().manual_seed(seed + SPLIT_SEED)
    train, held = [], []
    for label, images in enumerate(per_class):
        order = torch.randperm(len(images), generator=generator).tolist()
        n_held = min(len(images) - 1, max(1 if len(images) > 1 else 0, math.ceil(fraction * len(images))))
        chosen = set(order[:n_held])
        for i, path in enumerate(images):
            (held if i in chosen else train).append((path, label))
    return train, held


def build_folder(data_dir, info: DatasetInfo, augment: bool, seed: int,
                 val_fraction: float = VAL_FRACTION) -> tuple[Dataset, Dataset, DatasetInfo]:
    """``(train, held_out, info)`` of your image folder (see the module docstring)."""
    root = folder_root(data_dir)
    classes = class_names(root)
    if layout_of(root) == "split":
        train_items = [(p, y) for y, ps in enumerate(_labelled(root / "train", classes)) for p in ps]
        extra = sorted(set(d.name for d in _class_folders(root / "val")) - set(classes))
        if extra:
            raise ManppError(f"'{root / 'val'}' has class folders that train/ has not: {extra[:3]}; both must hold "
                             f"the same classes")
        test_items = [(p, y) for y, ps in enumerate(_labelled(root / "val", classes)) for p in ps]
    else:
        train_items, test_items = split_files(_labelled(root, classes), val_fraction, seed)
        if not test_items:
            raise ManppError(f"'{root}' has one image per class: nothing can be held out for evaluation; add images "
                             f"or give DIR/train and DIR/val")
    train_tf, test_tf = imagenet_transforms(info.image_size, augment)
    return (ImageFiles(train_items, classes, train_tf), ImageFiles(test_items, classes, test_tf),
            dataclasses.replace(info, num_classes=len(classes), class_names=tuple(classes)))


@register_dataset("folder", channels=3, image_size=224, classes=2, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                  resizable=True, reads_files=True, classes_from=lambda data_dir: len(class_names(data_dir)))
def _build(info, *, data_dir, augment: bool, seed: int = 0, val_fraction: float = VAL_FRACTION, **_):
    return build_folder(data_dir, info, augment, seed, val_fraction)


__all__ = ["ImageFiles", "LAYOUTS", "VAL_FRACTION", "build_folder", "class_names", "folder_root", "layout_of",
           "split_files"]
