"""Cityscapes fine semantic segmentation, mapped to the 19 training ids (files found by torchvision,
imported only when built).

Items are ``(image, mask)`` with an ImageNet-normalised float image (3, H, W) and a long mask
(H, W) of training ids, :data:`IGNORE_INDEX` for pixels without a class. Random augmentation
draws from torch's global RNG.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from ..base.errors import ManppError, choices
from .common import IGNORE_INDEX, coin_flip, data_root, describe_exception, existing_folder, is_integer
from .images import decode_image_file, read_rgb
from .info import IMAGENET_MEAN, IMAGENET_STD, DatasetInfo, normalize_imagenet, register_dataset

CITYSCAPES_CLASSES: tuple[str, ...] = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign", "vegetation",
    "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle",
)
# The label ids of the 19 classes above; their training id is their position here.
_CITYSCAPES_TRAIN_IDS = (7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33)
_LABEL_IDS = 256  # label images are 8-bit PNGs


def cityscapes_lookup() -> Tensor:
    """Long (256,) table from a Cityscapes label id to its training id (255 = ignored)."""
    table = torch.full((_LABEL_IDS,), IGNORE_INDEX, dtype=torch.long)
    table[torch.tensor(_CITYSCAPES_TRAIN_IDS)] = torch.arange(len(_CITYSCAPES_TRAIN_IDS))
    return table


class CityscapesSegmentation(Dataset):
    """Cityscapes fine semantic segmentation with the 19 training classes.

    Wraps ``torchvision.datasets.Cityscapes`` to find the files. Training (``augment=True``):
    random rescale by a factor in ``scale_range``, random ``crop_size`` crop (the normalised image
    padded with 0, the mask with 255 where the image is smaller), random horizontal flip.
    Evaluation: the full image.
    """

    SPLITS = ("train", "val", "test")
    num_classes = len(CITYSCAPES_CLASSES)
    ignore_index = IGNORE_INDEX
    class_names = CITYSCAPES_CLASSES

    def __init__(self, root: str | Path, split: str = "train", augment: bool = False,
                 crop_size: int | Sequence[int] = 768, scale_range: tuple[float, float] = (0.5, 2.0)):
        layout = (f"leftImg8bit/{split}/<city>/*_leftImg8bit.png and "
                  f"gtFine/{split}/<city>/*_gtFine_labelIds.png")
        if split not in self.SPLITS:
            raise ManppError(f"cityscapes: unknown split {split!r}; expected {choices(self.SPLITS)}")
        crop = (crop_size, crop_size) if is_integer(crop_size) else \
            tuple(crop_size) if isinstance(crop_size, (tuple, list)) else ()
        if len(crop) != 2 or not all(is_integer(c) and c > 0 for c in crop):
            raise ManppError(f"cityscapes: crop_size={crop_size!r} is invalid; expected a positive integer "
                             f"or (height, width)")
        low, high = (float(s) for s in scale_range)
        if not 0 < low <= high:
            raise ManppError(f"cityscapes: scale_range={scale_range!r} is invalid; expected (low, high) "
                             f"with 0 < low <= high")
        root = existing_folder(root, "cityscapes", layout)
        from torchvision.datasets import Cityscapes

        try:
            found = Cityscapes(str(root), split=split, mode="fine", target_type="semantic")
        except (OSError, RuntimeError, ValueError) as exc:
            raise ManppError(f"cityscapes: no {split!r} split in '{root}' ({describe_exception(exc)}); "
                             f"expected {layout}") from exc
        pairs = sorted((image, target[0]) for image, target in zip(found.images, found.targets)
                       if image.endswith("_leftImg8bit.png"))
        if not pairs:
            raise ManppError(f"cityscapes: no images in '{root / 'leftImg8bit' / split}'; expected {layout}")
        missing = next((t for _, t in pairs if not Path(t).is_file()), None)
        if missing is not None:
            raise ManppError(f"cityscapes: label file '{missing}' not found; expected {layout}")
        self.root, self.split, self.augment = root, split, augment
        self.files: list[tuple[str, str]] = pairs
        self.crop_size: tuple[int, int] = (int(crop[0]), int(crop[1]))
        self.scale_range = (low, high)
        self.lookup = cityscapes_lookup()

    def __len__(self) -> int:
        return len(self.files)

    def read(self, index: int) -> tuple[Tensor, Tensor]:
        """Item ``index`` without augmentation: image float (3, H, W) in [0, 1], trainId mask long (H, W)."""
        image_path, label_path = self.files[index]
        image = read_rgb(image_path)
        try:
            labels = decode_image_file(label_path, "GRAY")[0]
        except (OSError, RuntimeError, ValueError) as exc:
            raise ManppError(f"cannot read label image '{label_path}': {describe_exception(exc)}; expected a PNG "
                             f"of Cityscapes label ids") from exc
        if labels.shape != image.shape[1:]:
            raise ManppError(f"cityscapes: '{label_path}' is {tuple(labels.shape)} but its image is "
                             f"{tuple(image.shape[1:])}; they must have the same size")
        return image, self.lookup[labels.long()]

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        image, mask = self.read(index)
        image = normalize_imagenet(image)
        if self.augment:
            image, mask = self._augment(image, mask)
        return image, mask

    def _augment(self, image: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        low, high = self.scale_range
        scale = low + (high - low) * torch.rand(()).item()
        h, w = mask.shape
        size = (max(1, round(h * scale)), max(1, round(w * scale)))
        if size != (h, w):
            image = F.interpolate(image[None], size=size, mode="bilinear", align_corners=False,
                                  antialias=scale < 1)[0]
            mask = F.interpolate(mask[None, None].float(), size=size, mode="nearest")[0, 0].long()
        ch, cw = self.crop_size
        pad_h, pad_w = max(ch - size[0], 0), max(cw - size[1], 0)
        if pad_h or pad_w:
            image = F.pad(image, (0, pad_w, 0, pad_h), value=0.0)
            mask = F.pad(mask, (0, pad_w, 0, pad_h), value=IGNORE_INDEX)
        h, w = mask.shape
        top = int(torch.randint(0, h - ch + 1, ()).item())
        left = int(torch.randint(0, w - cw + 1, ()).item())
        image, mask = image[:, top:top + ch, left:left + cw], mask[top:top + ch, left:left + cw]
        if coin_flip():
            image, mask = image.flip(-1), mask.flip(-1)
        return image.contiguous(), mask.contiguous()


def build_cityscapes(info: DatasetInfo, data_dir: str | Path | None,
                     augment: bool) -> tuple[Dataset, Dataset, DatasetInfo]:
    """(train, val, info) of Cityscapes under the data folder; training crops ``info.image_size`` pixels."""
    root = data_root(data_dir)
    train = CityscapesSegmentation(root, "train", augment=augment, crop_size=info.image_size)
    return train, CityscapesSegmentation(root, "val", augment=False), info


# image_size: the training crop
@register_dataset("cityscapes", reads_files=True, channels=3, image_size=768, classes=19, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                  task="segmentation", resizable=True)
def _build(info, *, data_dir, augment: bool, **_):
    return build_cityscapes(info, data_dir, augment)
