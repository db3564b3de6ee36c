"""Object detection with RetinaNet: torchvision's transform, anchors, matching, loss and decoding;
COCO box AP with pycocotools."""

from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass

import torch

from ..base import distributed
from ..core.engine import LocalContext
from ..data import ShapesDetection, detection_collate
from .classification import Task
from .registry import register_task


@dataclass
class DetectionTargets:
    """Targets of a detection batch after the detector's transform (resized, padded images)."""

    boxes: list[dict[str, torch.Tensor]]  # per image: boxes (xyxy, transformed image), labels
    image_sizes: list[tuple[int, int]]  # size of each image inside the padded batch
    original_sizes: list[tuple[int, int]]
    image_ids: list[int]

    def __len__(self) -> int:
        return len(self.boxes)


@register_task
class DetectionTask(Task):
    """RetinaNet: torchvision's transform, anchors, matching, focal + smooth-L1 loss, decoding and
    NMS; COCO AP with pycocotools' COCOeval."""

    name = "detection"
    metric = "map"
    metric_label = "AP"
    metric_title = "AP (COCO box AP@[.5:.95])"
    collate = staticmethod(detection_collate)

    def __init__(self, detector, anchor_base: int = 32):
        self.detector = detector  # a torchvision RetinaNet sharing the backbone's head
        self.anchor_base = anchor_base  # anchor size at stride 8 (32 in the paper)

    @classmethod
    def for_backbone(cls, backbone) -> "DetectionTask":
        return cls(backbone.detector, backbone.anchor_base)

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
        was_training = model.training
        model.eval()
        results, image_ids = [], []
        amp = getattr(model, "amp_dtype", None)
        dataset = base_dataset(batches.dataset)
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
        data = ShapesDetection(n, image_size=info.image_size, seed=0)
        return self.prepare(detection_collate([data[i] for i in range(n)]), device)


def base_dataset(dataset):
    """The dataset under any ``Subset`` wrappers."""
    while isinstance(dataset, torch.utils.data.Subset):
        dataset = dataset.dataset
    return dataset


COCO_STATS = ("map", "map50", "map75", "map_small", "map_medium", "map_large")


def coco_map(ground_truth: dict, results: list[dict], image_ids=None) -> dict[str, float]:
    """COCO box AP (AP, AP50, AP75, APs/m/l) of ``results`` against a COCO-format dict, with COCOeval,
    over ``image_ids`` (default: every image of the ground truth)."""
    from ..base.extras import require

    COCO = require("pycocotools.coco", "COCO box AP (detection evaluation)").COCO
    COCOeval = require("pycocotools.cocoeval", "COCO box AP (detection evaluation)").COCOeval
    keep = set(image_ids) if image_ids is not None else {im["id"] for im in ground_truth["images"]}
    ids = sorted(keep)
    results = [r for r in results if r["image_id"] in keep]  # one set for all detections: linear time
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
