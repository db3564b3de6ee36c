"""Datasets as ``(train, test, info)`` with normalised float images and int labels."""

from .datasets import (
    DATASETS,
    DatasetInfo,
    RandomCropFlip,
    TensorImageDataset,
    build_datasets,
    dataset_info,
    denormalize,
    normalize,
    torchvision_transforms,
)
from .idx import read_idx_images, read_idx_labels

__all__ = [
    "DATASETS", "DatasetInfo", "RandomCropFlip", "TensorImageDataset", "build_datasets", "dataset_info",
    "denormalize", "normalize", "read_idx_images", "read_idx_labels", "torchvision_transforms",
]
