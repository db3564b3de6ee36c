"""Datasets for object detection and semantic segmentation.

* ``ShapesSegmentation`` / ``ShapesDetection``: procedurally drawn circles, squares and
  triangles on a smooth background (:func:`make_shapes`), for fast CPU checks.
* ``CocoDetection``: COCO 2017 detection from a folder (read with pycocotools).
* ``CityscapesSegmentation``: Cityscapes fine semantic labels, mapped to the 19 training ids.

Detection items are ``(image, target)`` with ``image`` float (3, H, W) in [0, 1] (the detector
normalises) and ``target = {"boxes": float32 (m, 4) xyxy, "labels": int64 (m,), "image_id": int}``;
labels are contiguous, 0 to ``num_classes - 1``, and ``category_ids[label]`` is the COCO category
id. Segmentation items are ``(image, mask)`` with an ImageNet-normalised image and a long mask
(``ignore_index`` = 255 for pixels without a class). Random augmentation draws from torch's global
RNG, like :mod:`manpp.data.datasets`. torchvision and pycocotools are imported only when needed.
"""

from __future__ import annotations

import contextlib
import io
import math
import numbers
import warnings
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from ..errors import ManppError, choices
from .datasets import _IMAGENET_MEAN, _IMAGENET_STD, _reason

SHAPE_CLASSES: tuple[str, ...] = ("circle", "square", "triangle")

IGNORE_INDEX = 255
_MIN_VISIBLE_AREA = 20  # pixels; a shape hidden below this is removed from image, mask and boxes
_POSITION_CANDIDATES = 8  # positions tried per shape; the one farthest from earlier shapes wins
_COLOUR_CANDIDATES = 4  # colours tried per shape; the one farthest from the background wins


# --- synthetic shapes -----------------------------------------------------------------------

def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _hsv_to_rgb(h: Tensor, s: Tensor, v: Tensor) -> Tensor:
    """HSV in [0, 1] (any shape) to RGB with a trailing channel axis."""
    channels = []
    for n in (5.0, 3.0, 1.0):  # R, G, B
        k = (n + h * 6.0) % 6.0
        channels.append(v - v * s * torch.clamp(torch.minimum(k, 4.0 - k), 0.0, 1.0))
    return torch.stack(channels, dim=-1)


def _smooth_noise(n: int, size: int, cells: int, g: torch.Generator) -> Tensor:
    """(n, 3, size, size) bicubic upsampling of uniform noise in [-0.5, 0.5] on a cells x cells grid."""
    # bicubic upsampling is separable: one (size, cells) matrix per axis
    basis = F.interpolate(torch.eye(cells).view(cells, 1, cells, 1), size=(size, 1), mode="bicubic",
                          align_corners=False).view(cells, size)
    coarse = torch.rand(n, 3, cells, cells, generator=g) - 0.5
    return basis.t() @ coarse @ basis


def _half_widths(kinds: Tensor, sides: Tensor, dy: Tensor) -> Tensor:
    """Half width of each shape on each pixel row, -1 outside the shape.

    ``dy`` is the row centre minus the shape's top, (n, slots, S, 1); a pixel belongs to the shape
    when its centre is within the half width of the vertical axis.
    """
    side = sides[..., None, None]
    radius = side / 2
    circle = torch.sqrt(torch.clamp(radius ** 2 - (dy - radius) ** 2, min=0.0))
    square = radius.expand_as(dy)
    triangle = dy / 2  # upright: apex at the top, base of width ``side`` at the bottom
    kind = kinds[..., None, None]
    width = torch.where(kind == 0, circle, torch.where(kind == 1, square, triangle))
    return torch.where((dy >= 0) & (dy <= side), width, torch.full_like(width, -1.0))


