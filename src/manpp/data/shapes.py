"""Generated detection and segmentation data: circles, squares and upright triangles drawn on a
smooth background (:func:`make_shapes`), for fast CPU checks.

``ShapesDetection`` items are ``(image in [0, 1], target dict)`` (the detector normalises);
``ShapesSegmentation`` items are ``(ImageNet-normalised image, long mask)``. The whole data is drawn
in memory from a seed; random augmentation (a horizontal flip) draws from torch's global RNG.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from ..base.errors import ManppError
from .common import IGNORE_INDEX, coin_flip, is_integer
from .detection import flip_boxes
from .info import IMAGENET_MEAN, IMAGENET_STD, MIN_IMAGE_SIZE, DatasetInfo, normalize_imagenet, register_dataset

SHAPE_CLASSES: tuple[str, ...] = ("circle", "square", "triangle")
SHAPES_SAMPLES = (1024, 256)  # generated training and test images of the shapes dataset
# Added to the seed of the test split so that it draws other images than the training split;
# any large offset would do (7919 is the 1000th prime).
SHAPES_TEST_SEED_OFFSET = 7919

_MIN_VISIBLE_AREA = 20  # pixels; a shape hidden below this is removed from image, mask and boxes
_POSITION_CANDIDATES = 8  # positions tried per shape; the one farthest from earlier shapes wins
_COLOUR_CANDIDATES = 4  # colours tried per shape; the one farthest from the background wins


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
    if not is_integer(n) or n < 1:
        raise ManppError(f"make_shapes: n={n!r} is invalid; expected a positive number of images")
    if not is_integer(image_size) or image_size < MIN_IMAGE_SIZE:
        raise ManppError(f"make_shapes: image_size={image_size!r} is invalid; expected an integer of at least "
                         f"{MIN_IMAGE_SIZE}")
    if not is_integer(max_shapes) or max_shapes < 1:
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


class ShapesSegmentation(Dataset):
    """Semantic segmentation of :func:`make_shapes` images: ``(normalised image, long mask)``."""

    num_classes = 1 + len(SHAPE_CLASSES)
    ignore_index = IGNORE_INDEX
    class_names: tuple[str, ...] = ("background",) + SHAPE_CLASSES

    def __init__(self, n: int, image_size: int = 64, seed: int = 0, augment: bool = False):
        images, self.masks, _ = make_shapes(n, image_size=image_size, seed=seed)
        self.images = normalize_imagenet(images)
        self.augment = augment

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        image, mask = self.images[index], self.masks[index]
        if self.augment and coin_flip():
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
        if self.augment and coin_flip():
            image, boxes = image.flip(-1), flip_boxes(boxes, self.image_size)
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


def build_shapes(info: DatasetInfo, seed: int, augment: bool) -> tuple[Dataset, Dataset, DatasetInfo]:
    """(train, test, info) of :data:`SHAPES_SAMPLES` images for ``info.task`` (detection or segmentation)."""
    kind = ShapesDetection if info.task == "detection" else ShapesSegmentation
    n_train, n_test = SHAPES_SAMPLES
    return (kind(n_train, image_size=info.image_size, seed=seed, augment=augment),
            kind(n_test, image_size=info.image_size, seed=seed + SHAPES_TEST_SEED_OFFSET, augment=False), info)


# 3 shape classes for detection; segmentation adds the background
SHAPES_CLASSES_BY_TASK = {"segmentation": len(SHAPE_CLASSES) + 1, "detection": len(SHAPE_CLASSES)}


@register_dataset("shapes", channels=3, image_size=64, classes=SHAPES_CLASSES_BY_TASK["segmentation"],
                  mean=IMAGENET_MEAN, std=IMAGENET_STD, task="dense", resizable=True,
                  classes_by_task=SHAPES_CLASSES_BY_TASK)
def _build(info, *, seed: int, augment: bool, **_):
    return build_shapes(info, seed, augment)
