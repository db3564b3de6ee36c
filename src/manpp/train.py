"""``manpp train``: the training loop around the engine, with logging, checkpoints and resume.

A run folder holds ``config.yaml`` (the resolved config), ``log.csv`` (one row per epoch),
``checkpoint.pt`` (written atomically after every epoch, everything needed to resume exactly)
and ``summary.json``.

Under ``torchrun`` (see :mod:`manpp.distributed`) every process runs this loop on its share of
each global batch and the gradients are averaged before the one optimizer step; only rank 0
prints and writes the run folder.
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
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import config as C
from . import distributed as D
from .engine import LocalModel
from .tasks import task_of
from .errors import ManppError, choices
from .memory import format_bytes, measure_step

CHECKPOINT = "checkpoint.pt"
AMP = {"bf16": torch.bfloat16, "fp16": torch.float16}
OPTIMIZERS = ("sgd", "adamw")
RANK_SEED = 1_000_003  # process r > 0 draws its random numbers (augmentation, dropout) from seed + r * RANK_SEED


def resolve_device(name: str) -> torch.device:
    """``--device`` for a single process (``auto``: CUDA when there is one); clear errors otherwise."""
    return D.process_device(name, None)


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

    backbone = build_backbone(cfg.model, num_classes=info.num_classes, in_channels=info.in_channels,
                              image_size=info.image_size, anchor_base=cfg.anchor_base)
    if cfg.pretrained:
        from .models.imagenet import load_resnet_weights

        if not hasattr(backbone, "unit_names") or not str(getattr(backbone, "arch", "")).replace(
                "retinanet_", "").replace("deeplabv3_", "").startswith(("resnet", "resnext", "wide_resnet")):
            raise ManppError(f"pretrained weights are for torchvision ResNet backbones; model '{cfg.model}' is not one")
        path = Path(cfg.pretrained)
        if not path.is_file():
            raise ManppError(f"pretrained weights file '{path}' does not exist")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - any unreadable file is the user's input
            raise ManppError(f"cannot read pretrained weights '{path}': {exc}") from None
        load_resnet_weights(backbone, state.get("state_dict", state) if isinstance(state, dict) else state)
    settings = cfg.local_settings()
    settings = dataclasses.replace(settings, k=default_k(cfg, len(backbone.units)))
    if settings.split == "memory" and settings.k and settings.k > 1 and cfg.method != "e2e":
        from .plan import balanced_ends, unit_activation_bytes

        per_unit = unit_activation_bytes(backbone, 2, info.in_channels, info.image_size)
        settings = dataclasses.replace(settings, split=balanced_ends(per_unit, settings.k))
    model = build_local_model(backbone, settings, num_classes=info.num_classes, image_channels=info.in_channels,
                              image_size=info.image_size, denormalize=lambda x: denormalize(x, info))
    model.amp_dtype = amp_dtype(cfg)
    model = model.to(device, memory_format=memory_format(cfg))
    return model.compile_parts() if cfg.compile else model


def memory_format(cfg: C.TrainConfig) -> torch.memory_format:
    return torch.channels_last if cfg.channels_last else torch.contiguous_format


def amp_dtype(cfg: C.TrainConfig) -> torch.dtype | None:
    """The autocast dtype of ``cfg.amp`` (None: full precision)."""
    if cfg.amp is None:
        return None
    if cfg.amp not in AMP:
        raise ManppError(f"unknown amp '{cfg.amp}': accepted are {', '.join(map(repr, AMP))} or none")
    return AMP[cfg.amp]


def _adamw_betas(cfg: C.TrainConfig) -> tuple[float, float]:
    betas = cfg.adamw_betas
    ok = isinstance(betas, (list, tuple)) and len(betas) == 2 and all(
        isinstance(b, (int, float)) and not isinstance(b, bool) and 0.0 <= b < 1.0 for b in betas)
    if not ok:
        raise ManppError(f"bad adamw_betas {betas!r}: expected two numbers in [0, 1), e.g. [0.9, 0.999]")
    return float(betas[0]), float(betas[1])


def check_options(cfg: C.TrainConfig) -> None:
    """Names that are only read deep inside a run, checked up front (one clear error, before any work)."""
    amp_dtype(cfg)
    if cfg.optimizer not in OPTIMIZERS:
        raise ManppError(f"unknown optimizer '{cfg.optimizer}': accepted are {choices(OPTIMIZERS)}")
    if cfg.optimizer == "adamw":
        _adamw_betas(cfg)
    if cfg.parallel not in (None, "modules"):
        raise ManppError(f"unknown parallel mode '{cfg.parallel}': accepted are 'modules' or none")
    if cfg.lr_schedule not in ("cosine", "step"):
        raise ManppError(f"unknown lr_schedule '{cfg.lr_schedule}': accepted are 'cosine' or 'step'")
    if cfg.grad_clip is not None and not cfg.grad_clip > 0:
        raise ManppError(f"grad_clip must be a positive gradient norm or none, got {cfg.grad_clip!r}")
    if cfg.dist_backend is not None and cfg.dist_backend not in D.BACKENDS:
        raise ManppError(f"unknown dist_backend '{cfg.dist_backend}': accepted are "
                         f"{', '.join(map(repr, D.BACKENDS))} or none (nccl on CUDA, gloo on CPU)")


def build_optimizer(cfg: C.TrainConfig, params) -> torch.optim.Optimizer:
    """SGD (momentum ``sgd_momentum``, ``nesterov``) or AdamW (``adamw_betas``, eps 1e-8); both use
    ``lr`` (overwritten every step by :func:`lr_at`) and ``weight_decay``."""
    check_options(cfg)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, betas=_adamw_betas(cfg), eps=1e-8, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.sgd_momentum, nesterov=cfg.nesterov,
                           weight_decay=cfg.weight_decay)


def build_scaler(cfg: C.TrainConfig, device: torch.device) -> "torch.amp.GradScaler | None":
    """One GradScaler for all K local losses with ``amp: fp16``; None otherwise (bf16 needs none)."""
    if cfg.amp != "fp16":
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            with torch.autocast(device.type, dtype=torch.float16):
                ok = torch.is_autocast_enabled(device.type) and torch.get_autocast_dtype(device.type) == torch.float16
            scaler = torch.amp.GradScaler(device.type)
        except (RuntimeError, ValueError, AttributeError, TypeError):
            ok = False
    if not ok or not scaler.is_enabled():
        raise ManppError(f"amp 'fp16' is not supported on {device.type} by torch {torch.__version__}: use amp bf16 "
                         f"or none there")
    return scaler


class EpochBatches(torch.utils.data.Sampler):
    """Shuffled index batches for one epoch, fixed by (seed, epoch), optionally from a batch offset.

    The order does not depend on any global RNG, so a resumed run sees the same batches. With
    ``world`` processes, ``batch_size`` is the global batch and process ``rank`` gets the
    contiguous slice ``[rank * b, (rank + 1) * b)`` of each one, ``b = batch_size / world``: the
    shards of one step together are exactly the single-process batch. (The seed and epoch play
    the part of ``DistributedSampler.set_epoch``.)
    """

    def __init__(self, n: int, batch_size: int, seed: int, epoch: int, start: int = 0, *, rank: int = 0,
                 world: int = 1):
        D.check_batch_size(batch_size, world)
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} is not one of the {world} processes")
        self.n, self.batch_size, self.seed, self.epoch, self.start = n, batch_size, seed, epoch, start
        self.rank, self.world = rank, world

    def __len__(self) -> int:
        return self.n // self.batch_size - self.start

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        perm = torch.randperm(self.n, generator=g).tolist()
        lo, hi = D.shard_bounds(self.batch_size, self.rank, self.world)
        for b in range(self.start, self.n // self.batch_size):
            yield perm[b * self.batch_size + lo:b * self.batch_size + hi]


def lr_at(step: int, cfg: C.TrainConfig, steps_per_epoch: int) -> float:
    """Linear warm-up from ``warmup_lr`` to ``lr``, then cosine to 0 (or, ``lr_schedule: step``,
    ``lr`` times 0.1 per milestone passed, as fractions of ``epochs``), evaluated per step."""
    total = max(1, cfg.epochs * steps_per_epoch)
    warm = int(cfg.warmup_epochs * steps_per_epoch)
    if step < warm:
        return cfg.warmup_lr + (cfg.lr - cfg.warmup_lr) * step / warm
    progress = (step - warm) / max(1, total - warm)
    if cfg.lr_schedule == "step":
        return cfg.lr * 0.1 ** sum(step >= m * total for m in cfg.lr_milestones)
    return 0.5 * cfg.lr * (1 + math.cos(math.pi * min(1.0, progress)))


def _atomic_save(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _rng_state(device: torch.device | None = None) -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if D.is_initialized() and device is not None and device.type == "cuda":
        state["cuda_device"] = torch.cuda.get_rng_state(device)  # one GPU per process: only its own generator
    elif torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict, device: torch.device | None = None) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda_device" in state and device is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda_device"], device)
    elif "cuda" in state and torch.cuda.is_available() and not D.is_initialized():
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
    if saved.get("optimizer", "sgd") != cfg.optimizer:  # its state would not fit (checkpoints before it: sgd)
        raise ManppError(f"checkpoint is from another configuration: optimizer is {saved.get('optimizer', 'sgd')!r} "
                         f"there but {cfg.optimizer!r} here")


METRIC_NAMES = {"accuracy": "acc", "miou": "mIoU", "map": "AP"}


def _metric_text(metric: str, value: float) -> str:
    return f"{METRIC_NAMES.get(metric, metric)} {value:.2%}"


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
    """Train according to ``cfg`` (see :class:`~manpp.config.TrainConfig`), optionally resuming.

    Started by ``torchrun``, this joins the process group (and destroys it at the end if it
    created it); see :mod:`manpp.distributed` for what every process does.
    """
    check_options(cfg)
    env = D.launch_env()
    device = D.process_device(cfg.device, env)
    if cfg.parallel is None:
        D.check_batch_size(cfg.batch_size)  # before any work: the global batch must split evenly
    elif resume:
        raise ManppError("resuming a parallel-modules run is not supported; its checkpoint holds the model for "
                         "manpp export and evaluation")
    ckpt = None
    if resume:
        ckpt = load_checkpoint(resume)
        check_resumable(cfg, ckpt["config"])
    owner = D.setup(device, cfg.dist_backend)
    # On an exception the group is left alone: other processes may be inside a collective with
    # this one, and torchrun ends them when this process exits with the error.
    if cfg.parallel == "modules":
        from .pipeline import train_pipelined

        result = train_pipelined(cfg, device, verbose and D.is_main())
    else:
        result = _train(cfg, ckpt, resume, device, verbose)
    if owner:
        D.shutdown()
    return result


def _train(cfg: C.TrainConfig, ckpt: dict | None, resume: str | None, device: torch.device,
           verbose: bool) -> RunResult:
    from tqdm.auto import tqdm

    rank, world, main = D.rank(), D.world_size(), D.is_main()
    distributed = D.is_initialized()
    local_batch = D.check_batch_size(cfg.batch_size, world)
    verbose = verbose and main
    seed_everything(cfg.seed)
    if not main:
        D.barrier()  # rank 0 builds (and downloads) the datasets first
    train_set, test_set, info = load_data(cfg)
    if main:
        D.barrier()
    if len(train_set) < cfg.batch_size:
        raise ManppError(f"batch_size {cfg.batch_size} is larger than the training set ({len(train_set)} images)")
    model = build_model(cfg, info, device)
    task = task_of(model.backbone)
    D.broadcast_state(model)  # every process starts from rank 0's parameters, EMA copies and buffers
    params = model.parameters_to_optimize()
    optimizer = build_optimizer(cfg, params)
    scaler = build_scaler(cfg, device)
    if cfg.out is None and resume:  # a resumed run stays in its folder
        cfg = dataclasses.replace(cfg, out=str(Path(resume) if Path(resume).is_dir() else Path(resume).parent))
    out = Path(D.broadcast_object(str(Path(cfg.out or Path("runs") / cfg.run_name()))))  # one folder for all
    cfg = dataclasses.replace(cfg, out=str(out))
    if main:
        out.mkdir(parents=True, exist_ok=True)
        C.save_yaml(cfg, out / "config.yaml")
    steps_per_epoch = len(train_set) // cfg.batch_size
    n_test = len(test_set)
    loader_kw = dict(num_workers=cfg.workers, pin_memory=device.type == "cuda", persistent_workers=False,
                     collate_fn=task.collate)
    if distributed:  # each process evaluates its own contiguous part of the test set; the sums are reduced
        test_set = torch.utils.data.Subset(test_set, range(*D.shard_bounds(len(test_set))))
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
        if scaler is not None and ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        epoch, step, batch_in_epoch = ckpt["epoch"], ckpt["step"], ckpt["batch_in_epoch"]
        history, memory = ckpt["history"], ckpt.get("memory")
        ranks = ckpt.get("rng_ranks") or [ckpt["rng"]]
        if rank < len(ranks):
            _set_rng_state(ranks[rank], device)
        else:  # more processes than when it was saved: a fresh stream for this one
            seed_everything(cfg.seed + 1 + rank * RANK_SEED + step)
    if memory is None:
        if main:  # per process: what one GPU holds for its share of the batch
            batch = next(iter(torch.utils.data.DataLoader(train_set, batch_size=local_batch, collate_fn=task.collate)))
            memory = measure_step(model, *task.prepare(batch, device, memory_format(cfg))).__dict__
        memory = D.broadcast_object(memory)
        seed_everything(cfg.seed + 1 + rank * RANK_SEED)  # same RNG stream whether or not memory was measured before

    if verbose:
        names = model.partition.describe(model.backbone.unit_names)
        per = f"at batch {cfg.batch_size}" if world == 1 else (
            f"at batch {local_batch} per process ({world} processes, global batch {cfg.batch_size})")
        print(f"{cfg.method}: {cfg.model} on {cfg.dataset} ({len(train_set)} train / {n_test} test), "
              f"{model.k} module{'s' if model.k > 1 else ''} [{model.partition.label}], "
              f"activation peak {format_bytes(memory['peak_activation_bytes'])} {per}, "
              f"device {device}, run folder {out}")
        if model.k > 1:
            print("  modules: " + ", ".join(names))
        recompute = [getattr(a, "recompute_ema", None) for a in model.aux]
        if cfg.recompute_ema == "auto" and recompute and all(isinstance(r, bool) for r in recompute):
            chosen = [str(j) for j, r in enumerate(recompute) if r]
            print(f"  EMA branch recomputed in backward in module{'s' if len(chosen) != 1 else ''} "
                  f"{', '.join(chosen) or 'none'} (recompute_ema=auto: where it sets the activation peak)")

    max_steps = cfg.max_steps
    fmt = memory_format(cfg)
    while epoch < cfg.epochs and (max_steps is None or step < max_steps):
        sampler = EpochBatches(len(train_set), cfg.batch_size, cfg.seed, epoch, batch_in_epoch, rank=rank, world=world)
        # its own generator: making the iterator must not draw from the global RNG (exact resume)
        worker_seed = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch + 1 + rank * RANK_SEED)
        loader = torch.utils.data.DataLoader(train_set, batch_sampler=sampler, generator=worker_seed, **loader_kw)
        model.train()
        # per module: summed mean losses; then training hits, what they were counted on, and images
        # (all processes: the global batch)
        sums = torch.zeros(model.k + 3, dtype=torch.float64)
        n_batches, skipped = 0, 0
        started = time.perf_counter()
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False, disable=None if verbose else True,
                   dynamic_ncols=True, file=sys.stderr)
        for batch in bar:
            inputs, targets = task.prepare(batch, device, fmt)
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, cfg, steps_per_epoch)
            optimizer.zero_grad(set_to_none=True)
            result = model.train_step(inputs, targets, scaler)
            if distributed:
                D.all_reduce_gradients(params)  # every module's gradients, averaged over the processes
            if cfg.grad_clip is not None:  # the global norm over all modules, as the release's detection code
                if scaler is not None:
                    scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            if scaler is None:
                optimizer.step()
            else:  # unscale, skip the step if a gradient is inf/nan (same on every process), adapt the scale
                before = scaler.get_scale()
                scaler.step(optimizer)
                scaler.update()
                skipped += scaler.get_scale() < before
            hits = task.train_hits(result.logits, targets)
            if hits is None:
                hits = torch.zeros(2, dtype=torch.float64, device=device)
            stats = torch.cat([torch.stack([v.float() for v in result.losses]).double(), hits,
                               torch.tensor([inputs.shape[0]], dtype=torch.float64, device=device)])
            if distributed:
                D.all_reduce_sum(stats)
                stats[:model.k] /= world  # mean over the shards = mean over the global batch
            stats = stats.cpu()
            losses = stats[:model.k]
            if not torch.isfinite(losses).all():
                raise ManppError(f"training diverged at step {step}: a local loss is not finite "
                                 f"({losses.tolist()}); lower the learning rate (lr={cfg.lr})")
            sums += stats
            n_batches += 1
            step += 1
            batch_in_epoch += 1
            bar.set_postfix_str(f"loss {_loss_text((sums[:model.k] / n_batches).tolist())}", refresh=False)
            if max_steps is not None and step >= max_steps:
                break
        bar.close()
        epoch_time = time.perf_counter() - started
        finished = batch_in_epoch >= steps_per_epoch
        D.broadcast_buffers(model)  # BatchNorm statistics are per process: evaluate and save rank 0's
        metrics = task.evaluate(model, test_loader, device, reduce=True)
        means = (sums[:model.k] / max(1, n_batches)).tolist()
        correct, counted, seen = (float(v) for v in sums[model.k:])
        row = {"epoch": epoch + 1, "step": step, "lr": optimizer.param_groups[0]["lr"],
               "train_loss": means[-1], "train_accuracy": correct / counted if counted else None,
               **{f"test_{name}": value for name, value in metrics.items()}, "test_score": metrics[task.metric],
               "epoch_time_s": epoch_time, "images_per_s": seen / max(epoch_time, 1e-9), "steps": n_batches,
               "steps_per_epoch": steps_per_epoch}
        row.update({f"loss_{j}": m for j, m in enumerate(means)})
        for j, aux in enumerate(model.aux):  # MAN/MAN++: the mixing scale and how far each copy lags its unit
            if hasattr(aux, "ema_distance"):
                row[f"scale_{j}"] = float(aux.scale.detach())
                row[f"ema_dist_{j}"] = aux.ema_distance()
        if scaler is not None:
            row["loss_scale"] = scaler.get_scale()
            row["skipped_steps"] = int(skipped)
        history.append(row)
        if main:
            _append_csv(out / "log.csv", row)
        if verbose:
            train_acc = "" if row["train_accuracy"] is None else f"  train acc {row['train_accuracy']:.2%}"
            print(f"epoch {epoch + 1}/{cfg.epochs}  loss {_loss_text(means)}{train_acc}"
                  f"  test {_metric_text(task.metric, metrics[task.metric])}  ({epoch_time:.1f} s, {row['images_per_s']:.0f} img/s)")
        if finished:
            epoch, batch_in_epoch = epoch + 1, 0
        rngs = D.gather_objects(_rng_state(device))  # every process's generators, for an exact resume
        if main:
            _atomic_save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                          "scaler": scaler.state_dict() if scaler is not None else None, "config": cfg.to_dict(),
                          "epoch": epoch, "step": step, "batch_in_epoch": batch_in_epoch, "history": history,
                          "memory": memory, "rng": rngs[0], "rng_ranks": rngs, "world_size": world, "version": 1},
                         out / CHECKPOINT)

    summary = _summary(cfg, model, history, memory, device)
    summary["world_size"] = world
    if main:
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return RunResult(summary, model, out)


def data_info(cfg: C.TrainConfig):
    """The :class:`~manpp.data.DatasetInfo` of a run's dataset, for its model's task (reads no data)."""
    from .data import dataset_info
    from .models import model_task

    return dataset_info(cfg.dataset, image_size=cfg.image_size, task=model_task(cfg.model))


def load_data(cfg: C.TrainConfig):
    """``(train, test, info)`` of a run: the dataset, cut to ``train_subset`` / ``test_subset``."""
    from .data import build_datasets
    from .models import model_task

    train_set, test_set, info = build_datasets(cfg.dataset, cfg.data_dir, download=cfg.download, seed=cfg.seed,
                                               image_size=cfg.image_size, task=model_task(cfg.model))
    return _subset(train_set, cfg.train_subset, "train_subset"), _subset(test_set, cfg.test_subset, "test_subset"), info


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
        "test_accuracy": last.get("test_accuracy"),
        "best_test_accuracy": max((h["test_accuracy"] for h in history if "test_accuracy" in h), default=None),
        "metric": task_of(model.backbone).metric, "test_score": last.get("test_score"),
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
