"""Tasks: what a batch looks like, the last module's loss, and the evaluation metric.

A task is built by name from the backbone it trains (``backbone.task_name``; classifiers declare
none and get ``classification``); each task registers itself (:mod:`manpp.tasks.registry`) and
owns its metric's names. The model builder hands the task's ``loss`` to the engine as
the final module's loss; the training loop asks the task to move a batch to the device
(``prepare``), to count training hits (``train_hits``) and to evaluate (``evaluate``, whose
``metric`` is the run's score: accuracy, mIoU or COCO AP).
"""

from __future__ import annotations

from .classification import ClassificationTask, Task
from .detection import DetectionTargets, DetectionTask, coco_map
from .registry import TASKS, metric_label, metric_title, register_task
from .segmentation import SegmentationTask, confusion_matrix, pixel_cross_entropy, segmentation_metrics


def build_task(name: str, backbone=None) -> Task:
    """The task ``name`` for ``backbone`` (detection and segmentation read their settings from it)."""
    return TASKS.get(name).for_backbone(backbone)


def task_of(backbone) -> Task:
    """The task of ``backbone``: ``backbone.task_name``, classification when it declares none."""
    return build_task(getattr(backbone, "task_name", "classification"), backbone)


__all__ = ["ClassificationTask", "DetectionTargets", "DetectionTask", "SegmentationTask", "TASKS", "Task",
           "build_task", "coco_map", "confusion_matrix", "metric_label", "metric_title", "pixel_cross_entropy",
           "register_task", "segmentation_metrics", "task_of"]