def _instance_map(inside: Tensor, alive: Tensor) -> Tensor:
    """(n, S, S) map of the top live shape at each pixel: slot index + 1, 0 for background."""
    n, slots, size, _ = inside.shape
    instances = torch.zeros(n, size, size, dtype=torch.long)
    for k in range(slots):  # later slots paint over earlier ones
        instances.masked_fill_(inside[:, k] & alive[:, k, None, None], k + 1)
    return instances


def _areas(instances: Tensor, slots: int) -> Tensor:
    """Pixel count (n, slots) of every slot in the instance map."""
    n = len(instances)
    keys = instances.view(n, -1) + (slots + 1) * torch.arange(n).view(-1, 1)
    return torch.bincount(keys.view(-1), minlength=n * (slots + 1)).view(n, slots + 1)[:, 1:]


def _tight_boxes(instances: Tensor, slots: int) -> Tensor:
    """Tight xyxy boxes (n, slots, 4) of each slot's pixels (a pixel at column i spans [i, i + 1])."""
    n, size, _ = instances.shape
    # in_column[i, s, x]: slot s - 1 has a pixel in column x of image i (s = 0: background)
    in_column = torch.zeros(n, slots + 1, size, dtype=torch.uint8).scatter_(1, instances, 1)
    in_row = torch.zeros(n, slots + 1, size, dtype=torch.uint8).scatter_(1, instances.transpose(1, 2), 1)
    x1, y1 = in_column.argmax(dim=2), in_row.argmax(dim=2)
    x2, y2 = size - in_column.flip(2).argmax(dim=2), size - in_row.flip(2).argmax(dim=2)
    return torch.stack([x1, y1, x2, y2], dim=2)[:, 1:].float()


