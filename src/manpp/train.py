"""``manpp train``: the epoch loop around the engine.

Building the run is :mod:`manpp.build`; its folder (config, log, checkpoint, summary) is
:mod:`manpp.rundir`. Under ``torchrun`` (see :mod:`manpp.distributed`) every process runs this
loop on its share of each global batch and the gradients are averaged before the one optimizer
step; only rank 0 prints and writes the run folder.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path

import torch

from . import config as C
from . import distributed as D
from .build import (RANK_SEED, build_model, build_optimizer, build_scaler, check_options, epoch_loader, load_data,
                    lr_at, memory_format, parameter_groups, resolved, seed_everything, set_lr)
from .build import steps_per_epoch as steps_per_epoch_of
from .errors import ManppError
from .memory import format_bytes, measure_step
from .rundir import (BEST, CHECKPOINT, CHECKPOINT_VERSION, CONFIG, RunResult, atomic_save, check_resumable,
                     divergence, folder_of, load_checkpoint, loss_text, metric_text, prepare_folder, rng_state, run_folder,
                     set_rng_state, state_dict_mismatch, summary, write_summary)
from .runlog import RunLog
from .tasks import task_of


def train(cfg: C.TrainConfig, *, resume: str | None = None, overwrite: bool = False,
          verbose: bool = True) -> RunResult:
    """Train according to ``cfg`` (see :class:`~manpp.config.TrainConfig`), optionally resuming.

    The run folder is ``cfg.out`` (default ``runs/<model>-<dataset>-<method>[-k<K>]``); one that
    already holds a run is refused unless ``overwrite`` (its run files are removed first). A resumed
    run writes into the folder it was resumed from. Started by ``torchrun``, this joins the process
    group (and destroys it at the end if it created it); see :mod:`manpp.distributed` for what
    every process does.
    """
    check_options(cfg)
    if resume and overwrite:
        raise ManppError("--resume continues the run in its folder and --overwrite replaces a run: give one of them")
    if resume and cfg.out is not None and Path(cfg.out).resolve() != folder_of(resume).resolve():
        raise ManppError(f"a resumed run writes into the folder it was resumed from ('{folder_of(resume)}'), but out "
                         f"is '{cfg.out}': drop --out, or copy the folder and resume the copy to branch the run")
    env = D.launch_env()
    device = D.process_device(cfg.device, env)
    if cfg.parallel is None:
        D.check_batch_size(cfg.batch_size)  # before any work: the global batch must split evenly
    elif resume:
        raise ManppError("resuming a parallel-modules run is not supported; its checkpoint holds the model for "
                         "manpp export and evaluation")
    ckpt = load_checkpoint(resume) if resume else None
    if ckpt is not None and cfg.max_steps is not None and ckpt["step"] >= cfg.max_steps:
        raise ManppError(f"max_steps {cfg.max_steps} is not beyond the run's step {ckpt['step']}: nothing would be "
                         f"trained; give a larger --max-steps, or none to train to the end")
    owner = D.setup(device, cfg.dist_backend, timeout_s=cfg.dist_timeout)
    # On an exception the group is left alone: other processes may be inside a collective with
    # this one, and torchrun ends them when this process exits with the error.
    if cfg.parallel == "modules":
        from .pipeline import train_pipelined

        result = train_pipelined(cfg, device, verbose and D.is_main(), overwrite=overwrite)
    else:
        result = _train(cfg, ckpt, resume, device, verbose, overwrite)
    if owner:
        D.shutdown()
    return result


class Diverged(Exception):
    """A loss, a weight or the test score stopped being finite."""


def _train(cfg: C.TrainConfig, ckpt: dict | None, resume: str | None, device: torch.device,
           verbose: bool, overwrite: bool = False) -> RunResult:
    from tqdm.auto import tqdm

    rank, world, main = D.rank(), D.world_size(), D.is_main()
    D.check_batch_size(cfg.batch_size, world)
    verbose = verbose and main
    out = run_folder(cfg, resume)
    if main:  # before any work: a folder holding another run is refused, an unwritable one named
        prepare_folder(out, resume=resume is not None, overwrite=overwrite)
    seed_everything(cfg.seed)
    if not main:
        D.barrier()  # rank 0 builds (and downloads) the datasets first
    train_set, test_set, info = load_data(cfg)
    if main:
        D.barrier()
    if len(train_set) < cfg.batch_size:
        raise ManppError(f"batch_size {cfg.batch_size} is larger than the training set ({len(train_set)} images)")
    model = build_model(cfg, info, device)
    cfg = resolved(cfg, model)  # the objective, its settings and K as built
    if ckpt is not None:
        check_resumable(cfg, ckpt["config"])
    task = task_of(model.backbone)
    D.broadcast_state(model)  # every process starts from rank 0's parameters, EMA copies and buffers
    params = model.parameters_to_optimize()
    reducer = None  # under torchrun: each module's all-reduce starts when its backward ends
    if D.is_initialized() and (cfg.overlap_comm is True or cfg.overlap_comm == "auto" and device.type == "cuda"):
        reducer = D.OverlappedReducer([model.module_parameters(j) for j in range(model.k)], params)
    optimizer = build_optimizer(cfg, parameter_groups(model, cfg, params))
    scaler = build_scaler(cfg, device)
    cfg = dataclasses.replace(cfg, out=str(out))
    if main:
        C.save_yaml(cfg, out / CONFIG)
    steps_per_epoch = steps_per_epoch_of(len(train_set), cfg.batch_size, cfg.drop_last)
    loader_kw = dict(num_workers=cfg.workers, pin_memory=device.type == "cuda", persistent_workers=False,
                     collate_fn=task.collate)
    n_test = len(test_set)
    if D.is_initialized():  # each process evaluates its own contiguous part of the test set; the sums are reduced
        test_set = torch.utils.data.Subset(test_set, range(*D.shard_bounds(len(test_set))))
    test_loader = torch.utils.data.DataLoader(test_set, batch_size=cfg.eval_batch_size,
                                              generator=torch.Generator().manual_seed(cfg.seed), **loader_kw)
    epoch, step, batch_in_epoch, history, memory = _restore(ckpt, model, optimizer, scaler, cfg, rank, device)
    if memory is None:
        memory = _measure(model, train_set, task, cfg, device, world)
    if verbose:
        _announce(cfg, model, memory, len(train_set), n_test, device, out, world)

    max_steps, fmt = cfg.max_steps, memory_format(cfg)
    total = cfg.epochs * steps_per_epoch if max_steps is None else min(max_steps, cfg.epochs * steps_per_epoch)
    log = RunLog(out, cfg, write=main, verbose=verbose, total_steps=total)
    best = max((h["test_score"] for h in history if h.get("test_score") is not None), default=None)

    def finish(status: str, reason: str | None) -> dict:
        result = dict(summary(cfg, model, history, memory, device, task.metric, status, reason), world_size=world)
        if main:
            write_summary(out, result)
        log.close()
        return result

    try:
        while epoch < cfg.epochs and (max_steps is None or step < max_steps):
            loader = epoch_loader(train_set, cfg, epoch, batch_in_epoch, rank=rank, world=world, **loader_kw)
            model.train()
            # per module: summed mean losses; then training hits, what they were counted on, and images
            # (all processes: the global batch)
            sums = torch.zeros(model.k + 3, dtype=torch.float64)
            n_batches, skipped = 0, 0
            started = time.perf_counter()
            bar = tqdm(loader, desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False,
                       disable=None if verbose else True, dynamic_ncols=True, file=sys.stderr)
            for batch in bar:
                inputs, targets = task.prepare(batch, device, fmt)
                lr = lr_at(step, cfg, steps_per_epoch)
                set_lr(optimizer, lr)
                optimizer.zero_grad(set_to_none=True)
                result = model.train_step(inputs, targets, scaler,
                                          after_module=reducer.start if reducer is not None else None)
                skipped += _optimizer_step(cfg, optimizer, scaler, params, reducer)
                stats = _step_stats(model, task, result, inputs, targets, device, world)
                losses = stats[:model.k]
                if not torch.isfinite(losses).all():
                    raise Diverged(f"training diverged at step {step}: a local loss is not finite "
                                   f"({losses.tolist()}); lower the learning rate (lr={cfg.lr})")
                sums += stats
                n_batches, step, batch_in_epoch = n_batches + 1, step + 1, batch_in_epoch + 1
                bar.set_postfix_str(f"loss {loss_text((sums[:model.k] / n_batches).tolist())}", refresh=False)
                log.step(step, epoch, cfg.epochs, losses.tolist(), lr)
                if max_steps is not None and step >= max_steps:
                    break
            bar.close()
            epoch_time = time.perf_counter() - started
            D.broadcast_buffers(model)  # BatchNorm statistics are per process: evaluate and save rank 0's
            metrics = task.evaluate(model, test_loader, device, reduce=True)
            complete = batch_in_epoch >= steps_per_epoch
            row = _epoch_row(model, optimizer, scaler, task, metrics, sums, n_batches, skipped, epoch, step,
                             epoch_time, steps_per_epoch, complete)
            history.append(row)
            log.epoch(row)
            bad = divergence(model, row)
            if bad is not None:
                raise Diverged(f"training diverged by step {step}: {bad}; lower the learning rate (lr={cfg.lr})")
            if verbose:
                means = [row[f"loss_{j}"] for j in range(model.k)]
                train_acc = "" if row["train_accuracy"] is None else f"  train acc {row['train_accuracy']:.2%}"
                print(f"epoch {epoch + 1}/{cfg.epochs}  loss {loss_text(means)}{train_acc}  test "
                      f"{metric_text(task.metric, metrics[task.metric])}  ({epoch_time:.1f} s, "
                      f"{row['images_per_s']:.0f} img/s)", flush=True)
            if complete:
                epoch, batch_in_epoch = epoch + 1, 0
            rngs = D.gather_objects(rng_state(device))  # every process's generators, for an exact resume
            if main:
                state = model.state_dict()
                atomic_save({"model": state, "optimizer": optimizer.state_dict(),
                             "scaler": scaler.state_dict() if scaler is not None else None, "config": cfg.to_dict(),
                             "epoch": epoch, "step": step, "batch_in_epoch": batch_in_epoch, "history": history,
                             "memory": memory, "rng": rngs[0], "rng_ranks": rngs, "world_size": world,
                             "status": "finished" if epoch >= cfg.epochs else "unfinished",
                             "version": CHECKPOINT_VERSION}, out / CHECKPOINT)
                if best is None or row["test_score"] > best:  # the best evaluation so far, by the task's metric
                    best = row["test_score"]
                    atomic_save({"model": state, "config": cfg.to_dict(), "epoch": epoch, "step": step,
                                 "metric": task.metric, "score": best, "version": CHECKPOINT_VERSION}, out / BEST)
    except Diverged as exc:
        finish("diverged", str(exc))
        kept = f"the checkpoint in {out} is the last finite one" if (out / CHECKPOINT).exists() else \
            f"no checkpoint was kept in {out}"
        raise ManppError(f"{exc} ({kept}; summary.json says status diverged)") from None
    except KeyboardInterrupt:
        finish("stopped", f"interrupted at step {step}; the checkpoint holds the last evaluation: resume with "
                          f"--resume {out}")
        raise

    if epoch >= cfg.epochs:
        result = finish("finished", None)
    else:
        where = f"after epoch {epoch}" if batch_in_epoch == 0 else f"in epoch {epoch + 1}"
        result = finish("stopped", f"max_steps {max_steps} reached at step {step}, {where} of {cfg.epochs}: "
                                   f"continue with --resume {out}")
    return RunResult(result, model, out)


def _restore(ckpt: dict | None, model, optimizer, scaler, cfg: C.TrainConfig, rank: int, device):
    """``(epoch, step, batch_in_epoch, history, memory)``: where a checkpoint left off, else the start."""
    if ckpt is None:
        return 0, 0, 0, [], None
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as exc:
        raise ManppError(f"checkpoint does not fit this model: {state_dict_mismatch(exc)}") from None
    optimizer.load_state_dict(ckpt["optimizer"])
    if scaler is not None and ckpt.get("scaler"):
        scaler.load_state_dict(ckpt["scaler"])
    ranks = ckpt.get("rng_ranks") or [ckpt["rng"]]
    if rank < len(ranks):
        set_rng_state(ranks[rank], device)
    else:  # more processes than when it was saved: a fresh stream for this one
        seed_everything(cfg.seed + 1 + rank * RANK_SEED + ckpt["step"])
    return ckpt["epoch"], ckpt["step"], ckpt["batch_in_epoch"], ckpt["history"], ckpt.get("memory")


def _measure(model, train_set, task, cfg: C.TrainConfig, device, world: int) -> dict:
    """One measured step on the first batch (per process: what one GPU holds for its share)."""
    memory = None
    if D.is_main():
        local_batch = D.check_batch_size(cfg.batch_size, world)
        batch = next(iter(torch.utils.data.DataLoader(train_set, batch_size=local_batch, collate_fn=task.collate)))
        memory = measure_step(model, *task.prepare(batch, device, memory_format(cfg))).__dict__
    memory = D.broadcast_object(memory)
    seed_everything(cfg.seed + 1 + D.rank() * RANK_SEED)  # the same RNG stream whether or not memory was measured
    return memory


def _announce(cfg: C.TrainConfig, model, memory: dict, n_train: int, n_test: int, device, out: Path,
              world: int) -> None:
    per = f"at batch {cfg.batch_size}" if world == 1 else (
        f"at batch {cfg.batch_size // world} per process ({world} processes, global batch {cfg.batch_size})")
    objective = f" ({model.objective})" if model.objective and model.objective != cfg.method else ""
    print(f"{cfg.method}{objective}: {cfg.model} on {cfg.dataset} ({n_train} train / {n_test} test), "
          f"{model.k} module{'s' if model.k > 1 else ''} [{model.partition.label}], "
          f"activation peak {format_bytes(memory['peak_activation_bytes'])} {per}, device {device}, run folder {out}")
    if model.k > 1:
        print("  modules: " + ", ".join(model.partition.describe(model.backbone.unit_names)))
    recompute = [getattr(a, "recompute_ema", None) for a in model.aux]
    if cfg.recompute_ema == "auto" and recompute and all(isinstance(r, bool) for r in recompute):
        chosen = [str(j) for j, r in enumerate(recompute) if r]
        print(f"  EMA branch recomputed in backward in module{'s' if len(chosen) != 1 else ''} "
              f"{', '.join(chosen) or 'none'} (recompute_ema=auto: where it sets the activation peak)")


def _optimizer_step(cfg: C.TrainConfig, optimizer, scaler, params, reducer=None) -> int:
    """Average gradients over processes, clip, step (fp16: unscale, maybe skip); 1 if the step was skipped."""
    if reducer is not None:
        reducer.wait()  # the per-module all-reduces started during the backward passes
    elif D.is_initialized():
        D.all_reduce_gradients(params)  # every module's gradients, averaged over the processes
    if cfg.grad_clip is not None:  # the global norm over all modules, as the release's detection code
        if scaler is not None:
            scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
    if scaler is None:
        optimizer.step()
        return 0
    before = scaler.get_scale()  # a step with an inf/nan gradient is skipped (the same on every process)
    scaler.step(optimizer)
    scaler.update()
    return int(scaler.get_scale() < before)


def _step_stats(model, task, result, inputs, targets, device, world: int) -> torch.Tensor:
    """Every module's loss, the training hits and count, and the images, over the global batch (CPU, float64)."""
    hits = task.train_hits(result.logits, targets)
    if hits is None:
        hits = torch.zeros(2, dtype=torch.float64, device=device)
    stats = torch.cat([torch.stack([v.float() for v in result.losses]).double(), hits,
                       torch.tensor([inputs.shape[0]], dtype=torch.float64, device=device)])
    if D.is_initialized():
        D.all_reduce_sum(stats)
        stats[:model.k] /= world  # mean over the shards = mean over the global batch
    return stats.cpu()


