"""Fashion-MNIST from its four IDX files, found in the data folder, Debian's package or a download.

The 28x28 images are zero-padded to 32x32. torchvision is imported only to download.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..base.errors import ManppError
from .common import (RandomCropFlip, TensorImageDataset, data_root, describe_exception, normalized_black,
                     removed_on_failure)
from .idx import read_idx_images, read_idx_labels
from .info import DatasetInfo, dataset_info, normalize, register_dataset

FASHION_MEAN, FASHION_STD = 0.2190, 0.3318  # computed once from the training split, padded to 32x32
FASHION_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")  # Debian's dataset-fashion-mnist
FASHION_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
FASHION_IMAGE_SIDE = 28  # pixels of the files' images
FASHION_PADDING = 2  # zero pixels added on each side: 28 + 2 * 2 = 32
FASHION_CROP_PADDING = 2  # pixels of the random-crop augmentation


def _find_idx_files(folder: Path) -> dict[str, Path] | None:
    """The four Fashion-MNIST files in ``folder`` (gzipped or not), or None when one is missing."""
    found = {}
    for key, stem in FASHION_FILES.items():
        for candidate in (folder / f"{stem}.gz", folder / stem):
            if candidate.is_file():
                found[key] = candidate
                break
        else:
            return None
    return found


def fashion_files(data_dir: str | Path | None, download: bool) -> dict[str, Path]:
    """The paths of the four files (keys of :data:`FASHION_FILES`), downloaded if missing and allowed.

    Searched: ``data_dir`` (or, without one, :data:`FASHION_SYSTEM_DIR`), then torchvision's
    ``FashionMNIST/raw`` under the data folder, which is also where a download goes.
    """
    root = data_root(data_dir)
    torchvision_dir = root / "FashionMNIST" / "raw"
    searched = [root if data_dir is not None else FASHION_SYSTEM_DIR, torchvision_dir]
    for folder in searched:
        files = _find_idx_files(folder)
        if files is not None:
            return files
    where = " or ".join(f"'{folder}'" for folder in searched)
    wanted = ", ".join(f"{stem}[.gz]" for stem in FASHION_FILES.values())
    if not download:
        raise ManppError(f"fashion-mnist files ({wanted}) not found in {where} and download=False; "
                         f"copy them into one of those folders or allow the download")
    from torchvision.datasets import FashionMNIST

    try:
        with removed_on_failure(root, root / "FashionMNIST", torchvision_dir):
            FashionMNIST(str(root), train=True, download=True)
    except (OSError, RuntimeError, ValueError) as exc:  # URLError is an OSError
        raise ManppError(f"fashion-mnist files ({wanted}) not found in {where}, and the download into "
                         f"'{torchvision_dir}' failed (offline?): {describe_exception(exc)}; copy the files into "
                         f"one of those folders (or install Debian's dataset-fashion-mnist package)") from exc
    files = _find_idx_files(torchvision_dir)
    if files is None:
        raise ManppError(f"fashion-mnist was downloaded but the files ({wanted}) are not in '{torchvision_dir}'")
    return files


def _load_split(images_path: Path, labels_path: Path, info: DatasetInfo) -> tuple[Tensor, Tensor]:
    """Normalised, padded images (N, 1, 32, 32) and long labels (N,) of one split's two files."""
    images, labels = read_idx_images(images_path), read_idx_labels(labels_path)
    if len(images) != len(labels):
        raise ManppError(f"'{images_path}' holds {len(images)} images but '{labels_path}' holds "
                         f"{len(labels)} labels; they must match")
    if images.shape[1:] != (FASHION_IMAGE_SIDE, FASHION_IMAGE_SIDE):
        raise ManppError(f"'{images_path}' holds {images.shape[1]}x{images.shape[2]} images; "
                         f"fashion-mnist images are {FASHION_IMAGE_SIDE}x{FASHION_IMAGE_SIDE}")
    if len(labels) and labels.max() >= info.num_classes:
        raise ManppError(f"'{labels_path}' holds label {int(labels.max())}; "
                         f"fashion-mnist labels are 0 to {info.num_classes - 1}")
    x = torch.from_numpy(images.astype(np.float32)).div_(255.0).unsqueeze(1)
    x = normalize(F.pad(x, (FASHION_PADDING,) * 4), info)
    return x, torch.from_numpy(labels.astype(np.int64))


def build_fashion(data_dir: str | Path | None, download: bool,
                  augment: bool) -> tuple[TensorImageDataset, TensorImageDataset]:
    """(train, test) of Fashion-MNIST; ``augment`` adds a random crop and flip to training."""
    info = dataset_info("fashion-mnist")
    files = fashion_files(data_dir, download)
    train = _load_split(files["train_images"], files["train_labels"], info)
    test = _load_split(files["test_images"], files["test_labels"], info)
    transform = RandomCropFlip(FASHION_CROP_PADDING, flip=True, fill=normalized_black(info)) if augment else None
    return TensorImageDataset(*train, transform), TensorImageDataset(*test)


FASHION_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                   "Ankle boot")  # the dataset's own names, labels 0 to 9


@register_dataset("fashion-mnist", reads_files=True, channels=1, image_size=32, classes=10, mean=(FASHION_MEAN,),
                  std=(FASHION_STD,), class_names=FASHION_CLASSES)
def _build(info, *, data_dir, download: bool, augment: bool, **_):
    return build_fashion(data_dir, download, augment)
