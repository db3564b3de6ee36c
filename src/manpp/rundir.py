"""The run folder: ``config.yaml``, ``log.csv``, ``checkpoint.pt``, ``best.pt`` and ``summary.json``.

One folder holds one run. A new run into a folder that already holds one is refused unless it
is resumed (``--resume``) or replaces it (``--overwrite``), and a resumed run writes into the
folder it was resumed from. The checkpoint is written atomically and holds everything needed to
resume exactly (model, optimizer, loss scale, position in the epoch, every process's RNG states,
history); ``best.pt`` holds the weights of the evaluation with the best test score so far.
``summary.json`` says how the run ended: ``finished``, ``stopped`` (by ``max_steps`` or an
interrupt; resume it) or ``diverged`` (a loss or a weight not finite; the checkpoint is the last
finite one). Everything is loaded with ``weights_only=True``: no pickled code runs.
"""

from __future__ import annotations

import csv
import json
import math
import os
import pickle
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import config as C
from . import distributed as D
from .engine import LocalModel
from .errors import ManppError

CHECKPOINT = "checkpoint.pt"
BEST = "best.pt"
LOG = "log.csv"
SUMMARY = "summary.json"
CONFIG = "config.yaml"
TENSORBOARD = "tensorboard"
RUN_FILES = (CONFIG, LOG, CHECKPOINT, BEST, SUMMARY)  # what makes a folder a run's (and --overwrite removes)
STATUSES = ("finished", "stopped", "diverged")
CHECKPOINT_VERSION = 2  # 2: RNG states as tensors, so that weights_only=True loads it
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
    """One row; a file written with other columns is never appended to (one header per file)."""
    if path.exists():
        with path.open(newline="") as f:
            header = next(csv.reader(f), None)
        if header is not None and header != list(row):
            raise ManppError(f"'{path}' has other columns than this run writes: it belongs to another run "
                             f"(start this one in a fresh folder, or give --overwrite)")
    new = not path.exists() or path.stat().st_size == 0
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(row))
        if new:
            writer.writeheader()
        writer.writerow(row)


def folder_of(resume: str | Path) -> Path:
    """The run folder of ``--resume PATH`` (the folder itself, or the folder holding the checkpoint file)."""
    path = Path(resume)
    return path if path.is_dir() else path.parent


def run_folder(cfg: C.TrainConfig, resume: str | Path | None = None) -> Path:
    """A resumed run's folder, else ``cfg.out``, by default ``runs/<name>``. The same on every process."""
    out = folder_of(resume) if resume else Path(cfg.out or Path("runs") / cfg.run_name())
    return Path(D.broadcast_object(str(out)))


def holds_run(folder: Path) -> list[str]:
    """The run files in ``folder`` (none: it holds no run)."""
    return [name for name in RUN_FILES if (folder / name).exists()] + \
        ([TENSORBOARD] if (folder / TENSORBOARD).is_dir() else [])


def prepare_folder(folder: Path, *, resume: bool = False, overwrite: bool = False) -> None:
    """Make ``folder`` ready for a run: refuse one that holds another run (unless resumed or
    ``overwrite``, which removes that run's files), create it, and check it can be written."""
    if folder.exists() and not folder.is_dir():
        raise ManppError(f"run folder '{folder}' is an existing file, not a folder: give --out a folder path")
    found = holds_run(folder) if folder.is_dir() else []
    if found and not resume:
        if not overwrite:
            status = _status_of(folder)
            raise ManppError(f"run folder '{folder}' already holds a run{status} ({', '.join(found)}): continue it "
                             f"with --resume {folder}, replace it with --overwrite, or choose another --out")
        for name in found:
            target = folder / name
            if target.is_dir():
                shutil.rmtree(target)
            else:
                target.unlink()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / ".manpp-write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise ManppError(f"cannot write the run folder '{folder}': {exc.strerror or exc}") from None


def _status_of(folder: Path) -> str:
    try:
        status = json.loads((folder / SUMMARY).read_text()).get("status")
    except (OSError, ValueError, AttributeError):
        return " (unfinished: no summary)" if (folder / CHECKPOINT).exists() else ""
    return f" ({status})" if status else ""


def write_summary(folder: Path, result: dict) -> None:
    (folder / SUMMARY).write_text(json.dumps(result, indent=2))


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


