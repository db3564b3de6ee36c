"""What a run reports about itself: ``summary.json``, the divergence check, and the short texts of
its progress lines.

``status`` is one of :data:`STATUSES`:

- ``running``: a process is training it now (or was killed without a word: see
  :func:`manpp.run.rundir.status_of`);
- ``finished``: every epoch trained;
- ``stopped``: ``max_steps`` reached, or a stop signal (SIGINT, SIGTERM, SIGUSR1): ``reason`` says
  which, ``signal`` holds its number; resume it;
- ``diverged``: a loss, a weight or a logged value stopped being finite;
- ``failed``: an unexpected error; ``reason`` holds its first line.
"""

from __future__ import annotations

import math

import torch

from ..config import trainconfig as C
from ..core.engine import LocalModel
from ..tasks.registry import metric_label

STATUSES = ("running", "finished", "stopped", "diverged", "failed")
ENDED = ("finished", "stopped", "diverged", "failed")


def divergence(model: torch.nn.Module, row: dict) -> str | None:
    """What shows that training diverged: the first parameter or buffer holding a NaN or an
    infinity, else the first loss, scale or EMA distance in the row that is not finite; None
    when everything is finite."""
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            return f"'{name}' holds a NaN or an infinity"
    for key, value in row.items():  # not the per-class scores: an IoU of a class never seen is NaN by design
        watched = key in ("train_loss", "test_loss") or key.startswith(("loss_", "scale_", "ema_dist_"))
        if watched and isinstance(value, float) and not math.isfinite(value):
            if key == "test_loss":  # the weights are finite, but not what the model computes from them
                return (f"test_loss is {value} (the model's outputs in eval mode are not finite; BatchNorm "
                        f"statistics from tiny batches can do this too)")
            return f"{key} is {value}"
    return None


def metric_text(metric: str, value: float) -> str:
    return f"{metric_label(metric)} {value:.2%}"


def summary(cfg: C.TrainConfig, model: LocalModel, history: list[dict], memory: dict | None, device, metric: str,
            status: str = "finished", reason: str | None = None, **extra) -> dict:
    """What ``summary.json`` holds: how the run ended (``status``, one of :data:`STATUSES`, and why),
    final and best scores, memory, time, sizes and the short history.

    ``epochs`` counts the completed epochs; a row of an epoch cut short (``max_steps``, or the
    first part of an epoch later resumed) has ``complete`` false."""
    if status not in STATUSES:
        raise ValueError(f"unknown run status {status!r}: one of {STATUSES}")
    memory = memory or {}
    steps_per_epoch = max(1, history[0]["steps_per_epoch"]) if history else 0
    per_step = sum(h["epoch_time_s"] for h in history) / max(1, sum(h["steps"] for h in history))
    last = history[-1] if history else {}
    return {
        "status": status, "reason": reason, "signal": extra.pop("signal", 0),
        "method": cfg.method, "model": cfg.model, "dataset": cfg.dataset, "modules": model.k,
        "partition": model.partition.label,
        "objective": cfg.objective,  # resolved (manpp.train.build.resolved): None where the method fixes its own
        "epochs": sum(1 for h in history if h.get("complete", True)), "epochs_planned": cfg.epochs,
        "steps": extra.pop("step", last.get("step", 0)),
        "test_accuracy": last.get("test_accuracy"),
        "best_test_accuracy": max((h["test_accuracy"] for h in history if "test_accuracy" in h), default=None),
        "metric": metric, "test_score": last.get("test_score"),
        "best_test_score": max((h["test_score"] for h in history if "test_score" in h), default=None),
        "test_metrics": {k[len("test_"):]: v for k, v in last.items() if k.startswith("test_")},
        "peak_activation_bytes": memory.get("peak_activation_bytes"),
        "module_peak_bytes": memory.get("module_peak_bytes"),
        "peak_allocated_bytes": memory.get("peak_allocated_bytes"),
        "epoch_time_s": per_step * steps_per_epoch if history else None,  # a full epoch, from the mean step time
        "step_time_s": per_step if history else None,
        "steps_per_epoch": steps_per_epoch,
        "params": sum(p.numel() for p in model.backbone.parameters()),
        "aux_params": sum(model.aux_parameter_count()),
        "batch_size": cfg.batch_size, "device": str(device), "torch_version": torch.__version__,
        "history": [{k: h.get(k) for k in ("epoch", "step", "complete", "test_accuracy", "test_score", "train_loss",
                                           "epoch_time_s")} for h in history],
        **extra,
    }


__all__ = ["ENDED", "STATUSES", "divergence", "metric_text", "summary"]
