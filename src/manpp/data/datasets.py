"""The datasets of the experiments, built as ``(train, test, info)``.

Every item is ``(image, label)``: a float32 tensor C x H x W already normalised with
``info.mean`` / ``info.std``, and an ``int``. Random augmentation draws from torch's global
RNG, so seeding torch makes it reproducible with ``num_workers=0``. torchvision and
scikit-learn are imported only by the builders that need them.
"""

from __future__ import annotations

import dataclasses
import numbers
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from ..errors import ManppError, choices
from .idx import read_idx_images, read_idx_labels


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


DATASETS: tuple[str, ...] = ("digits", "fashion-mnist", "cifar10", "svhn", "stl10", "imagenet", "synthetic", "shapes",
                             "coco", "cityscapes")
TASK_DATASETS = {"detection": ("shapes", "coco"), "segmentation": ("shapes", "cityscapes")}
SHAPES_SAMPLES = (1024, 256)  # generated training and test images of the shapes dataset

# digits and fashion-mnist: computed once from their training split (after resizing / padding).
_DIGITS_MEAN, _DIGITS_STD = 0.3054, 0.3237
_FASHION_MEAN, _FASHION_STD = 0.2190, 0.3318
_CIFAR_MEAN = tuple(v / 255 for v in (125.3, 123.0, 113.9))
_CIFAR_STD = tuple(v / 255 for v in (63.0, 62.1, 66.7))
_HALF = (0.5, 0.5, 0.5)
_IMAGENET_MEAN, _IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
_RESIZABLE = ("imagenet", "synthetic", "shapes", "coco", "cityscapes")  # datasets whose image size is a setting

_INFO = {
    "digits": DatasetInfo("digits", 1, 32, 10, (_DIGITS_MEAN,), (_DIGITS_STD,)),
    "fashion-mnist": DatasetInfo("fashion-mnist", 1, 32, 10, (_FASHION_MEAN,), (_FASHION_STD,)),
    "cifar10": DatasetInfo("cifar10", 3, 32, 10, _CIFAR_MEAN, _CIFAR_STD),
    "svhn": DatasetInfo("svhn", 3, 32, 10, _HALF, _HALF),
    "stl10": DatasetInfo("stl10", 3, 96, 10, _HALF, _HALF),
    # any ImageNet-style folder; the class count is read from the folder
    "imagenet": DatasetInfo("imagenet", 3, 224, 1000, _IMAGENET_MEAN, _IMAGENET_STD),
    "synthetic": DatasetInfo("synthetic", 3, 32, 10, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)),
    # dense tasks: generated shapes (3 shape classes; segmentation adds the background), COCO
    # (image_size: the shorter side after resizing), Cityscapes (image_size: the training crop)
    "shapes": DatasetInfo("shapes", 3, 64, 4, _IMAGENET_MEAN, _IMAGENET_STD, task="dense"),
    "coco": DatasetInfo("coco", 3, 600, 80, _IMAGENET_MEAN, _IMAGENET_STD, task="detection"),
    "cityscapes": DatasetInfo("cityscapes", 3, 768, 19, _IMAGENET_MEAN, _IMAGENET_STD, task="segmentation"),
}

FASHION_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")  # Debian's dataset-fashion-mnist
FASHION_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}

# What torchvision expects under the data folder, for the error messages.
_TORCHVISION_LAYOUT = {
    "cifar10": "cifar-10-batches-py/",
    "svhn": "train_32x32.mat and test_32x32.mat",
    "stl10": "stl10_binary/",
}


def dataset_info(name: str, image_size: int | None = None, task: str | None = None) -> DatasetInfo:
    """Static information about dataset ``name`` (at ``image_size`` if given) for ``task``
    (a model's task; None: the dataset's own); reads no data."""
    key = str(name).strip().lower()
    if key not in _INFO:
        raise ManppError(f"unknown dataset {name!r}; expected {choices(DATASETS)}")
    info = _INFO[key]
    if task is not None and task != info.task and not (info.task == "dense" and task in TASK_DATASETS):
        fits = TASK_DATASETS.get(task) or [n for n, i in _INFO.items() if i.task == "classification"]
        raise ManppError(f"dataset {key!r} is for {info.task if info.task != 'dense' else 'dense tasks'}, but the "
                         f"model does {task}: use {choices(fits)}")
    if info.task == "dense":
        info = dataclasses.replace(info, task=task or "segmentation", num_classes=3 if task == "detection" else 4)
    if image_size is None or image_size == info.image_size:
        return info
    if key not in _RESIZABLE:
        raise ManppError(f"dataset {key!r} has a fixed image size of {info.image_size} px; image_size="
                         f"{image_size} is possible for {choices(_RESIZABLE)}")
    if not isinstance(image_size, int) or image_size < 16:
        raise ManppError(f"image_size must be an integer of at least 16 pixels, got {image_size!r}")
    return dataclasses.replace(info, image_size=image_size)


