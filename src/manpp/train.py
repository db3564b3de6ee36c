"""``manpp train``: the training loop around the engine, with logging, checkpoints and resume.

A run folder holds ``config.yaml`` (the resolved config), ``log.csv`` (one row per epoch),
``checkpoint.pt`` (written atomically after every epoch, everything needed to resume exactly)
and ``summary.json``.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import config as C
from .engine import LocalModel, evaluate
from .errors import ManppError
from .memory import format_bytes, measure_step

CHECKPOINT = "checkpoint.pt"


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name not in ("cpu", "cuda") and not name.startswith("cuda:"):
        raise ManppError(f"unknown device '{name}': accepted are 'auto', 'cpu' or 'cuda'")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ManppError(f"device '{name}' was asked for but CUDA is not available here; use --device cpu")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def default_k(cfg: C.TrainConfig, n_units: int) -> int | None:
    if cfg.k is not None or cfg.method == "e2e" or not isinstance(cfg.split, str) or "," in cfg.split:
        return cfg.k
    return min(16, n_units)


def build_model(cfg: C.TrainConfig, info, device: torch.device | str = "cpu") -> LocalModel:
    """Backbone + method from a config and a dataset's :class:`~manpp.data.DatasetInfo`."""
    from .data import denormalize
    from .methods import build_local_model
    from .models import build_backbone

    backbone = build_backbone(cfg.model, num_classes=info.num_classes, in_channels=info.in_channels)
    settings = cfg.local_settings()
    settings = dataclasses.replace(settings, k=default_k(cfg, len(backbone.units)))
    model = build_local_model(backbone, settings, num_classes=info.num_classes, image_channels=info.in_channels,
                              image_size=info.image_size, denormalize=lambda x: denormalize(x, info))
    if cfg.amp not in (None, "bf16"):
        raise ManppError(f"unknown amp '{cfg.amp}': accepted are 'bf16' or none")
    model.amp_dtype = torch.bfloat16 if cfg.amp == "bf16" else None
    model = model.to(device, memory_format=memory_format(cfg))
    return model.compile_parts() if cfg.compile else model


def memory_format(cfg: C.TrainConfig) -> torch.memory_format:
    return torch.channels_last if cfg.channels_last else torch.contiguous_format


