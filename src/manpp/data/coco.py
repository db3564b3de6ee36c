"""COCO 2017 object detection from a folder, read with pycocotools (imported only when built).

Items are ``(image, target)`` with ``image`` float (3, H, W) in [0, 1] (the detector normalises)
and ``target = {"boxes": float32 (m, 4) xyxy, "labels": int64 (m,), "image_id": int}``; labels are
contiguous, 0 to ``num_classes - 1``, and ``category_ids[label]`` is the COCO category id.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import math
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset

from ..base.errors import ManppError, choices
from .common import coin_flip, data_root, describe_exception, existing_folder
from .detection import flip_boxes
from .images import read_rgb
from .info import IMAGENET_MEAN, IMAGENET_STD, DatasetInfo, register_dataset


class CocoDetection(Dataset):
    """COCO 2017 detection (``split`` 'train' or 'val') from ``root``.

    Accepted layouts: ``root/<split>2017/*.jpg`` or ``root/images/<split>2017/*.jpg``, with
    ``root/annotations/instances_<split>2017.json``. Crowd boxes and boxes under 1 px wide or high
    are dropped; images without boxes are kept. ``augment`` adds a random horizontal flip.
    """

    SPLITS = ("train", "val")

    def __init__(self, root: str | Path, split: str = "train", augment: bool = False):
        if split not in self.SPLITS:
            raise ManppError(f"coco: unknown split {split!r}; expected {choices(self.SPLITS)}")
        layout = (f"{split}2017/*.jpg (or images/{split}2017/*.jpg) and "
                  f"annotations/instances_{split}2017.json")
        root = existing_folder(root, "coco", layout)
        annotation_file = root / "annotations" / f"instances_{split}2017.json"
        if not annotation_file.is_file():
            raise ManppError(f"coco: annotation file '{annotation_file}' not found; '{root}' must hold {layout}")
        candidates = (root / f"{split}2017", root / "images" / f"{split}2017")
        image_dir = next((d for d in candidates if d.is_dir()), None)
        if image_dir is None:
            raise ManppError(f"coco: image folder '{candidates[0]}' (or '{candidates[1]}') not found; "
                             f"'{root}' must hold {layout}")
        from ..base.extras import require

        COCO = require("pycocotools.coco", "the coco dataset").COCO
        try:
            with contextlib.redirect_stdout(io.StringIO()):  # COCO prints its progress
                self.coco = COCO(str(annotation_file))
        except (OSError, ValueError, KeyError, TypeError, AssertionError) as exc:  # bad JSON: ValueError
            raise ManppError(f"coco: cannot load '{annotation_file}': {describe_exception(exc)}; expected a COCO "
                             f"instances JSON file") from exc
        self.root, self.split, self.augment = root, split, augment
        self.image_dir, self.annotation_file = image_dir, annotation_file
        self.category_ids: list[int] = sorted(self.coco.getCatIds())
        self.class_names: tuple[str, ...] = tuple(self.coco.cats[c]["name"] for c in self.category_ids)
        self.num_classes = len(self.category_ids)
        self._label_of = {c: i for i, c in enumerate(self.category_ids)}
        self.image_ids: list[int] = sorted(self.coco.getImgIds())

    def __len__(self) -> int:
        return len(self.image_ids)

    def target(self, index: int) -> dict[str, Any]:
        """The un-augmented target of item ``index`` (reads no image)."""
        image_id = self.image_ids[index]
        info = self.coco.imgs[image_id]
        width, height = float(info.get("width", math.inf)), float(info.get("height", math.inf))
        boxes, labels = [], []
        for ann in self.coco.imgToAnns.get(image_id, []):
            x, y, w, h = (float(v) for v in ann["bbox"])
            if ann.get("iscrowd", 0) or w < 1 or h < 1:
                continue
            x1, y1 = max(x, 0.0), max(y, 0.0)
            x2, y2 = min(x + w, width), min(y + h, height)
            if x2 - x1 < 1 or y2 - y1 < 1:
                continue
            boxes.append([x1, y1, x2, y2])
            labels.append(self._label_of[ann["category_id"]])
        return {"boxes": torch.tensor(boxes, dtype=torch.float32).view(-1, 4),
                "labels": torch.tensor(labels, dtype=torch.int64), "image_id": int(image_id)}

    def __getitem__(self, index: int) -> tuple[Tensor, dict[str, Any]]:
        target = self.target(index)
        image = read_rgb(self.image_dir / self.coco.imgs[target["image_id"]]["file_name"])
        if self.augment and coin_flip():
            image, target["boxes"] = image.flip(-1), flip_boxes(target["boxes"], image.shape[-1])
        return image, target

    def coco_ground_truth(self) -> dict[str, Any]:
        """The annotation file's COCO dict, as loaded by pycocotools."""
        return self.coco.dataset


def build_coco(info: DatasetInfo, data_dir: str | Path | None, augment: bool) -> tuple[Dataset, Dataset, DatasetInfo]:
    """(train, val, info) of COCO 2017 under the data folder; the info takes the class count of the annotations."""
    root = data_root(data_dir)
    train = CocoDetection(root, "train", augment=augment)
    test = CocoDetection(root, "val", augment=False)
    return train, test, dataclasses.replace(info, num_classes=train.num_classes)


# image_size: the shorter side after resizing
@register_dataset("coco", reads_files=True, channels=3, image_size=600, classes=80, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                  task="detection", resizable=True)
def _build(info, *, data_dir, augment: bool, **_):
    return build_coco(info, data_dir, augment)
