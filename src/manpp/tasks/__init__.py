"""Tasks: what a batch looks like, the last module's loss, and the evaluation metric.

A task is built by name from the backbone it trains (``backbone.task_name``; classifiers declare
none and get ``classification``). The model builder hands the task's ``loss`` to the engine as
the final module's loss; the training loop asks the task to move a batch to the device
(``prepare``), to count training hits (``train_hits``) and to evaluate (``evaluate``, whose
``metric`` is the run's score: accuracy, mIoU or COCO AP).
"""

from __future__ import annotations

from typing import Callable

from ..errors import ManppError, choices
from .classification import ClassificationTask, Task
from .detection import DetectionTargets, DetectionTask, coco_map
from .segmentation import SegmentationTask, confusion_matrix, pixel_cross_entropy, segmentation_metrics

TASKS: dict[str, Callable] = {
    "classification": lambda backbone: ClassificationTask(),
    "segmentation": SegmentationTask.for_backbone,
    "detection": DetectionTask.for_backbone,
}


def build_task(name: str, backbone=None) -> Task:
    """The task ``name`` for ``backbone`` (detection and segmentation read their settings from it)."""
    if name not in TASKS:
        raise ManppError(f"unknown task {name!r}: accepted are {choices(TASKS)}")
    return TASKS[name](backbone)


def task_of(backbone) -> Task:
    """The task of ``backbone``: ``backbone.task_name``, classification when it declares none."""
    return build_task(getattr(backbone, "task_name", "classification"), backbone)


__all__ = ["ClassificationTask", "DetectionTargets", "DetectionTask", "SegmentationTask", "TASKS", "Task",
           "build_task", "coco_map", "confusion_matrix", "pixel_cross_entropy", "segmentation_metrics", "task_of"]
