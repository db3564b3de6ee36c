"""The datasets of the experiments, built as ``(train, test, info)``: :func:`build_datasets`
checks the name and settings with :func:`~manpp.data.info.dataset_info` and hands over to the
builder the dataset registered (:func:`~manpp.data.info.register_dataset`); importing the
dataset modules here registers them."""

from __future__ import annotations

from pathlib import Path

from torch.utils.data import Dataset

# each registers its datasets, in the order the names are listed
from . import digits, fashion, torchvision_sets, cifar100, imagenet, folder, synthetic, shapes, coco, cityscapes  # noqa: F401, I001
from .info import DATASETS, DatasetInfo, check_data_dir, dataset_info


def build_datasets(name: str, data_dir: str | Path | None = None, *, augment: bool = True, download: bool = True,
                   synthetic_samples: tuple[int, int] = (512, 128), seed: int = 0,
                   image_size: int | None = None, task: str | None = None,
                   val_fraction: float | None = None) -> tuple[Dataset, Dataset, DatasetInfo]:
    """Build ``(train, test, info)`` of a registered dataset.

    ``data_dir`` (default ``./data``) is where file-based datasets live; ``digits`` and
    ``synthetic`` ignore it. ``augment`` switches the training augmentation, ``download`` lets
    torchvision fetch what is missing, ``synthetic_samples`` and ``seed`` shape ``synthetic``.
    ``image_size`` sets the side of the resizable datasets; the ``imagenet`` and ``folder`` infos take their
    class count from the folder; ``val_fraction``: the share of each class ``folder`` holds out (default
    0.1). A ``data_dir`` for a dataset that reads no files is refused.
    """
    info = dataset_info(name, image_size=image_size, task=task)
    check_data_dir(info.name, data_dir)
    extra = {} if val_fraction is None else {"val_fraction": val_fraction}
    built = DATASETS.get(info.name).build(info, data_dir=data_dir, download=download, augment=augment, seed=seed,
                                          samples=synthetic_samples, **extra)
    return built if len(built) == 3 else (*built, info)
