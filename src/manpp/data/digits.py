"""scikit-learn's 8x8 handwritten digits, upsampled to 32x32 (scikit-learn is imported only when built)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .common import RandomCropFlip, TensorImageDataset, normalized_black
from .info import dataset_info, normalize, register_dataset

DIGITS_MEAN, DIGITS_STD = 0.3054, 0.3237  # computed once from the training split, at 32x32
DIGITS_MAX_PIXEL = 16.0  # scikit-learn's digits have pixel values 0 to 16
DIGITS_TEST_FRACTION = 0.2  # of the 1797 images, stratified by class
DIGITS_SPLIT_SEED = 0  # the train/test split is the same whatever the run's seed
DIGITS_CROP_PADDING = 2  # pixels of the random-crop augmentation


def build_digits(augment: bool) -> tuple[TensorImageDataset, TensorImageDataset]:
    """(train, test) of the digits, normalised; ``augment`` adds a random crop (no flip) to training."""
    from ..base.extras import require

    load_digits = require("sklearn.datasets", "the digits dataset (scikit-learn's)").load_digits
    train_test_split = require("sklearn.model_selection", "the digits dataset (scikit-learn's)").train_test_split

    info = dataset_info("digits")
    bunch = load_digits()
    images = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / DIGITS_MAX_PIXEL
    size = (info.image_size, info.image_size)
    images = F.interpolate(images, size=size, mode="bilinear", align_corners=False, antialias=False)
    images = normalize(images, info)
    labels = torch.as_tensor(bunch.target, dtype=torch.long)
    train_idx, test_idx = train_test_split(np.arange(len(labels)), test_size=DIGITS_TEST_FRACTION,
                                           stratify=bunch.target, random_state=DIGITS_SPLIT_SEED)
    train_idx, test_idx = torch.as_tensor(train_idx), torch.as_tensor(test_idx)
    transform = RandomCropFlip(DIGITS_CROP_PADDING, flip=False, fill=normalized_black(info)) if augment else None
    return (TensorImageDataset(images[train_idx], labels[train_idx], transform),
            TensorImageDataset(images[test_idx], labels[test_idx]))


@register_dataset("digits", channels=1, image_size=32, classes=10, mean=(DIGITS_MEAN,), std=(DIGITS_STD,))
def _build(info, *, augment: bool, **_):
    return build_digits(augment)