def is_finished(ckpt: dict) -> bool:
    """Whether the checkpoint's run trained all its epochs."""
    epochs = ckpt["config"].get("epochs", 0)
    return ckpt.get("epoch", 0) >= epochs and ckpt.get("status", "finished") != "diverged"


def rng_state(device: torch.device | None = None) -> dict:
    """This process's random generators (Python, NumPy, torch, and its CUDA device), as tensors and numbers."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    numpy_state = (name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached))
    state = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}
    if D.is_initialized() and device is not None and device.type == "cuda":
        state["cuda_device"] = torch.cuda.get_rng_state(device)  # one GPU per process: only its own generator
    elif torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict, device: torch.device | None = None) -> None:
    random.setstate(state["python"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    keys = keys.numpy() if isinstance(keys, torch.Tensor) else np.asarray(keys)
    np.random.set_state((name, keys.astype(np.uint32), pos, has_gauss, cached))
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
        ckpt = torch.load(path, map_location="cpu", weights_only=True)  # tensors and plain values only
    except FileNotFoundError:
        raise ManppError(f"checkpoint '{path}' does not exist") from None
    except IsADirectoryError:
        raise ManppError(f"checkpoint '{path}' is a folder without a {CHECKPOINT}") from None
    except pickle.UnpicklingError as exc:
        raise ManppError(f"cannot read checkpoint '{path}' safely: it holds objects other than tensors and plain "
                         f"values ({str(exc).splitlines()[0][:160]}); checkpoints of manpp before version 0.2 hold "
                         f"NumPy arrays: load one with torch.load(path, weights_only=False) only if you trust "
                         f"it") from None
    except Exception as exc:  # torch raises many types for a damaged file
        raise ManppError(f"cannot read checkpoint '{path}': {type(exc).__name__}: {str(exc).splitlines()[0]}") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "config" not in ckpt:
        raise ManppError(f"'{path}' is not a manpp checkpoint (no model state or config in it)")
    return ckpt


def state_dict_mismatch(exc: RuntimeError, limit: int = 3) -> str:
    """What ``load_state_dict`` found wrong, in one line: the first few missing, unexpected and
    misshapen entries (torch puts them on the lines after its first)."""
    parts = []
    for line in str(exc).splitlines()[1:]:
        line = line.strip().rstrip(".")
        if not line:
            continue
        head, colon, rest = line.partition(": ")
        if colon and rest.startswith('"'):  # Missing key(s) / Unexpected key(s): a list of quoted names
            names = [n.strip().strip('"') for n in rest.split(",")]
            more = f" and {len(names) - limit} more" if len(names) > limit else ""
            parts.append(f"{head.lower()}: {', '.join(names[:limit])}{more}")
        else:
            parts.append(line)
    if not parts:
        return str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    shown = parts[:2 * limit]
    return "; ".join(shown) + (f"; and {len(parts) - len(shown)} more problems" if len(parts) > len(shown) else "")


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


def summary(cfg: C.TrainConfig, model: LocalModel, history: list[dict], memory: dict, device, metric: str,
            status: str = "finished", reason: str | None = None) -> dict:
    """What ``summary.json`` holds: how the run ended (``status``, one of :data:`STATUSES`, and why),
    final and best scores, memory, time, sizes and the short history.

    ``epochs`` counts the completed epochs; a row of an epoch cut short (``max_steps``, or the
    first part of an epoch later resumed) has ``complete`` false."""
    if status not in STATUSES:
        raise ValueError(f"unknown run status {status!r}: one of {STATUSES}")
    steps_per_epoch = max(1, history[0]["steps_per_epoch"]) if history else 0
    per_step = sum(h["epoch_time_s"] for h in history) / max(1, sum(h["steps"] for h in history))
    last = history[-1] if history else {}
    return {
        "status": status, "reason": reason,
        "method": cfg.method, "model": cfg.model, "dataset": cfg.dataset, "modules": model.k,
        "partition": model.partition.label,
        "objective": cfg.objective,  # resolved (manpp.build.resolved): None where the method fixes its own
        "epochs": sum(1 for h in history if h.get("complete", True)), "epochs_planned": cfg.epochs,
        "steps": last.get("step", 0),
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
        "history": [{k: h.get(k) for k in ("epoch", "step", "complete", "test_accuracy", "test_score", "train_loss",
                                           "epoch_time_s")} for h in history],
    }