def _dense(info: DatasetInfo, data_dir, augment: bool, seed: int):
    from . import dense

    if info.name == "shapes":
        kind = dense.ShapesDetection if info.task == "detection" else dense.ShapesSegmentation
        n_train, n_test = SHAPES_SAMPLES
        return (kind(n_train, image_size=info.image_size, seed=seed, augment=augment),
                kind(n_test, image_size=info.image_size, seed=seed + 7919, augment=False), info)
    root = _data_root(data_dir)
    if info.name == "coco":
        train = dense.CocoDetection(root, "train", augment=augment)
        test = dense.CocoDetection(root, "val", augment=False)
        return train, test, dataclasses.replace(info, num_classes=train.num_classes)
    train = dense.CityscapesSegmentation(root, "train", augment=augment, crop_size=info.image_size)
    return train, dense.CityscapesSegmentation(root, "val", augment=False), info


def _stats(info: DatasetInfo, like: Tensor) -> tuple[Tensor, Tensor]:
    mean = torch.tensor(info.mean, dtype=like.dtype, device=like.device).view(-1, 1, 1)
    std = torch.tensor(info.std, dtype=like.dtype, device=like.device).view(-1, 1, 1)
    return mean, std


def normalize(x: Tensor, info: DatasetInfo) -> Tensor:
    """Map [0, 1] pixels (N, C, H, W or C, H, W) to normalised values: (x - mean) / std."""
    mean, std = _stats(info, x)
    return (x - mean) / std


def denormalize(x: Tensor, info: DatasetInfo) -> Tensor:
    """Map a normalised batch (N, C, H, W or C, H, W) back to [0, 1] pixels: x * std + mean."""
    mean, std = _stats(info, x)
    return x * std + mean


class TensorImageDataset(Dataset):
    """Images and labels held in memory; ``images`` is float (N, C, H, W), already normalised."""

    def __init__(self, images: Tensor, labels: Tensor, transform: Callable[[Tensor], Tensor] | None = None):
        if images.ndim != 4 or labels.ndim != 1 or len(images) != len(labels):
            raise ValueError(f"need images (N, C, H, W) and labels (N,); got {tuple(images.shape)} and "
                             f"{tuple(labels.shape)}")
        self.images = images
        self.labels = labels.long()
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        image = self.images[index]
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.labels[index])


class RandomCropFlip:
    """Random crop of the image padded by ``padding`` on each side, then an optional 50% horizontal flip.

    Works on a C x H x W tensor and keeps its size. The padding takes the per-channel value
    ``fill``; with normalised images pass the normalised black, ``-mean / std``, so that it is
    zero padding in pixel space.
    """

    def __init__(self, padding: int, flip: bool, fill: Sequence[float] = (0.0,)):
        self.padding = padding
        self.flip = flip
        self.fill = torch.tensor(tuple(fill), dtype=torch.float32).view(-1, 1, 1)

    def __call__(self, image: Tensor) -> Tensor:
        c, h, w = image.shape
        # Crop offset (i, j) in the padded image = shift of the content by (dy, dx).
        i, j = torch.randint(0, 2 * self.padding + 1, (2,)).tolist()
        dy, dx = i - self.padding, j - self.padding
        out = self.fill.to(image.dtype).expand(c, h, w).clone()
        out[:, max(0, -dy):h - max(0, dy), max(0, -dx):w - max(0, dx)] = \
            image[:, max(0, dy):h - max(0, -dy), max(0, dx):w - max(0, -dx)]
        if self.flip and torch.rand(()).item() < 0.5:
            out = out.flip(-1)
        return out

    def __repr__(self) -> str:
        return f"RandomCropFlip(padding={self.padding}, flip={self.flip})"