def make_shapes(n: int, image_size: int = 64, seed: int = 0,
                max_shapes: int = 3) -> tuple[Tensor, Tensor, list[tuple[Tensor, Tensor]]]:
    """Draw ``n`` RGB images of 1 to ``max_shapes`` circles, squares and upright triangles.

    Returns ``(images, masks, targets)``: images float32 (n, 3, S, S) in [0, 1]; masks long
    (n, S, S) with 0 for background and 1 + the index in :data:`SHAPE_CLASSES`; per image
    ``(boxes, labels)`` with float32 xyxy boxes (m, 4) tightly around the visible pixels of each
    shape (a pixel at column i spans x in [i, i + 1]) and long labels (m,) in 0..2, in drawing
    order. Later shapes paint over earlier ones; a shape left with fewer than 20 visible pixels is
    not drawn at all. The same ``seed`` gives the same data.
    """
    if not _is_int(n) or n < 1:
        raise ManppError(f"make_shapes: n={n!r} is invalid; expected a positive number of images")
    if not _is_int(image_size) or image_size < 16:
        raise ManppError(f"make_shapes: image_size={image_size!r} is invalid; expected an integer of at least 16")
    if not _is_int(max_shapes) or max_shapes < 1:
        raise ManppError(f"make_shapes: max_shapes={max_shapes!r} is invalid; expected a positive integer")
    n, size, slots = int(n), int(image_size), int(max_shapes)
    g = torch.Generator().manual_seed(int(seed))

    def uniform(low: float, high: float, *shape: int) -> Tensor:
        return low + (high - low) * torch.rand(*shape, generator=g)

    # Background: a muted base colour plus smooth low-frequency colour noise (pixel noise comes last).
    base = uniform(0.3, 0.6, n, 1, 1, 1) + uniform(-0.08, 0.08, n, 3, 1, 1)
    background = base + 0.3 * _smooth_noise(n, size, 4, g)
    mean_colour = background.mean(dim=(2, 3))  # (n, 3)

    # Shape parameters per image and slot: kind, side, top-left corner, colour.
    count = torch.randint(1, slots + 1, (n,), generator=g)
    alive = torch.arange(slots).view(1, -1) < count.view(-1, 1)  # (n, slots)
    kinds = torch.randint(0, len(SHAPE_CLASSES), (n, slots), generator=g)
    low, high = max(0.12 * size, 8.0), max(0.40 * size, 8.0)
    sides = uniform(low, high, n, slots)
    corners = torch.empty(n, slots, 2)
    for k in range(slots):
        # several candidate corners; keep the one with the most clearance from the earlier shapes
        free = (size - sides[:, k]).view(n, 1, 1)
        candidates = torch.rand(n, _POSITION_CANDIDATES, 2, generator=g) * free
        if k == 0:
            corners[:, 0] = candidates[:, 0]
            continue
        centres = candidates + sides[:, k].view(n, 1, 1) / 2  # (n, C, 2)
        earlier = corners[:, :k] + sides[:, :k, None] / 2  # (n, k, 2)
        gap = torch.cdist(centres, earlier) - (sides[:, k].view(n, 1, 1) + sides[:, None, :k]) / 2
        gap = gap.masked_fill(~alive[:, None, :k], math.inf).amin(dim=2)  # (n, C)
        corners[:, k] = candidates[torch.arange(n), gap.argmax(dim=1)]
    hue = torch.rand(n, slots, _COLOUR_CANDIDATES, generator=g)
    colours = _hsv_to_rgb(hue, uniform(0.75, 1.0, n, slots, _COLOUR_CANDIDATES),
                          uniform(0.8, 1.0, n, slots, _COLOUR_CANDIDATES))  # (n, slots, C, 3)
    distance = (colours - mean_colour[:, None, None, :]).norm(dim=-1)
    colours = colours.gather(2, distance.argmax(dim=2)[..., None, None].expand(-1, -1, 1, 3)).squeeze(2)

    # Which pixel centres lie in which shape: (n, slots, S, S).
    coords = torch.arange(size, dtype=torch.float32) + 0.5
    dy = coords.view(1, 1, -1, 1) - corners[..., 1, None, None]  # (n, slots, S, 1)
    dx = coords.view(1, 1, 1, -1) - (corners[..., 0] + sides / 2)[..., None, None]  # (n, slots, 1, S)
    inside = dx.abs() <= _half_widths(kinds, sides, dy)

    # Drop shapes hidden below the minimum area; removing one only uncovers earlier shapes (and
    # cannot shrink any other), so one pass suffices.
    alive &= _areas(_instance_map(inside, alive), slots) >= _MIN_VISIBLE_AREA
    instances = _instance_map(inside, alive)

    palette = torch.cat([torch.zeros(n, 1, 3), colours], dim=1)  # slot 0 = background (unused)
    painted = palette.gather(1, instances.view(n, -1, 1).expand(-1, -1, 3)).view(n, size, size, 3)
    images = torch.where(instances[:, None] > 0, painted.permute(0, 3, 1, 2), background)
    images = images.add_(uniform(-0.04, 0.04, n, 1, size, size)).clamp_(0.0, 1.0)  # grey pixel noise
    classes = torch.cat([torch.zeros(n, 1, dtype=torch.long), kinds + 1], dim=1)
    masks = classes.gather(1, instances.view(n, -1)).view(n, size, size)

    boxes, counts = _tight_boxes(instances, slots)[alive], alive.sum(dim=1).tolist()
    targets = list(zip(boxes.split(counts), kinds[alive].split(counts)))
    return images.contiguous(), masks, targets


def _flip_boxes(boxes: Tensor, width: int) -> Tensor:
    """Mirror xyxy boxes of an image ``width`` pixels wide."""
    flipped = boxes.clone()
    flipped[:, 0] = width - boxes[:, 2]
    flipped[:, 2] = width - boxes[:, 0]
    return flipped


def _coin() -> bool:
    return bool(torch.rand(()).item() < 0.5)


def _normalize(image: Tensor) -> Tensor:
    mean = torch.tensor(_IMAGENET_MEAN, dtype=image.dtype).view(-1, 1, 1)
    std = torch.tensor(_IMAGENET_STD, dtype=image.dtype).view(-1, 1, 1)
    return (image - mean) / std


