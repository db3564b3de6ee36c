"""``manpp train``: the epoch loop around the engine.

Building the run is :mod:`manpp.build`; its life in the run folder (lock, checks before any write,
checkpoint, log, summary, what happens on a signal or an error) is :mod:`manpp.lifecycle`. Under
``torchrun`` (see :mod:`manpp.distributed`) every process runs this loop on its share of each
global batch and the gradients are averaged before the one optimizer step; only rank 0 prints and
writes the run folder, and a stop signal received by any process stops all of them after the same
step.
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
import time
import warnings
from pathlib import Path

import torch

from . import config as C
from . import distributed as D
from .build import (RANK_SEED, build_model, check_options, epoch_loader, load_data, memory_format, seed_everything,
                    test_loader, with_classes)
from .build import steps_per_epoch as steps_per_epoch_of
from .checkpoint import load_model_state, rng_state, set_rng_state
from .earlystep import StepInBackward
from .errors import ManppError
from .lifecycle import Diverged, Position, RunLifecycle, agreed_signal, ending
from .memory import format_bytes, measure_step
from .optim import build_optimizer, build_scaler, holds_backbone, lr_at, parameter_groups, set_lr
from .resolve import resolve
from .rundir import RunResult, folder_of, read_summary, resume_source, run_folder
from .runlog import RunLog, loss_text
from .runsummary import divergence, metric_text, summary
from .stopsignals import StopSignals, ignore_in_workers
from .tasks import task_of


def train(cfg: C.TrainConfig, *, resume: str | None = None, overwrite: bool = False, verbose: bool = True,
          handle_signals: bool = True) -> RunResult:
    """Train according to ``cfg`` (see :class:`~manpp.config.TrainConfig`), optionally resuming.

    The run folder is ``cfg.out`` (default ``runs/<model>-<dataset>-<method>[-k<K>]``); one that
    already holds a run is refused unless ``overwrite``, which replaces it once the new run has
    written its first checkpoint (:mod:`manpp.rundir`). A resumed run writes into the folder it
    was resumed from. With ``handle_signals`` (in the main thread), SIGINT, SIGTERM and SIGUSR1
    stop the run after the current step with a checkpoint: its summary says ``stopped`` and
    ``result.signal`` holds the signal's number. Started by ``torchrun``, this joins the process
    group (and destroys it at the end if it created it); see :mod:`manpp.distributed`.
    """
    check_options(cfg)
    cfg = resolve(cfg)  # every open choice made once, here: K, split, objective, its settings, the switches
    if resume and overwrite:
        raise ManppError("--resume continues the run in its folder and --overwrite replaces a run: give one of them")
    if resume and cfg.out is not None and Path(cfg.out).resolve() != folder_of(resume).resolve():
        raise ManppError(f"a resumed run writes into the folder it was resumed from ('{folder_of(resume)}'), but out "
                         f"is '{cfg.out}': drop --out, or copy the folder and resume the copy to branch the run")
    env = D.launch_env()
    device = D.process_device(cfg.device, env)
    if cfg.parallel is None:
        D.check_batch_size(cfg.batch_size)  # before any work: the global batch must split evenly
    ckpt = resume_source(resume)[0] if resume else None  # None: it ended before its first checkpoint (afresh)
    if ckpt is not None:
        C.check_resumable(cfg, ckpt["config"])  # before anything is built: the configs are both resolved
        _check_continuable(cfg, ckpt, resume)
    stop = StopSignals(announce=D.is_main())  # even with --quiet: a stop is news
    with stop if handle_signals else contextlib.nullcontext():
        owner = D.setup(device, cfg.dist_backend, timeout_s=cfg.dist_timeout)
        # On an exception the group is left alone: other processes may be inside a collective with
        # this one, and torchrun ends them when this process exits with the error.
        if cfg.parallel == "modules":
            if D.world_size() == 1:  # not silently one stage: a pipeline needs several processes
                warnings.warn("parallel=modules without torchrun runs every module in this one process (one stage, "
                              "as without it): start it with torchrun --nproc_per_node N to pipeline N stages",
                              stacklevel=2)
            from .pipeline import train_pipelined

            result = train_pipelined(cfg, ckpt, resume, device, verbose and D.is_main(), overwrite, stop)
        else:
            result = _train(cfg, ckpt, resume, device, verbose, overwrite, stop)
        if owner:
            D.shutdown()
    return result


def _check_continuable(cfg: C.TrainConfig, ckpt: dict, resume: str) -> None:
    """A resume that would train nothing is refused before any work (but one that only records the end
    of a run killed after its last checkpoint is allowed)."""
    if cfg.max_steps is not None and ckpt["step"] >= cfg.max_steps:
        raise ManppError(f"max_steps {cfg.max_steps} is not beyond the run's step {ckpt['step']}: nothing would be "
                         f"trained; give a larger --max-steps, or none to train to the end")
    if ckpt["epoch"] >= cfg.epochs and (read_summary(folder_of(resume)) or {}).get("status") == "finished":
        raise ManppError(f"the run in '{folder_of(resume)}' has trained {ckpt['epoch']} epoch(s), and epochs is "
                         f"{cfg.epochs}: nothing to resume (give epochs=N with N > {ckpt['epoch']} to train it further)")


def _train(cfg: C.TrainConfig, ckpt: dict | None, resume: str | None, device: torch.device, verbose: bool,
           overwrite: bool, stop: StopSignals) -> RunResult:
    from tqdm.auto import tqdm

    rank, world, main = D.rank(), D.world_size(), D.is_main()
    D.check_batch_size(cfg.batch_size, world)
    verbose = verbose and main
    out = run_folder(cfg, resume)
    life = RunLifecycle(out, resume=resume is not None, overwrite=overwrite, ckpt=ckpt, stop=stop)
    life.claim()  # locked and checked; nothing of the run is written before life.begin
    with life.guard(), contextlib.ExitStack() as stack:
        seed_everything(cfg.seed)
        if not main:
            D.barrier()  # rank 0 builds (and downloads) the datasets first
        train_set, test_set, info = load_data(cfg)
        cfg = with_classes(cfg, info, ckpt)  # recorded in config.yaml and every checkpoint
        if main:
            D.barrier()
        if len(train_set) < cfg.batch_size:
            raise ManppError(f"batch_size {cfg.batch_size} is larger than the training set ({len(train_set)} images)")
        model = build_model(cfg, info, device)
        task = task_of(model.backbone)
        D.broadcast_state(model)  # every process starts from rank 0's parameters, EMA copies and buffers
        params = model.parameters_to_optimize()
        reducer = None  # under torchrun: each module's all-reduce starts when its backward ends
        if D.is_initialized() and (cfg.overlap_comm is True or cfg.overlap_comm == "auto" and device.type == "cuda"):
            reducer = D.OverlappedReducer([model.module_parameters(j) for j in range(model.k)], params)
        optimizer = build_optimizer(cfg, parameter_groups(model, cfg, params))
        scaler = build_scaler(cfg, device)
        early = None  # step_in_backward: every module (E2E: every parameter) steps when its gradients are final
        if cfg.step_in_backward:
            early = StepInBackward(model, optimizer, params)
            stack.callback(early.close)
            reducer = None  # each module's gradients are averaged when it steps
        cfg = dataclasses.replace(cfg, out=str(out))
        steps_per_epoch = steps_per_epoch_of(len(train_set), cfg.batch_size, cfg.drop_last)
        loader_kw = dict(num_workers=cfg.workers, pin_memory=device.type == "cuda", persistent_workers=False,
                         collate_fn=task.collate, worker_init_fn=ignore_in_workers if cfg.workers else None)
        n_test = len(test_set)
        if D.is_initialized():  # each process evaluates its own contiguous part of the test set; the sums are reduced
            test_set = torch.utils.data.Subset(test_set, range(*D.shard_bounds(len(test_set))))
        tests = test_loader(test_set, cfg, **loader_kw)
        at = _restore(ckpt, model, optimizer, scaler, cfg, rank, device)  # a checkpoint that does not fit fails here
        memory = at.memory if at.memory is not None else _measure(model, train_set, task, cfg, device, world)
        history = at.history
        life.history = history
        life.summarize = lambda status, reason, **extra: dict(
            summary(cfg, model, history, memory, device, task.metric, status, reason, **extra), world_size=world)
        life.begin(cfg, history)  # everything checked: only now is the folder written
        if verbose:
            _announce(cfg, model, memory, len(train_set), n_test, device, out, world)

        epoch, step, batch_in_epoch = at.epoch, at.step, at.batch_in_epoch
        max_steps, fmt = cfg.max_steps, memory_format(cfg)
        total = cfg.epochs * steps_per_epoch if max_steps is None else min(max_steps, cfg.epochs * steps_per_epoch)
        log = stack.enter_context(contextlib.closing(RunLog(out, cfg, write=main, verbose=verbose, total_steps=total)))
        log.start(step)

        def save(row: dict | None, partial: dict | None = None) -> None:
            rngs = D.gather_objects(rng_state(device))  # every process's generators, for an exact resume
            if not main:
                return
            state = model.state_dict()
            life.save({"model": state, "optimizer": optimizer.state_dict(),
                       "scaler": scaler.state_dict() if scaler is not None else None, "config": cfg.to_dict(),
                       "epoch": epoch, "step": step, "batch_in_epoch": batch_in_epoch, "history": history,
                       "memory": memory, "rng": rngs[0], "rng_ranks": rngs, "world_size": world, "partial": partial,
                       "status": "finished" if epoch >= cfg.epochs else "unfinished"},
                      history, score=row["test_score"] if row else None,
                      best=lambda: {"model": state, "config": cfg.to_dict(), "epoch": epoch, "step": step,
                                    "metric": task.metric, "score": row["test_score"]})

        signum = 0
        # one bar for the whole run (its rate, and so its ETA, includes the evaluations); none off a terminal
        bar = tqdm(total=total, initial=min(step, total), leave=False, disable=None if verbose else True,
                   dynamic_ncols=True, file=sys.stderr, unit="step")
        stack.callback(bar.close)
        while epoch < cfg.epochs and (max_steps is None or step < max_steps) and not signum:
            loader = epoch_loader(train_set, cfg, epoch, batch_in_epoch, rank=rank, world=world, **loader_kw)
            model.train()
            # per module: summed mean losses; then training hits, what they were counted on, and images
            # (all processes: the global batch); carried over when a stop signal cut the epoch short
            sums, n_batches, skipped, elapsed = at.take_partial(model.k + 3)
            asked = False
            started = time.perf_counter()
            bar.set_description(f"epoch {epoch + 1}/{cfg.epochs}", refresh=False)
            for batch in loader:
                inputs, targets = task.prepare(batch, device, fmt)
                lr = lr_at(step, cfg, steps_per_epoch)
                set_lr(optimizer, lr, holds_backbone(step, cfg, steps_per_epoch))
                optimizer.zero_grad(set_to_none=True)
                after = early.after_module if early is not None else reducer.start if reducer is not None else None
                if early is not None:
                    early.begin_step()
                result = model.train_step(inputs, targets, scaler, after_module=after)
                if early is not None:
                    early.end_step()
                else:
                    skipped += _optimizer_step(cfg, optimizer, scaler, params, reducer)
                stats = _step_stats(model, task, result, inputs, targets, device, world, stop.signum)
                losses = stats[:model.k]
                if not torch.isfinite(losses).all():
                    raise Diverged(f"training diverged at step {step}: a local loss is not finite "
                                   f"({losses.tolist()}); lower the learning rate (lr={cfg.lr})")
                sums += stats[:-1]
                n_batches, step, batch_in_epoch = n_batches + 1, step + 1, batch_in_epoch + 1
                life.step = step
                bar.set_postfix_str(f"loss {loss_text((sums[:model.k] / n_batches).tolist())}", refresh=False)
                bar.update(1)
                log.step(step, epoch, cfg.epochs, losses.tolist(), lr)
                asked = bool(stats[-1] > 0)  # a stop signal reached some process: all stop after this step
                if asked or (max_steps is not None and step >= max_steps):
                    break
            epoch_time = elapsed + time.perf_counter() - started
            complete = batch_in_epoch >= steps_per_epoch
            if asked and not complete:  # stopped mid-epoch by a signal: no evaluation, the sums are kept
                signum = agreed_signal(stop.signum)
                save(None, {"sums": sums, "batches": n_batches, "skipped": skipped, "seconds": epoch_time})
                break
            D.broadcast_buffers(model)  # BatchNorm statistics are per process: evaluate and save rank 0's
            metrics = task.evaluate(model, tests, device, reduce=True)
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
            save(row)
            signum = agreed_signal(stop.signum)  # one that came during the evaluation or the save counts too
        result = life.end(*ending(cfg, out, epoch, step, batch_in_epoch, signum), signal=signum, step=step)
    return RunResult(result, model, out)


def _restore(ckpt: dict | None, model, optimizer, scaler, cfg: C.TrainConfig, rank: int, device) -> Position:
    """Where a checkpoint left off (loaded into the model, optimizer, loss scale and RNG), else the start."""
    if ckpt is None:
        return Position()
    load_model_state(model, ckpt)
    if "optimizer" not in ckpt:
        raise ManppError(f"the checkpoint was written by a run of {ckpt.get('parallel_stages', '?')} pipelined stages: "
                         f"resume it with parallel=modules on as many processes")
    try:
        optimizer.load_state_dict(ckpt["optimizer"])
    except (ValueError, KeyError) as exc:
        raise ManppError(f"the checkpoint's optimizer state does not fit this model: {exc}") from None
    if scaler is not None and ckpt.get("scaler"):
        scaler.load_state_dict(ckpt["scaler"])
    ranks = ckpt.get("rng_ranks") or [ckpt["rng"]]
    if rank < len(ranks):
        set_rng_state(ranks[rank], device)
    else:  # more processes than when it was saved: a fresh stream for this one
        seed_everything(cfg.seed + 1 + rank * RANK_SEED + ckpt["step"])
    return Position.of(ckpt)


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


def _step_stats(model, task, result, inputs, targets, device, world: int, signum: int = 0) -> torch.Tensor:
    """Every module's loss, the training hits and count, and the images, over the global batch; last,
    whether a stop signal reached any process (CPU, float64; one all-reduce carries all of it)."""
    hits = task.train_hits(result.logits, targets)
    if hits is None:
        hits = torch.zeros(2, dtype=torch.float64, device=device)
    stats = torch.cat([torch.stack([v.float() for v in result.losses]).double(), hits,
                       torch.tensor([inputs.shape[0], float(signum > 0)], dtype=torch.float64, device=device)])
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