def _black(info: DatasetInfo) -> tuple[float, ...]:
    """The normalised value of a zero pixel, per channel."""
    return tuple(-m / s for m, s in zip(info.mean, info.std))


def _data_root(data_dir: str | Path | None) -> Path:
    if data_dir is None:
        return Path("data")
    root = Path(data_dir).expanduser()
    if not root.exists():
        raise ManppError(f"data folder '{data_dir}' does not exist; pass an existing folder, "
                         f"or no data_dir to use './data'")
    if not root.is_dir():
        raise ManppError(f"data folder '{data_dir}' is not a folder; pass an existing folder, "
                         f"or no data_dir to use './data'")
    return root


def _reason(exc: BaseException) -> str:
    """A short one-line description of an exception."""
    text = " ".join(str(exc).split()) or "no details"
    if len(text) > 200:
        text = text[:197] + "..."
    return f"{type(exc).__name__}: {text}"


# --- digits ---------------------------------------------------------------------------------

def _digits(augment: bool) -> tuple[TensorImageDataset, TensorImageDataset]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    info = _INFO["digits"]
    bunch = load_digits()
    images = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
    images = F.interpolate(images, size=(32, 32), mode="bilinear", align_corners=False, antialias=False)
    images = normalize(images, info)
    labels = torch.as_tensor(bunch.target, dtype=torch.long)
    train_idx, test_idx = train_test_split(np.arange(len(labels)), test_size=0.2, stratify=bunch.target,
                                           random_state=0)
    train_idx, test_idx = torch.as_tensor(train_idx), torch.as_tensor(test_idx)
    transform = RandomCropFlip(2, flip=False, fill=_black(info)) if augment else None
    return (TensorImageDataset(images[train_idx], labels[train_idx], transform),
            TensorImageDataset(images[test_idx], labels[test_idx]))


# --- fashion-mnist --------------------------------------------------------------------------

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


def _fashion_files(data_dir: str | Path | None, download: bool) -> dict[str, Path]:
    root = _data_root(data_dir)
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
        FashionMNIST(str(root), train=True, download=True)
    except (OSError, RuntimeError, ValueError) as exc:  # URLError is an OSError
        raise ManppError(f"fashion-mnist files ({wanted}) not found in {where}, and the download into "
                         f"'{torchvision_dir}' failed (offline?): {_reason(exc)}; copy the files into one of "
                         f"those folders (or install Debian's dataset-fashion-mnist package)") from exc
    files = _find_idx_files(torchvision_dir)
    if files is None:
        raise ManppError(f"fashion-mnist was downloaded but the files ({wanted}) are not in '{torchvision_dir}'")
    return files


def _load_fashion_split(images_path: Path, labels_path: Path, info: DatasetInfo) -> tuple[Tensor, Tensor]:
    images, labels = read_idx_images(images_path), read_idx_labels(labels_path)
    if len(images) != len(labels):
        raise ManppError(f"'{images_path}' holds {len(images)} images but '{labels_path}' holds "
                         f"{len(labels)} labels; they must match")
    if images.shape[1:] != (28, 28):
        raise ManppError(f"'{images_path}' holds {images.shape[1]}x{images.shape[2]} images; "
                         f"fashion-mnist images are 28x28")
    if len(labels) and labels.max() >= info.num_classes:
        raise ManppError(f"'{labels_path}' holds label {int(labels.max())}; "
                         f"fashion-mnist labels are 0 to {info.num_classes - 1}")
    x = torch.from_numpy(images.astype(np.float32)).div_(255.0).unsqueeze(1)
    x = normalize(F.pad(x, (2, 2, 2, 2)), info)
    return x, torch.from_numpy(labels.astype(np.int64))


def _fashion(data_dir: str | Path | None, download: bool,
             augment: bool) -> tuple[TensorImageDataset, TensorImageDataset]:
    info = _INFO["fashion-mnist"]
    files = _fashion_files(data_dir, download)
    train = _load_fashion_split(files["train_images"], files["train_labels"], info)
    test = _load_fashion_split(files["test_images"], files["test_labels"], info)
    transform = RandomCropFlip(2, flip=True, fill=_black(info)) if augment else None
    return TensorImageDataset(*train, transform), TensorImageDataset(*test)


