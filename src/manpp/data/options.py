"""Data switches of a run: grayscale as 3 channels, the normalisation, the augmentation.

``release`` means the authors' recipe for the dataset. The release trains CIFAR-10, SVHN, STL-10,
ImageNet and COCO, and for those our datasets already follow it; for the small in-memory sets it
does not have (digits, Fashion-MNIST, synthetic) it means CIFAR-10's: CIFAR statistics, and
reflect-padding by 4, a random crop and a horizontal flip (docs/release.md: training recipes).
"""

from __future__ import annotations

import dataclasses
import statistics

from ..base.errors import ManppError
from .common import RandomCropFlip, TensorImageDataset, normalized_black
from .info import CIFAR_MEAN, CIFAR_STD, DatasetInfo, denormalize, normalize

AUGMENTS = ("dataset", "release", "off")
# train_subset / test_subset: a fixed random choice, the first N, or a random choice of the run's seed
SUBSET_ORDERS = ("random", "first", "seeded")
NORMALIZES = ("dataset", "release")
CIFAR_RECIPE_SETS = ("digits", "fashion-mnist", "synthetic")  # 'release' is CIFAR-10's recipe for these
RELEASE_CROP_PADDING = 4  # CIFAR-10: reflect-pad 4, crop 32, flip


def adjusted_info(info: DatasetInfo, gray_to_rgb: bool, normalize_: str) -> DatasetInfo:
    """``info`` with the channels and statistics the switches give (reads no data)."""
    channels = 3 if gray_to_rgb and info.in_channels == 1 else info.in_channels
    mean, std = info.mean, info.std
    if normalize_ == "release" and info.name in CIFAR_RECIPE_SETS:
        mean, std = CIFAR_MEAN, CIFAR_STD
        if channels == 1:  # one channel with CIFAR's statistics: their mean over the three channels
            mean, std = (statistics.fmean(mean),), (statistics.fmean(std),)
    elif len(mean) != channels:
        mean, std = mean * channels, std * channels  # a grayscale image replicated: the same statistics
    if (channels, mean, std) == (info.in_channels, info.mean, info.std):
        return info
    return dataclasses.replace(info, in_channels=channels, mean=tuple(mean), std=tuple(std))


def adapt(dataset, old: DatasetInfo, new: DatasetInfo, augment: str, training: bool):
    """``dataset`` (built for ``old``) as the switches ask: re-normalised, replicated, re-augmented.

    ``augment='off'`` must have been built without augmentation (``build_datasets(augment=False)``).
    """
    # 'off' is built without augmentation (build_datasets(augment=False)); nothing to change for it
    own = not training or augment in ("dataset", "off") or old.name not in CIFAR_RECIPE_SETS
    if new == old and own:
        return dataset
    if not isinstance(dataset, TensorImageDataset):
        raise ManppError(f"dataset '{old.name}': gray_to_rgb, normalize=release and augment=release change only "
                         f"the in-memory datasets ({', '.join(CIFAR_RECIPE_SETS)}); '{old.name}' already follows "
                         f"the release")
    images = dataset.images
    if new != old:
        pixels = denormalize(images, old)
        if new.in_channels != old.in_channels:
            pixels = pixels.expand(-1, new.in_channels, -1, -1)
        images = normalize(pixels, new).contiguous()
    transform = dataset.transform
    if not own:
        transform = RandomCropFlip(RELEASE_CROP_PADDING, flip=True, reflect=True)
    elif isinstance(transform, RandomCropFlip):  # the dataset's own, with the new normalised black
        transform = RandomCropFlip(transform.padding, transform.flip, fill=normalized_black(new),
                                   reflect=transform.reflect)
    return TensorImageDataset(images, dataset.labels, transform)


__all__ = ["AUGMENTS", "CIFAR_RECIPE_SETS", "NORMALIZES", "SUBSET_ORDERS", "adapt", "adjusted_info"]