def _epoch_row(model, optimizer, scaler, task, metrics: dict, sums, n_batches: int, skipped: int, epoch: int,
               step: int, epoch_time: float, steps_per_epoch: int, complete: bool) -> dict:
    """One ``log.csv`` row: lr, losses, training and test scores, time; MAN/MAN++ scales and EMA lags."""
    means = (sums[:model.k] / max(1, n_batches)).tolist()
    correct, counted, seen = (float(v) for v in sums[model.k:])
    row = {"epoch": epoch + 1, "step": step, "lr": optimizer.param_groups[0]["lr"],
           "train_loss": means[-1], "train_accuracy": correct / counted if counted else None,
           **{f"test_{name}": value for name, value in metrics.items()}, "test_score": metrics[task.metric],
           "epoch_time_s": epoch_time, "images_per_s": seen / max(epoch_time, 1e-9), "steps": n_batches,
           "steps_per_epoch": steps_per_epoch, "complete": int(complete)}
    row.update({f"loss_{j}": m for j, m in enumerate(means)})
    for j, aux in enumerate(model.aux):  # MAN/MAN++: the mixing scale and how far each copy lags its unit
        if hasattr(aux, "ema_distance"):
            row[f"scale_{j}"] = float(aux.scale.detach())
            row[f"ema_dist_{j}"] = aux.ema_distance()
    if scaler is not None:
        row["loss_scale"] = scaler.get_scale()
        row["skipped_steps"] = int(skipped)
    return row