# --- torchvision datasets -------------------------------------------------------------------

def torchvision_transforms(name: str, augment: bool = True) -> tuple[Callable, Callable]:
    """(train, test) transforms from a PIL image or uint8 HxWxC array to a normalised float tensor."""
    from torchvision.transforms import v2

    info = dataset_info(name)
    if info.name == "cifar10":
        augmentation = [v2.RandomCrop(32, padding=4, padding_mode="reflect"), v2.RandomHorizontalFlip()]
    elif info.name == "svhn":
        augmentation = [v2.RandomCrop(32, padding=2)]
    elif info.name == "stl10":
        augmentation = [v2.RandomCrop(96, padding=4), v2.RandomHorizontalFlip()]
    else:
        raise ManppError(f"dataset {name!r} is not a torchvision dataset; expected {choices(_TORCHVISION_LAYOUT)}")
    to_tensor = [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(info.mean), list(info.std)),
                 v2.ToPureTensor()]
    train = v2.Compose([v2.ToImage(), *(augmentation if augment else []), *to_tensor])
    test = v2.Compose([v2.ToImage(), *to_tensor])
    return train, test


def _torchvision(name: str, data_dir: str | Path | None, download: bool,
                 augment: bool) -> tuple[Dataset, Dataset]:
    root = _data_root(data_dir)
    train_tf, test_tf = torchvision_transforms(name, augment)
    from torchvision import datasets

    try:
        if name == "cifar10":
            train = datasets.CIFAR10(str(root), train=True, transform=train_tf, download=download)
            test = datasets.CIFAR10(str(root), train=False, transform=test_tf, download=download)
        elif name == "svhn":
            train = datasets.SVHN(str(root), split="train", transform=train_tf, download=download)
            test = datasets.SVHN(str(root), split="test", transform=test_tf, download=download)
        else:
            train = datasets.STL10(str(root), split="train", transform=train_tf, download=download)
            test = datasets.STL10(str(root), split="test", transform=test_tf, download=download)
    except ImportError as exc:  # SVHN reads .mat files with scipy
        raise ManppError(f"dataset {name!r} needs a missing package: {_reason(exc)}") from exc
    except (OSError, RuntimeError, ValueError) as exc:  # URLError is an OSError
        layout, root = _TORCHVISION_LAYOUT[name], root.absolute()
        if download:
            raise ManppError(f"dataset {name!r} is not in '{root}' and could not be downloaded (offline?): "
                             f"{_reason(exc)}; put {layout} in '{root}' (copied from a machine with internet "
                             f"access) or pass another data_dir") from exc
        raise ManppError(f"dataset {name!r} not found in '{root}' and download=False: {_reason(exc)}; "
                         f"put {layout} in '{root}' or allow the download") from exc
    return train, test


# --- ImageNet-style folders -----------------------------------------------------------------

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".JPEG")


def imagenet_transforms(image_size: int, augment: bool = True) -> tuple[Callable, Callable]:
    """RandomResizedCrop + flip for training; resize to 256/224 of the size + centre crop for testing."""
    from torchvision.transforms import v2

    to_tensor = [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(_IMAGENET_MEAN), list(_IMAGENET_STD)),
                 v2.ToPureTensor()]
    crop = [v2.RandomResizedCrop(image_size, antialias=True), v2.RandomHorizontalFlip()] if augment else \
        [v2.Resize(round(image_size * 256 / 224), antialias=True), v2.CenterCrop(image_size)]
    train = v2.Compose([v2.ToImage(), *crop, *to_tensor])
    test = v2.Compose([v2.ToImage(), v2.Resize(round(image_size * 256 / 224), antialias=True),
                       v2.CenterCrop(image_size), *to_tensor])
    return train, test


def _class_folders(split: Path) -> list[str]:
    return sorted(d.name for d in split.iterdir() if d.is_dir() and not d.name.startswith("."))