class EpochBatches(torch.utils.data.Sampler):
    """Shuffled index batches for one epoch, fixed by (seed, epoch), optionally from a batch offset.

    The order does not depend on any global RNG, so a resumed run sees the same batches.
    """

    def __init__(self, n: int, batch_size: int, seed: int, epoch: int, start: int = 0):
        self.n, self.batch_size, self.seed, self.epoch, self.start = n, batch_size, seed, epoch, start

    def __len__(self) -> int:
        return self.n // self.batch_size - self.start

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        perm = torch.randperm(self.n, generator=g).tolist()
        for b in range(self.start, self.n // self.batch_size):
            yield perm[b * self.batch_size:(b + 1) * self.batch_size]


def lr_at(step: int, cfg: C.TrainConfig, steps_per_epoch: int) -> float:
    """Linear warm-up from ``warmup_lr`` to ``lr``, then cosine to 0, evaluated per step."""
    total = max(1, cfg.epochs * steps_per_epoch)
    warm = int(cfg.warmup_epochs * steps_per_epoch)
    if step < warm:
        return cfg.warmup_lr + (cfg.lr - cfg.warmup_lr) * step / warm
    progress = (step - warm) / max(1, total - warm)
    return 0.5 * cfg.lr * (1 + math.cos(math.pi * min(1.0, progress)))


def _atomic_save(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def load_checkpoint(path: str | Path) -> dict:
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
    for name in C.IDENTITY_FIELDS:
        if saved.get(name) != getattr(cfg, name):
            raise ManppError(f"checkpoint is from another configuration: {name} is {saved.get(name)!r} there "
                             f"but {getattr(cfg, name)!r} here")


def _loss_text(means: list[float]) -> str:
    """Every module's loss when K is small; first / mean / last when it is large."""
    if len(means) <= 6:
        return " ".join(f"{m:.3f}" for m in means)
    return f"{means[0]:.3f} .. {means[-1]:.3f} (mean {sum(means) / len(means):.3f}, {len(means)} modules)"


@dataclass
class RunResult:
    summary: dict
    model: LocalModel
    out: Path


def train(cfg: C.TrainConfig, *, resume: str | None = None, verbose: bool = True) -> RunResult:
    """Train according to ``cfg`` (see :class:`~manpp.config.TrainConfig`), optionally resuming."""
    from tqdm.auto import tqdm

    from .data import build_datasets

    ckpt = None
    if resume:
        ckpt = load_checkpoint(resume)
        check_resumable(cfg, ckpt["config"])
    device = resolve_device(cfg.device)
    seed_everything(cfg.seed)
    train_set, test_set, info = build_datasets(cfg.dataset, cfg.data_dir, download=cfg.download, seed=cfg.seed)
    train_set = _subset(train_set, cfg.train_subset, "train_subset")
    test_set = _subset(test_set, cfg.test_subset, "test_subset")
    if len(train_set) < cfg.batch_size:
        raise ManppError(f"batch_size {cfg.batch_size} is larger than the training set ({len(train_set)} images)")
    model = build_model(cfg, info, device)
    optimizer = torch.optim.SGD(model.parameters_to_optimize(), lr=cfg.lr, momentum=cfg.sgd_momentum,
                                nesterov=cfg.nesterov, weight_decay=cfg.weight_decay)
    if cfg.out is None and resume:  # a resumed run stays in its folder
        cfg = dataclasses.replace(cfg, out=str(Path(resume) if Path(resume).is_dir() else Path(resume).parent))
    out = Path(cfg.out or Path("runs") / cfg.run_name())
    out.mkdir(parents=True, exist_ok=True)
    cfg = dataclasses.replace(cfg, out=str(out))
    C.save_yaml(cfg, out / "config.yaml")
    steps_per_epoch = len(train_set) // cfg.batch_size
    loader_kw = dict(num_workers=cfg.workers, pin_memory=device.type == "cuda", persistent_workers=False)
    test_loader = torch.utils.data.DataLoader(test_set, batch_size=cfg.eval_batch_size,
                                              generator=torch.Generator().manual_seed(cfg.seed), **loader_kw)

    epoch, step, batch_in_epoch, history = 0, 0, 0, []
    memory = None
    if ckpt is not None:
        try:
            model.load_state_dict(ckpt["model"])
        except RuntimeError as exc:
            raise ManppError(f"checkpoint does not fit this model: {str(exc).splitlines()[0]}") from None
        optimizer.load_state_dict(ckpt["optimizer"])
        epoch, step, batch_in_epoch = ckpt["epoch"], ckpt["step"], ckpt["batch_in_epoch"]
        history, memory = ckpt["history"], ckpt.get("memory")
        _set_rng_state(ckpt["rng"])
    if memory is None:
        x, y = next(iter(torch.utils.data.DataLoader(train_set, batch_size=cfg.batch_size)))
        memory = measure_step(model, x.to(device, memory_format=memory_format(cfg)), y.to(device)).__dict__
        seed_everything(cfg.seed + 1)  # same RNG stream whether or not memory was measured before

    if verbose:
        names = model.partition.describe(model.backbone.unit_names)
        print(f"{cfg.method}: {cfg.model} on {cfg.dataset} ({len(train_set)} train / {len(test_set)} test), "
              f"{model.k} module{'s' if model.k > 1 else ''} [{model.partition.label}], "
              f"activation peak {format_bytes(memory['peak_activation_bytes'])} at batch {cfg.batch_size}, "
              f"device {device}, run folder {out}")
        if model.k > 1:
            print("  modules: " + ", ".join(names))

    max_steps = cfg.max_steps
    fmt = memory_format(cfg)
    while epoch < cfg.epochs and (max_steps is None or step < max_steps):
        sampler = EpochBatches(len(train_set), cfg.batch_size, cfg.seed, epoch, batch_in_epoch)
        # its own generator: making the iterator must not draw from the global RNG (exact resume)
        worker_seed = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch + 1)
        loader = torch.utils.data.DataLoader(train_set, batch_sampler=sampler, generator=worker_seed, **loader_kw)
        model.train()
        sums = torch.zeros(model.k, dtype=torch.float64)
        correct, seen, n_batches = 0, 0, 0
        started = time.perf_counter()
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False, disable=None if verbose else True,
                   dynamic_ncols=True, file=sys.stderr)
        for inputs, targets in bar:
            inputs = inputs.to(device, non_blocking=True, memory_format=fmt)
            targets = targets.to(device, non_blocking=True)
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, cfg, steps_per_epoch)
            optimizer.zero_grad(set_to_none=True)
            result = model.train_step(inputs, targets)
            optimizer.step()
            losses = torch.stack(result.losses).double().cpu()
            if not torch.isfinite(losses).all():
                raise ManppError(f"training diverged at step {step}: a local loss is not finite "
                                 f"({losses.tolist()}); lower the learning rate (lr={cfg.lr})")
            sums += losses
            correct += int((result.logits.argmax(1) == targets).sum())
            seen += targets.numel()
            n_batches += 1
            step += 1
            batch_in_epoch += 1
            bar.set_postfix_str(f"loss {_loss_text((sums / n_batches).tolist())}", refresh=False)
            if max_steps is not None and step >= max_steps:
                break
        bar.close()
        epoch_time = time.perf_counter() - started
        finished = batch_in_epoch >= steps_per_epoch
        metrics = evaluate(model, test_loader, device)
        means = (sums / max(1, n_batches)).tolist()
        row = {"epoch": epoch + 1, "step": step, "lr": optimizer.param_groups[0]["lr"],
               "train_loss": means[-1], "train_accuracy": correct / max(1, seen),
               "test_loss": metrics["loss"], "test_accuracy": metrics["accuracy"],
               "epoch_time_s": epoch_time, "images_per_s": seen / max(epoch_time, 1e-9), "steps": n_batches,
               "steps_per_epoch": steps_per_epoch}
        row.update({f"loss_{j}": m for j, m in enumerate(means)})
        for j, aux in enumerate(model.aux):  # MAN/MAN++: the mixing scale and how far each copy lags its unit
            if hasattr(aux, "ema_distance"):
                row[f"scale_{j}"] = float(aux.scale)
                row[f"ema_dist_{j}"] = aux.ema_distance()
        history.append(row)
        _append_csv(out / "log.csv", row)
        if verbose:
            print(f"epoch {epoch + 1}/{cfg.epochs}  loss {_loss_text(means)}  train acc {row['train_accuracy']:.2%}"
                  f"  test acc {metrics['accuracy']:.2%}  ({epoch_time:.1f} s, {row['images_per_s']:.0f} img/s)")
        if finished:
            epoch, batch_in_epoch = epoch + 1, 0
        _atomic_save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "config": cfg.to_dict(),
                      "epoch": epoch, "step": step, "batch_in_epoch": batch_in_epoch, "history": history,
                      "memory": memory, "rng": _rng_state(), "version": 1}, out / CHECKPOINT)

    summary = _summary(cfg, model, history, memory, device)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return RunResult(summary, model, out)