class ShapesSegmentation(Dataset):
    """Semantic segmentation of :func:`make_shapes` images: ``(normalised image, long mask)``."""

    num_classes = 1 + len(SHAPE_CLASSES)
    ignore_index = IGNORE_INDEX
    class_names: tuple[str, ...] = ("background",) + SHAPE_CLASSES

    def __init__(self, n: int, image_size: int = 64, seed: int = 0, augment: bool = False):
        images, self.masks, _ = make_shapes(n, image_size=image_size, seed=seed)
        self.images = _normalize(images)
        self.augment = augment

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        image, mask = self.images[index], self.masks[index]
        if self.augment and _coin():
            image, mask = image.flip(-1), mask.flip(-1)
        return image, mask


class ShapesDetection(Dataset):
    """Object detection on :func:`make_shapes` images: ``(image in [0, 1], target dict)``."""

    num_classes = len(SHAPE_CLASSES)
    class_names = SHAPE_CLASSES
    category_ids = [1, 2, 3]

    def __init__(self, n: int, image_size: int = 64, seed: int = 0, augment: bool = False):
        self.images, _, self.targets = make_shapes(n, image_size=image_size, seed=seed)
        self.image_size = int(image_size)
        self.augment = augment

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[Tensor, dict[str, Any]]:
        image, (boxes, labels) = self.images[index], self.targets[index]
        if self.augment and _coin():
            image, boxes = image.flip(-1), _flip_boxes(boxes, self.image_size)
        return image, {"boxes": boxes.clone(), "labels": labels.clone(), "image_id": int(index)}

    def coco_ground_truth(self) -> dict[str, Any]:
        """The un-augmented boxes as a COCO-format dict; image ids are the dataset indices."""
        size = self.image_size
        images, annotations = [], []
        for i, (boxes, labels) in enumerate(self.targets):
            images.append({"id": i, "width": size, "height": size, "file_name": f"shapes_{i:06d}.png"})
            for (x1, y1, x2, y2), label in zip(boxes.tolist(), labels.tolist()):
                w, h = x2 - x1, y2 - y1
                annotations.append({"id": len(annotations) + 1, "image_id": i,
                                    "category_id": self.category_ids[label], "bbox": [x1, y1, w, h],
                                    "area": w * h, "iscrowd": 0})
        categories = [{"id": c, "name": name} for c, name in zip(self.category_ids, self.class_names)]
        return {"images": images, "annotations": annotations, "categories": categories}


# --- COCO -----------------------------------------------------------------------------------

def _decode(path: Path | str, mode: str) -> Tensor:
    """Decode an image file as uint8 (C, H, W); ``mode`` is 'RGB' or 'GRAY'."""
    from torchvision.io import ImageReadMode, decode_image

    with warnings.catch_warnings():  # torchvision 0.29 deprecates its decoders in favour of torchcodec
        warnings.filterwarnings("ignore", message=".*TorchVision are deprecated", category=DeprecationWarning)
        return decode_image(str(path), mode=getattr(ImageReadMode, mode))


def _read_rgb(path: Path | str) -> Tensor:
    """An image file as float (3, H, W) in [0, 1]."""
    try:
        image = _decode(path, "RGB")
    except (OSError, RuntimeError, ValueError) as exc:
        raise ManppError(f"cannot read image '{path}': {_reason(exc)}; expected a readable JPEG or PNG file") from exc
    return image.float().div_(255.0)


