"""What several dataset families share: in-memory datasets, the crop-and-flip augmentation,
the checks of the data folder and small helpers for error messages and random choices.

Random augmentation draws from torch's global RNG, so seeding torch makes it reproducible with
``num_workers=0``.
"""

from __future__ import annotations

import contextlib
import numbers
import shutil
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from ..base.errors import ManppError
from .info import DatasetInfo

IGNORE_INDEX = 255  # the mask value of pixels without a class (Cityscapes' convention)
DEFAULT_DATA_DIR = Path("data")  # where file-based datasets live when no data_dir is given
MAX_REASON_CHARS = 200  # longest exception description in an error message


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

    def __init__(self, padding: int, flip: bool, fill: Sequence[float] = (0.0,), reflect: bool = False):
        self.padding = padding
        self.flip = flip
        self.fill = torch.tensor(tuple(fill), dtype=torch.float32).view(-1, 1, 1)
        self.reflect = reflect  # pad by mirroring the border (torchvision's padding_mode='reflect') instead of fill

    def __call__(self, image: Tensor) -> Tensor:
        c, h, w = image.shape
        # Crop offset (i, j) in the padded image = shift of the content by (dy, dx).
        i, j = torch.randint(0, 2 * self.padding + 1, (2,)).tolist()
        if self.reflect:
            out = F.pad(image[None], (self.padding,) * 4, mode="reflect")[0, :, i:i + h, j:j + w].clone()
        else:
            dy, dx = i - self.padding, j - self.padding
            out = self.fill.to(image.dtype).expand(c, h, w).clone()
            out[:, max(0, -dy):h - max(0, dy), max(0, -dx):w - max(0, dx)] = \
                image[:, max(0, dy):h - max(0, -dy), max(0, dx):w - max(0, -dx)]
        if self.flip and coin_flip():
            out = out.flip(-1)
        return out

    def __repr__(self) -> str:
        return f"RandomCropFlip(padding={self.padding}, flip={self.flip}, reflect={self.reflect})"


def normalized_black(info: DatasetInfo) -> tuple[float, ...]:
    """The normalised value of a zero pixel, per channel."""
    return tuple(-m / s for m, s in zip(info.mean, info.std))


def coin_flip() -> bool:
    """True with probability 1/2, drawn from torch's global RNG."""
    return bool(torch.rand(()).item() < 0.5)


def is_integer(value: Any) -> bool:
    """Whether ``value`` is an integer (of any integral type) and not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def data_root(data_dir: str | Path | None) -> Path:
    """The data folder: ``data_dir`` when it is an existing folder, ``./data`` when None."""
    if data_dir is None:
        return DEFAULT_DATA_DIR
    root = Path(data_dir).expanduser()
    if not root.exists():
        raise ManppError(f"data folder '{data_dir}' does not exist; pass an existing folder, "
                         f"or no data_dir to use './data'")
    if not root.is_dir():
        raise ManppError(f"data folder '{data_dir}' is not a folder; pass an existing folder, "
                         f"or no data_dir to use './data'")
    return root


def existing_folder(root: str | Path, what: str, layout: str) -> Path:
    """``root`` as a Path when it is a folder; else an error naming dataset ``what`` and its ``layout``."""
    folder = Path(root).expanduser()
    if not folder.is_dir():
        state = "does not exist" if not folder.exists() else "is not a folder"
        raise ManppError(f"{what}: data folder '{root}' {state}; expected a folder holding {layout}")
    return folder


def describe_exception(exc: BaseException) -> str:
    """A short one-line description of an exception."""
    text = " ".join(str(exc).split()) or "no details"
    if len(text) > MAX_REASON_CHARS:
        text = text[:MAX_REASON_CHARS - 3] + "..."
    return f"{type(exc).__name__}: {text}"


@contextlib.contextmanager
def removed_on_failure(*paths: Path):
    """Undo a failed download: each of ``paths`` (folders or files) that did not exist before and
    exists after an exception is removed again, the deepest first, so no empty or half-written
    dataset folder is left behind to look like data."""
    new = [Path(p) for p in paths if not Path(p).exists()]
    try:
        yield
    except BaseException:
        for path in sorted(new, key=lambda p: len(p.parts), reverse=True):
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            elif path.exists():
                path.unlink()
        raise
