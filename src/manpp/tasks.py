"""Tasks: what a batch looks like, the last module's loss, and the evaluation metric.

A backbone may carry a ``task``; classifiers do not and get :data:`CLASSIFICATION`. The engine
asks the task for the final module's loss; the training loop asks it to move a batch to the
device (``prepare``), to count training hits (``train_hits``) and to evaluate (``evaluate``,
whose ``metric`` is the run's score: accuracy, mIoU or COCO AP).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch.nn import functional as F

from .objectives import LocalContext, task_loss


def task_of(backbone) -> "Task":
    return getattr(backbone, "task", None) or CLASSIFICATION


class Task:
    name = "classification"
    metric = "accuracy"  # the key of evaluate()'s result that scores a run
    collate = None  # DataLoader collate_fn (None: the default)

    def prepare(self, batch, device: torch.device, memory_format=torch.contiguous_format):
        inputs, targets = batch
        return (inputs.to(device, non_blocking=True, memory_format=memory_format),
                targets.to(device, non_blocking=True))

    def loss(self, output, ctx: LocalContext) -> torch.Tensor:
        return task_loss(output, ctx)

    def train_hits(self, output, targets) -> torch.Tensor | None:
        """``[correct, count]`` of a training batch (float64), or None where it means nothing."""
        return torch.stack([(output.argmax(1) == targets).sum().double(),
                            torch.tensor(targets.numel(), dtype=torch.float64, device=targets.device)])

    def evaluate(self, model, batches, device, *, reduce: bool = False) -> dict[str, float]:
        from .engine import evaluate

        return evaluate(model, batches, device, reduce=reduce)

    def example_batch(self, n: int, info, device) -> tuple[Any, Any]:
        """A batch of random data of the dataset's shape (for ``bench`` and ``describe``)."""
        g = torch.Generator().manual_seed(0)
        x = torch.randn(n, info.in_channels, info.image_size, info.image_size, generator=g)
        y = torch.randint(0, info.num_classes, (n,), generator=g)
        return self.prepare((x, y), device)


CLASSIFICATION = Task()


class SegmentationTask(Task):
    """Per-pixel cross-entropy (``ignore_index`` ignored) on logits upsampled to the mask; mIoU."""

    name = "segmentation"
    metric = "miou"

    def __init__(self, num_classes: int, ignore_index: int = 255):
        self.num_classes, self.ignore_index = num_classes, ignore_index

    def upsample(self, logits: torch.Tensor, size) -> torch.Tensor:
        if logits.shape[-2:] == tuple(size):
            return logits
        return F.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=False)

    def loss(self, output, ctx: LocalContext) -> torch.Tensor:
        return pixel_cross_entropy(self.upsample(output, ctx.targets.shape[-2:]), ctx.targets, self.ignore_index)

    def train_hits(self, output, targets):
        pred = self.upsample(output, targets.shape[-2:]).argmax(1)
        valid = targets != self.ignore_index
        return torch.stack([((pred == targets) & valid).sum().double(), valid.sum().double()])

    @torch.no_grad()
    def evaluate(self, model, batches, device, *, reduce: bool = False) -> dict[str, float]:
        was_training = model.training
        model.eval()
        confusion = torch.zeros(self.num_classes, self.num_classes, dtype=torch.float64, device=device)
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        amp = getattr(model, "amp_dtype", None)
        for batch in batches:
            inputs, targets = self.prepare(batch, device)
            with torch.autocast(inputs.device.type, dtype=amp, enabled=amp is not None):
                logits = self.upsample(model(inputs), targets.shape[-2:]).float()
            loss_sum += F.cross_entropy(logits, targets, ignore_index=self.ignore_index, reduction="sum").double()
            confusion += confusion_matrix(logits.argmax(1), targets, self.num_classes, self.ignore_index)
        model.train(was_training)
        if reduce:
            from . import distributed

            confusion = distributed.all_reduce_sum(confusion)
            loss_sum = distributed.all_reduce_sum(loss_sum)
        return segmentation_metrics(confusion.cpu(), float(loss_sum))

    def example_batch(self, n: int, info, device):
        g = torch.Generator().manual_seed(0)
        x = torch.randn(n, info.in_channels, info.image_size, info.image_size, generator=g)
        y = torch.randint(0, self.num_classes, (n, info.image_size, info.image_size), generator=g)
        return self.prepare((x, y), device)


