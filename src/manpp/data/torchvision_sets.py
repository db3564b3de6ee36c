"""CIFAR-10, SVHN and STL-10, read (or downloaded) by torchvision, imported only when built."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
from torch.utils.data import Dataset

from ..errors import ManppError, choices
from .common import data_root, describe_exception, removed_on_failure
from .info import dataset_info

# What torchvision expects under the data folder, for the error messages.
TORCHVISION_LAYOUT = {
    "cifar10": "cifar-10-batches-py/",
    "svhn": "train_32x32.mat and test_32x32.mat",
    "stl10": "stl10_binary/",
}
# what a download writes under the data folder (removed again when it fails)
DOWNLOADED = {
    "cifar10": ("cifar-10-python.tar.gz", "cifar-10-batches-py"),
    "svhn": ("train_32x32.mat", "test_32x32.mat"),
    "stl10": ("stl10_binary.tar.gz", "stl10_binary"),
}


def torchvision_transforms(name: str, augment: bool = True) -> tuple[Callable, Callable]:
    """(train, test) transforms from a PIL image or uint8 HxWxC array to a normalised float tensor."""
    from torchvision.transforms import v2

    info = dataset_info(name)
    if info.name == "cifar10":
        augmentation = [v2.RandomCrop(32, padding=4, padding_mode="reflect"), v2.RandomHorizontalFlip()]
    elif info.name == "svhn":
        augmentation = [v2.RandomCrop(32, padding=2)]  # no flip: digits are not symmetric
    elif info.name == "stl10":
        augmentation = [v2.RandomCrop(96, padding=4), v2.RandomHorizontalFlip()]
    else:
        raise ManppError(f"dataset {name!r} is not a torchvision dataset; expected {choices(TORCHVISION_LAYOUT)}")
    to_tensor = [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(info.mean), list(info.std)),
                 v2.ToPureTensor()]
    train = v2.Compose([v2.ToImage(), *(augmentation if augment else []), *to_tensor])
    test = v2.Compose([v2.ToImage(), *to_tensor])
    return train, test


def build_torchvision(name: str, data_dir: str | Path | None, download: bool,
                      augment: bool) -> tuple[Dataset, Dataset]:
    """(train, test) of torchvision dataset ``name`` (a key of :data:`TORCHVISION_LAYOUT`) under the data folder."""
    root = data_root(data_dir)
    train_tf, test_tf = torchvision_transforms(name, augment)
    try:
        with removed_on_failure(root, *(root / p for p in DOWNLOADED[name])):
            train, test = _open(name, root, train_tf, test_tf, download)
    except ImportError as exc:  # SVHN reads .mat files with scipy
        raise ManppError(f"dataset {name!r} needs scipy to read its .mat files: pip install 'manpp[svhn]' "
                         f"({describe_exception(exc)})") from exc
    except (OSError, RuntimeError, ValueError) as exc:  # URLError is an OSError
        layout, root = TORCHVISION_LAYOUT[name], root.absolute()
        if download:
            raise ManppError(f"dataset {name!r} is not in '{root}' and could not be downloaded (offline?): "
                             f"{describe_exception(exc)}; put {layout} in '{root}' (copied from a machine with "
                             f"internet access) or pass another data_dir") from exc
        raise ManppError(f"dataset {name!r} not found in '{root}' and download=False: {describe_exception(exc)}; "
                         f"put {layout} in '{root}' or allow the download") from exc
    return train, test


def _open(name: str, root: Path, train_tf, test_tf, download: bool) -> tuple[Dataset, Dataset]:
    from torchvision import datasets

    if name == "cifar10":
        train = datasets.CIFAR10(str(root), train=True, transform=train_tf, download=download)
        test = datasets.CIFAR10(str(root), train=False, transform=test_tf, download=download)
    elif name == "svhn":
        train = datasets.SVHN(str(root), split="train", transform=train_tf, download=download)
        test = datasets.SVHN(str(root), split="test", transform=test_tf, download=download)
    else:
        train = datasets.STL10(str(root), split="train", transform=train_tf, download=download)
        test = datasets.STL10(str(root), split="test", transform=test_tf, download=download)
    return train, test