def _existing_folder(root: str | Path, what: str, layout: str) -> Path:
    folder = Path(root).expanduser()
    if not folder.is_dir():
        state = "does not exist" if not folder.exists() else "is not a folder"
        raise ManppError(f"{what}: data folder '{root}' {state}; expected a folder holding {layout}")
    return folder


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
        root = _existing_folder(root, "coco", layout)
        annotation_file = root / "annotations" / f"instances_{split}2017.json"
        if not annotation_file.is_file():
            raise ManppError(f"coco: annotation file '{annotation_file}' not found; '{root}' must hold {layout}")
        candidates = (root / f"{split}2017", root / "images" / f"{split}2017")
        image_dir = next((d for d in candidates if d.is_dir()), None)
        if image_dir is None:
            raise ManppError(f"coco: image folder '{candidates[0]}' (or '{candidates[1]}') not found; "
                             f"'{root}' must hold {layout}")
        try:
            from pycocotools.coco import COCO
        except ImportError as exc:
            raise ManppError(f"coco: reading COCO needs the package pycocotools ({_reason(exc)}); "
                             f"install it with 'pip install pycocotools'") from exc
        try:
            with contextlib.redirect_stdout(io.StringIO()):  # COCO prints its progress
                self.coco = COCO(str(annotation_file))
        except (OSError, ValueError, KeyError, TypeError, AssertionError) as exc:  # bad JSON: ValueError
            raise ManppError(f"coco: cannot load '{annotation_file}': {_reason(exc)}; expected a COCO "
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
        image = _read_rgb(self.image_dir / self.coco.imgs[target["image_id"]]["file_name"])
        if self.augment and _coin():
            image, target["boxes"] = image.flip(-1), _flip_boxes(target["boxes"], image.shape[-1])
        return image, target

    def coco_ground_truth(self) -> dict[str, Any]:
        """The annotation file's COCO dict, as loaded by pycocotools."""
        return self.coco.dataset


# --- Cityscapes -----------------------------------------------------------------------------

CITYSCAPES_CLASSES: tuple[str, ...] = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign", "vegetation",
    "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle",
)
_CITYSCAPES_TRAIN_IDS = (7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33)


def cityscapes_lookup() -> Tensor:
    """Long (256,) table from a Cityscapes label id to its training id (255 = ignored)."""
    table = torch.full((256,), IGNORE_INDEX, dtype=torch.long)
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
        crop = (crop_size, crop_size) if _is_int(crop_size) else \
            tuple(crop_size) if isinstance(crop_size, (tuple, list)) else ()
        if len(crop) != 2 or not all(_is_int(c) and c > 0 for c in crop):
            raise ManppError(f"cityscapes: crop_size={crop_size!r} is invalid; expected a positive integer "
                             f"or (height, width)")
        low, high = (float(s) for s in scale_range)
        if not 0 < low <= high:
            raise ManppError(f"cityscapes: scale_range={scale_range!r} is invalid; expected (low, high) "
                             f"with 0 < low <= high")
        root = _existing_folder(root, "cityscapes", layout)
        from torchvision.datasets import Cityscapes

        try:
            found = Cityscapes(str(root), split=split, mode="fine", target_type="semantic")
        except (OSError, RuntimeError, ValueError) as exc:
            raise ManppError(f"cityscapes: no {split!r} split in '{root}' ({_reason(exc)}); expected {layout}") from exc
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
        image = _read_rgb(image_path)
        try:
            labels = _decode(label_path, "GRAY")[0]
        except (OSError, RuntimeError, ValueError) as exc:
            raise ManppError(f"cannot read label image '{label_path}': {_reason(exc)}; expected a PNG of "
                             f"Cityscapes label ids") from exc
        if labels.shape != image.shape[1:]:
            raise ManppError(f"cityscapes: '{label_path}' is {tuple(labels.shape)} but its image is "
                             f"{tuple(image.shape[1:])}; they must have the same size")
        return image, self.lookup[labels.long()]

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        image, mask = self.read(index)
        image = _normalize(image)
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
        if _coin():
            image, mask = image.flip(-1), mask.flip(-1)
        return image.contiguous(), mask.contiguous()


def detection_collate(batch: Sequence[tuple[Tensor, dict[str, Any]]]) -> tuple[list[Tensor], list[dict[str, Any]]]:
    """Batch detection items of any image size as (list of images, list of targets)."""
    images, targets = [], []
    for image, target in batch:
        images.append(image)
        targets.append(target)
    return images, targets