def pixel_cross_entropy(logits: torch.Tensor, target: torch.Tensor, ignore_index: int = 255) -> torch.Tensor:
    """Mean cross-entropy over the pixels that are not ``ignore_index``; 0 (not NaN) when a batch has none."""
    total = F.cross_entropy(logits.float(), target, ignore_index=ignore_index, reduction="sum")
    return total / (target != ignore_index).sum().clamp(min=1)


def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int, ignore_index: int = 255):
    """``m[t, p]``: number of pixels of true class t predicted as p (ignored pixels left out)."""
    valid = target != ignore_index
    idx = target[valid].long() * num_classes + pred[valid].long()
    return torch.bincount(idx, minlength=num_classes ** 2).reshape(num_classes, num_classes).double()


def segmentation_metrics(confusion: torch.Tensor, loss_sum: float = 0.0) -> dict[str, float]:
    """mIoU over the classes present in the ground truth or the prediction, per-class IoU, pixel accuracy."""
    tp = confusion.diag()
    union = confusion.sum(0) + confusion.sum(1) - tp
    iou = tp / union.clamp(min=1)
    seen = union > 0
    total = float(confusion.sum())
    out = {"miou": float(iou[seen].mean()) if seen.any() else 0.0,
           "pixel_accuracy": float(tp.sum()) / max(total, 1.0), "loss": loss_sum / max(total, 1.0)}
    out.update({f"iou_{c}": float(iou[c]) if seen[c] else float("nan") for c in range(len(iou))})
    return out


@dataclass
class DetectionTargets:
    """Targets of a detection batch after the detector's transform (resized, padded images)."""

    boxes: list[dict[str, torch.Tensor]]  # per image: boxes (xyxy, transformed image), labels
    image_sizes: list[tuple[int, int]]  # size of each image inside the padded batch
    original_sizes: list[tuple[int, int]]
    image_ids: list[int]

    def __len__(self) -> int:
        return len(self.boxes)


def detection_collate(batch):
    images, targets = zip(*batch)
    return list(images), list(targets)


