"""The run folder: ``config.yaml``, ``log.csv``, ``checkpoint.pt`` and ``summary.json``.

The checkpoint is written atomically and holds everything needed to resume exactly (model,
optimizer, loss scale, position in the epoch, every process's RNG states, history).
"""

from __future__ import annotations

import csv
import os
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import config as C
from . import distributed as D
from .engine import LocalModel
from .errors import ManppError

CHECKPOINT = "checkpoint.pt"
LOG = "log.csv"
SUMMARY = "summary.json"
METRIC_NAMES = {"accuracy": "acc", "miou": "mIoU", "map": "AP"}


@dataclass
class RunResult:
    summary: dict
    model: LocalModel
    out: Path


def atomic_save(obj, path: Path) -> None:
    """``torch.save`` to a temporary file, then rename: a crash never leaves half a checkpoint."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def append_csv(path: Path, row: dict) -> None:
    new = not path.exists()
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(row))
        if new:
            writer.writeheader()
        writer.writerow(row)


def rng_state(device: torch.device | None = None) -> dict:
    """This process's random generators (Python, NumPy, torch, and its CUDA device)."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if D.is_initialized() and device is not None and device.type == "cuda":
        state["cuda_device"] = torch.cuda.get_rng_state(device)  # one GPU per process: only its own generator
    elif torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict, device: torch.device | None = None) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda_device" in state and device is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda_device"], device)
    elif "cuda" in state and torch.cuda.is_available() and not D.is_initialized():
        torch.cuda.set_rng_state_all(state["cuda"])


def load_checkpoint(path: str | Path) -> dict:
    """A run's checkpoint (a file, or the run folder holding one); clear errors for anything else."""
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except FileNotFoundError:
        raise ManppError(f"checkpoint '{path}' does not exist") from None
    except Exception as exc:  # torch raises many types for a damaged file
        raise ManppError(f"cannot read checkpoint '{path}': {type(exc).__name__}: {str(exc).splitlines()[0]}") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "config" not in ckpt:
        raise ManppError(f"'{path}' is not a manpp checkpoint (no model state or config in it)")
    return ckpt


def check_resumable(cfg: C.TrainConfig, saved: dict) -> None:
    """A checkpoint continues only the run it is from: the fields that define the model must agree."""
    saved_cfg = C.from_dict(saved, source="checkpoint")  # legacy flat keys land in heads, as for cfg
    for name in C.IDENTITY_FIELDS:
        if getattr(saved_cfg, name) != getattr(cfg, name):
            raise ManppError(f"checkpoint is from another configuration: {name} is {getattr(saved_cfg, name)!r} "
                             f"there but {getattr(cfg, name)!r} here")
    if saved.get("optimizer", "sgd") != cfg.optimizer:  # its state would not fit (checkpoints before it: sgd)
        raise ManppError(f"checkpoint is from another configuration: optimizer is {saved.get('optimizer', 'sgd')!r} "
                         f"there but {cfg.optimizer!r} here")


def metric_text(metric: str, value: float) -> str:
    return f"{METRIC_NAMES.get(metric, metric)} {value:.2%}"


def loss_text(means: list[float]) -> str:
    """Every module's loss when K is small; first / mean / last when it is large."""
    if len(means) <= 6:
        return " ".join(f"{m:.3f}" for m in means)
    return f"{means[0]:.3f} .. {means[-1]:.3f} (mean {sum(means) / len(means):.3f}, {len(means)} modules)"


def summary(cfg: C.TrainConfig, model: LocalModel, history: list[dict], memory: dict, device, metric: str) -> dict:
    """What ``summary.json`` holds: final and best scores, memory, time, sizes and the short history."""
    steps_per_epoch = max(1, history[0]["steps_per_epoch"]) if history else 0
    per_step = sum(h["epoch_time_s"] for h in history) / max(1, sum(h["steps"] for h in history))
    last = history[-1] if history else {}
    return {
        "method": cfg.method, "model": cfg.model, "dataset": cfg.dataset, "modules": model.k,
        "partition": model.partition.label,
        "objective": cfg.objective,  # resolved (manpp.build.resolved): None where the method fixes its own
        "epochs": len(history), "steps": last.get("step", 0),
        "test_accuracy": last.get("test_accuracy"),
        "best_test_accuracy": max((h["test_accuracy"] for h in history if "test_accuracy" in h), default=None),
        "metric": metric, "test_score": last.get("test_score"),
        "best_test_score": max((h["test_score"] for h in history if "test_score" in h), default=None),
        "test_metrics": {k[len("test_"):]: v for k, v in last.items() if k.startswith("test_")},
        "peak_activation_bytes": memory["peak_activation_bytes"], "module_peak_bytes": memory["module_peak_bytes"],
        "peak_allocated_bytes": memory["peak_allocated_bytes"],
        "epoch_time_s": per_step * steps_per_epoch if history else None,  # a full epoch, from the mean step time
        "step_time_s": per_step if history else None,
        "steps_per_epoch": steps_per_epoch,
        "params": sum(p.numel() for p in model.backbone.parameters()),
        "aux_params": sum(model.aux_parameter_count()),
        "batch_size": cfg.batch_size, "device": str(device), "torch_version": torch.__version__,
        "history": [{k: h.get(k) for k in ("epoch", "step", "test_accuracy", "test_score", "train_loss", "epoch_time_s")}
                    for h in history],
    }