def _subset(dataset, n: int | None, name: str):
    """The same ``n`` images for every run and seed (a fixed permutation), or the whole set."""
    if n is None or n >= len(dataset):
        return dataset
    if n < 1:
        raise ManppError(f"{name} must be a positive number of images, got {n}")
    keep = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(20261125))[:n]
    return torch.utils.data.Subset(dataset, keep.sort().values.tolist())


def _append_csv(path: Path, row: dict) -> None:
    new = not path.exists()
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(row))
        if new:
            writer.writeheader()
        writer.writerow(row)


def _summary(cfg: C.TrainConfig, model: LocalModel, history: list[dict], memory: dict, device) -> dict:
    steps_per_epoch = max(1, history[0]["steps_per_epoch"]) if history else 0
    per_step = sum(h["epoch_time_s"] for h in history) / max(1, sum(h["steps"] for h in history))
    last = history[-1] if history else {}
    return {
        "method": cfg.method, "model": cfg.model, "dataset": cfg.dataset, "modules": model.k,
        "partition": model.partition.label, "objective": None if cfg.method in ("e2e", "dgl", "infopro") else cfg.objective,
        "epochs": len(history), "steps": last.get("step", 0),
        "test_accuracy": last.get("test_accuracy"), "best_test_accuracy": max((h["test_accuracy"] for h in history), default=None),
        "peak_activation_bytes": memory["peak_activation_bytes"], "module_peak_bytes": memory["module_peak_bytes"],
        "peak_allocated_bytes": memory["peak_allocated_bytes"],
        "epoch_time_s": per_step * steps_per_epoch if history else None,  # a full epoch, from the mean step time
        "step_time_s": per_step if history else None,
        "steps_per_epoch": steps_per_epoch,
        "params": sum(p.numel() for p in model.backbone.parameters()),
        "aux_params": sum(model.aux_parameter_count()),
        "batch_size": cfg.batch_size, "device": str(device), "torch_version": torch.__version__,
        "history": [{k: h[k] for k in ("epoch", "step", "test_accuracy", "train_loss", "epoch_time_s")} for h in history],
    }
