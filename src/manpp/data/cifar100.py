"""CIFAR-100: 50,000 training and 10,000 test images of 32x32 pixels in 100 classes, read (or
downloaded) by torchvision, with CIFAR's augmentation (reflect-pad 4, crop, flip)."""

from __future__ import annotations

from torch.utils.data import Dataset

from .torchvision_sets import TorchvisionSet, cifar_augmentation, register_torchvision_dataset

CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)  # over the training images
CIFAR100_STD = (0.2673, 0.2564, 0.2762)


def _open(root: str, train: bool, transform, download: bool) -> Dataset:
    from torchvision import datasets

    return datasets.CIFAR100(root, train=train, transform=transform, download=download)


register_torchvision_dataset("cifar100", TorchvisionSet(_open, cifar_augmentation, "cifar-100-python/",
                                                        ("cifar-100-python.tar.gz", "cifar-100-python")),
                             channels=3, image_size=32, classes=100, mean=CIFAR100_MEAN, std=CIFAR100_STD)