def _image_folders(data_dir: str | Path | None, info: DatasetInfo, augment: bool) -> tuple[Dataset, Dataset, DatasetInfo]:
    """``train/<class>/*`` and ``val/<class>/*`` under ``data_dir``, read with torchvision's ImageFolder."""
    root = _data_root(data_dir)
    layout = "train/<class>/<image> and val/<class>/<image>"
    splits = {}
    for split in ("train", "val"):
        folder = root / split
        if not folder.is_dir():
            raise ManppError(f"imagenet: '{folder}' is not a folder; the data folder '{root}' must hold {layout}")
        classes = _class_folders(folder)
        if not classes:
            raise ManppError(f"imagenet: '{folder}' has no class folders; expected {layout}")
        splits[split] = classes
    if splits["train"] != splits["val"]:
        only_train = sorted(set(splits["train"]) - set(splits["val"]))[:3]
        only_val = sorted(set(splits["val"]) - set(splits["train"]))[:3]
        raise ManppError(f"imagenet: the class folders of train/ and val/ differ (only in train: {only_train}, "
                         f"only in val: {only_val}); both must have the same classes")
    from torchvision.datasets import ImageFolder

    train_tf, test_tf = imagenet_transforms(info.image_size, augment)
    try:
        train = ImageFolder(str(root / "train"), transform=train_tf)
        test = ImageFolder(str(root / "val"), transform=test_tf)
    except (FileNotFoundError, RuntimeError) as exc:  # a class folder without images
        raise ManppError(f"imagenet: cannot read '{root}': {_reason(exc)}; every class folder needs images "
                         f"({', '.join(IMAGE_EXTENSIONS[:4])}, ...)") from None
    return train, test, dataclasses.replace(info, num_classes=len(splits["train"]))


# --- synthetic ------------------------------------------------------------------------------

def _synthetic(samples: tuple[int, int], seed: int, info: DatasetInfo) -> tuple[TensorImageDataset, TensorImageDataset]:
    """Class template + Gaussian noise; templates are smooth (8x8 upsampled) random colour images."""
    if (not isinstance(samples, (tuple, list)) or len(samples) != 2
            or not all(isinstance(n, numbers.Integral) and not isinstance(n, bool) and n > 0 for n in samples)):
        raise ManppError(f"synthetic_samples={samples!r} is invalid; expected (n_train, n_test), "
                         f"two positive integers")
    k, c, size = info.num_classes, info.in_channels, info.image_size
    generator = torch.Generator().manual_seed(int(seed))
    templates = F.interpolate(torch.randn(k, c, 8, 8, generator=generator), size=(size, size),
                              mode="bilinear", align_corners=False)
    templates = (templates - templates.mean()) / templates.std()

    def draw(n: int) -> TensorImageDataset:
        labels = torch.randperm(n, generator=generator) % k
        noise = torch.randn(n, c, size, size, generator=generator)
        return TensorImageDataset(0.8 * templates[labels] + 0.6 * noise, labels)

    return draw(int(samples[0])), draw(int(samples[1]))


def build_datasets(name: str, data_dir: str | Path | None = None, *, augment: bool = True, download: bool = True,
                   synthetic_samples: tuple[int, int] = (512, 128), seed: int = 0,
                   image_size: int | None = None, task: str | None = None) -> tuple[Dataset, Dataset, DatasetInfo]:
    """Build ``(train, test, info)`` for one of :data:`DATASETS`.

    ``data_dir`` (default ``./data``) is where file-based datasets live; ``digits`` and
    ``synthetic`` ignore it. ``augment`` switches the training augmentation, ``download`` lets
    torchvision fetch what is missing, ``synthetic_samples`` and ``seed`` shape ``synthetic``.
    ``image_size`` sets the side of ``imagenet`` (default 224) and ``synthetic`` images; the
    ``imagenet`` info takes its class count from the folder.
    """
    info = dataset_info(name, image_size=image_size, task=task)
    if info.task != "classification":
        return _dense(info, data_dir, augment, seed)
    if info.name == "digits":
        train, test = _digits(augment)
    elif info.name == "fashion-mnist":
        train, test = _fashion(data_dir, download, augment)
    elif info.name == "synthetic":
        train, test = _synthetic(synthetic_samples, seed, info)
    elif info.name == "imagenet":
        return _image_folders(data_dir, info, augment)
    else:
        train, test = _torchvision(info.name, data_dir, download, augment)
    return train, test, info