class DetectionTask(Task):
    """RetinaNet: torchvision's transform, anchors, matching, focal + smooth-L1 loss, decoding and
    NMS; COCO AP with pycocotools' COCOeval."""

    name = "detection"
    metric = "map"
    collate = staticmethod(detection_collate)

    def __init__(self, detector, anchor_base: int = 32):
        self.detector = detector  # a torchvision RetinaNet sharing the backbone's head
        self.anchor_base = anchor_base  # anchor size at stride 8 (32 in the paper)

    def prepare(self, batch, device, memory_format=torch.contiguous_format):
        images, targets = batch
        images = [im.to(device, non_blocking=True) for im in images]
        targets = [{"boxes": t["boxes"].to(device).float(), "labels": t["labels"].to(device).long()}
                   for t in targets]
        original = [tuple(im.shape[-2:]) for im in images]
        ids = [int(t.get("image_id", i)) for i, t in enumerate(batch[1])]
        image_list, targets = self.detector.transform(images, targets)
        return (image_list.tensors.contiguous(memory_format=memory_format),
                DetectionTargets(targets, list(image_list.image_sizes), original, ids))

    def anchors(self, inputs: torch.Tensor, image_sizes, features, generator=None):
        from torchvision.models.detection.image_list import ImageList

        return (generator or self.detector.anchor_generator)(ImageList(inputs, image_sizes), features)

    def loss(self, output, ctx: LocalContext) -> torch.Tensor:
        head = {"cls_logits": output["cls_logits"].float(), "bbox_regression": output["bbox_regression"].float()}
        anchors = self.anchors(ctx.inputs, ctx.targets.image_sizes, output["features"])
        losses = self.detector.compute_loss(ctx.targets.boxes, head, anchors)
        return losses["classification"] + losses["bbox_regression"]

    def train_hits(self, output, targets):
        return None

    def detect(self, output: dict, inputs, targets: DetectionTargets) -> list[dict[str, torch.Tensor]]:
        """Boxes, scores and labels per image, in the original image's coordinates."""
        features = output["features"]
        anchors = self.anchors(inputs, targets.image_sizes, features)
        per_level = [f.shape[2] * f.shape[3] for f in features]
        a = output["cls_logits"].shape[1] // sum(per_level)
        per_level = [n * a for n in per_level]
        split = {k: list(output[k].float().split(per_level, dim=1)) for k in ("cls_logits", "bbox_regression")}
        split_anchors = [list(x.split(per_level)) for x in anchors]
        dets = self.detector.postprocess_detections(split, split_anchors, targets.image_sizes)
        return self.detector.transform.postprocess(dets, targets.image_sizes, targets.original_sizes)

    @torch.no_grad()
    def evaluate(self, model, batches, device, *, reduce: bool = False) -> dict[str, float]:
        from . import distributed

        was_training = model.training
        model.eval()
        results, image_ids = [], []
        amp = getattr(model, "amp_dtype", None)
        dataset = _base_dataset(batches.dataset)
        labels_to_ids = list(getattr(dataset, "category_ids", range(1, 10_000)))
        for batch in batches:
            inputs, targets = self.prepare(batch, device)
            with torch.autocast(inputs.device.type, dtype=amp, enabled=amp is not None):
                output = model(inputs)
            for image_id, det in zip(targets.image_ids, self.detect(output, inputs, targets)):
                for box, score, label in zip(det["boxes"].tolist(), det["scores"].tolist(), det["labels"].tolist()):
                    x0, y0, x1, y1 = box
                    results.append({"image_id": image_id, "category_id": labels_to_ids[label],
                                    "bbox": [x0, y0, x1 - x0, y1 - y0], "score": score})
            image_ids += targets.image_ids
        model.train(was_training)
        if reduce and distributed.is_initialized():
            results = [r for part in distributed.gather_objects(results) for r in part]
            image_ids = [i for part in distributed.gather_objects(image_ids) for i in part]
        return coco_map(dataset.coco_ground_truth(), results, image_ids)

    def example_batch(self, n: int, info, device):
        from .data.dense import ShapesDetection

        data = ShapesDetection(n, image_size=info.image_size, seed=0)
        return self.prepare(detection_collate([data[i] for i in range(n)]), device)


def _base_dataset(dataset):
    while isinstance(dataset, torch.utils.data.Subset):
        dataset = dataset.dataset
    return dataset


COCO_STATS = ("map", "map50", "map75", "map_small", "map_medium", "map_large")


def coco_map(ground_truth: dict, results: list[dict], image_ids=None) -> dict[str, float]:
    """COCO box AP (AP, AP50, AP75, APs/m/l) of ``results`` against a COCO-format dict, with COCOeval,
    over ``image_ids`` (default: every image of the ground truth)."""
    import contextlib
    import io

    try:
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval
    except ImportError as exc:  # a dependency; here only if the environment lacks it
        from .errors import ManppError

        raise ManppError("detection evaluation needs pycocotools: pip install pycocotools") from exc
    ids = sorted(set(image_ids) if image_ids is not None else {im["id"] for im in ground_truth["images"]})
    results = [r for r in results if r["image_id"] in set(ids)]
    if not results:
        return {k: 0.0 for k in COCO_STATS}
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = ground_truth
        gt.createIndex()
        dt = gt.loadRes(results)
        ev = COCOeval(gt, dt, "bbox")
        ev.params.imgIds = ids
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return {k: max(0.0, float(v)) for k, v in zip(COCO_STATS, ev.stats[:6])}
