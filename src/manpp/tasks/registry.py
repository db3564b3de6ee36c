"""Tasks by name, each owning its metric and how the metric is written.

A task registers its class in its own file (``@register_task``); ``task_name`` on a backbone picks
it (classifiers declare none and get ``classification``). What the command line, the summaries and
the comparison tables print about a run's score (``acc``, ``mIoU``, ``AP``) is read from here.
"""

from __future__ import annotations

from ..base.registry import Registry

TASKS: Registry = Registry("task")


def register_task(cls):
    """Class decorator: ``cls.name`` becomes a task; ``cls.metric`` (the key of its evaluation that
    scores a run), ``metric_label`` (short, for tables) and ``metric_title`` (for sentences) its score."""
    for attribute in ("name", "metric", "metric_label", "metric_title"):
        if not getattr(cls, attribute, None):
            raise ValueError(f"task {cls.__name__} declares no {attribute}")
    TASKS.add(cls.name, cls)
    return cls


def _by_metric(metric: str):
    return next((cls for cls in TASKS.values() if cls.metric == metric), None)


def metric_label(metric: str) -> str:
    """A score's short name (``acc``, ``mIoU``, ``AP``), for tables and progress lines."""
    cls = _by_metric(metric)
    return cls.metric_label if cls is not None else metric


def metric_title(metric: str) -> str:
    """A score's name in a sentence (``accuracy``, ``mIoU``, ``AP (COCO box AP@[.5:.95])``)."""
    cls = _by_metric(metric)
    return cls.metric_title if cls is not None else metric


__all__ = ["TASKS", "metric_label", "metric_title", "register_task"]
