"""Datasets that torchvision reads (or downloads), imported only when built: CIFAR-10, SVHN and STL-10
here; another is one :func:`register_torchvision_dataset` call in a file of its own (``cifar100.py``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch.utils.data import Dataset

from ..base.errors import ManppError, choices
from .common import data_root, describe_exception, removed_on_failure
from .info import CIFAR_MEAN, CIFAR_STD, HALF, dataset_info, register_dataset

@dataclass(frozen=True)
class TorchvisionSet:
    """How to open one torchvision dataset: ``open(root, train, transform, download)`` gives a split;
    ``augmentation()`` the training augmentation (``torchvision.transforms.v2`` objects); ``layout``
    what the data folder must hold (for the messages); ``downloaded`` what a download writes there
    (removed again when it fails)."""

    open: Callable[..., Dataset]
    augmentation: Callable[[], list]
    layout: str
    downloaded: tuple[str, ...]


SETS: dict[str, TorchvisionSet] = {}


def register_torchvision_dataset(name: str, spec: TorchvisionSet, **facts) -> None:
    """A dataset torchvision reads (or downloads): its spec, and its facts for :func:`register_dataset`."""
    SETS[name] = spec

    def build(info, *, data_dir, download: bool, augment: bool, **_):
        return build_torchvision(info.name, data_dir, download, augment)

    register_dataset(name, reads_files=True, **facts)(build)


def torchvision_transforms(name: str, augment: bool = True) -> tuple[Callable, Callable]:
    """(train, test) transforms from a PIL image or uint8 HxWxC array to a normalised float tensor."""
    from torchvision.transforms import v2

    info = dataset_info(name)
    if info.name not in SETS:
        raise ManppError(f"dataset {name!r} is not a torchvision dataset; expected {choices(SETS)}")
    augmentation = SETS[info.name].augmentation()
    to_tensor = [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(info.mean), list(info.std)),
                 v2.ToPureTensor()]
    train = v2.Compose([v2.ToImage(), *(augmentation if augment else []), *to_tensor])
    test = v2.Compose([v2.ToImage(), *to_tensor])
    return train, test


def build_torchvision(name: str, data_dir: str | Path | None, download: bool,
                      augment: bool) -> tuple[Dataset, Dataset]:
    """(train, test) of torchvision dataset ``name`` (one of :data:`SETS`) under the data folder."""
    root = data_root(data_dir)
    spec = SETS[name]
    train_tf, test_tf = torchvision_transforms(name, augment)
    try:
        with removed_on_failure(root, *(root / p for p in spec.downloaded)):
            train = spec.open(str(root), True, train_tf, download)
            test = spec.open(str(root), False, test_tf, download)
    except ImportError as exc:  # SVHN reads .mat files with scipy
        raise ManppError(f"dataset {name!r} needs scipy to read its .mat files: pip install 'manpp[svhn]' "
                         f"({describe_exception(exc)})") from exc
    except (OSError, RuntimeError, ValueError) as exc:  # URLError is an OSError
        layout, root = spec.layout, root.absolute()
        if download:
            raise ManppError(f"dataset {name!r} is not in '{root}' and could not be downloaded (offline?): "
                             f"{describe_exception(exc)}; put {layout} in '{root}' (copied from a machine with "
                             f"internet access) or pass another data_dir") from exc
        raise ManppError(f"dataset {name!r} not found in '{root}' and download=False: {describe_exception(exc)}; "
                         f"put {layout} in '{root}' or allow the download") from exc
    return train, test


def _cifar10(root: str, train: bool, transform, download: bool) -> Dataset:
    from torchvision import datasets

    return datasets.CIFAR10(root, train=train, transform=transform, download=download)


def _svhn(root: str, train: bool, transform, download: bool) -> Dataset:
    from torchvision import datasets

    return datasets.SVHN(root, split="train" if train else "test", transform=transform, download=download)


def _stl10(root: str, train: bool, transform, download: bool) -> Dataset:
    from torchvision import datasets

    return datasets.STL10(root, split="train" if train else "test", transform=transform, download=download)


def cifar_augmentation() -> list:
    """CIFAR's: reflect-pad 4, random 32 px crop, horizontal flip."""
    from torchvision.transforms import v2

    return [v2.RandomCrop(32, padding=4, padding_mode="reflect"), v2.RandomHorizontalFlip()]


def _svhn_augmentation() -> list:
    from torchvision.transforms import v2

    return [v2.RandomCrop(32, padding=2)]  # no flip: digits are not symmetric


def _stl10_augmentation() -> list:
    from torchvision.transforms import v2

    return [v2.RandomCrop(96, padding=4), v2.RandomHorizontalFlip()]


register_torchvision_dataset("cifar10", TorchvisionSet(_cifar10, cifar_augmentation, "cifar-10-batches-py/",
                                                       ("cifar-10-python.tar.gz", "cifar-10-batches-py")),
                             channels=3, image_size=32, classes=10, mean=CIFAR_MEAN, std=CIFAR_STD,
                             class_names=("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                                          "ship", "truck"))
register_torchvision_dataset("svhn", TorchvisionSet(_svhn, _svhn_augmentation, "train_32x32.mat and test_32x32.mat",
                                                    ("train_32x32.mat", "test_32x32.mat")),
                             channels=3, image_size=32, classes=10, mean=HALF, std=HALF)
register_torchvision_dataset("stl10", TorchvisionSet(_stl10, _stl10_augmentation, "stl10_binary/",
                                                     ("stl10_binary.tar.gz", "stl10_binary")),
                             channels=3, image_size=96, classes=10, mean=HALF, std=HALF)
