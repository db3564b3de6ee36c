"""``manpp train``: the one epoch loop around the engine.

Building the run is :mod:`manpp.train.build`; its life in the run folder (lock, checks before any write,
checkpoint, log, summary, what happens on a signal or an error) is :mod:`manpp.run.lifecycle`. How a step
runs is the loop's step strategy: :class:`manpp.train.replica.ReplicaSteps` (one process, or torchrun's
data-parallel replicas: every process on its share of each global batch, the gradients averaged before
the one optimizer step) or :class:`manpp.train.pipeline.StageSteps` (``parallel=modules``: one pipelined
stage of modules per process). Only rank 0 prints and writes the run folder, and a stop signal stops
every process after the same step.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import sys
import time
import warnings
from pathlib import Path

import torch

from ..base import distributed as D
from ..base.checkpoint import load_model_state
from ..base.errors import ManppError
from ..config import trainconfig as C
from ..config.resolve import data_info, resolve
from ..core.optim import build_optimizer, holds_backbone, lr_at, parameter_groups, set_lr
from ..run.lifecycle import Diverged, Position, RunLifecycle, agreed_signal, ending
from ..run.rundir import RunResult, folder_of, read_summary, resume_source, run_folder
from ..run.runlog import RunLog, loss_text
from ..run.runsummary import divergence, metric_text, summary
from ..run.stopsignals import StopSignals, ignore_in_workers
from ..tasks import task_of
from .build import build_model, check_options, epoch_loader, load_data, seed_everything, test_loader, with_classes
from .build import steps_per_epoch as steps_per_epoch_of
from .pipeline import StageSteps, check_pipelined
from .replica import ReplicaSteps


def train(cfg: C.TrainConfig, *, resume: str | None = None, overwrite: bool = False, verbose: bool = True,
          handle_signals: bool = True) -> RunResult:
    """Train according to ``cfg`` (see :class:`~manpp.config.TrainConfig`), optionally resuming.

    The run folder is ``cfg.out`` (default ``runs/<model>-<dataset>-<method>[-k<K>]``); one that
    already holds a run is refused unless ``overwrite``, which replaces it once the new run has
    written its first checkpoint (:mod:`manpp.run.rundir`). A resumed run writes into the folder it
    was resumed from. With ``handle_signals`` (in the main thread), SIGINT, SIGTERM and SIGUSR1
    stop the run after the current step with a checkpoint: its summary says ``stopped`` and
    ``result.signal`` holds the signal's number. Started by ``torchrun``, this joins the process
    group (and destroys it at the end if it created it); see :mod:`manpp.base.distributed`.
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
            check_pipelined(cfg, ckpt)
            if D.world_size() == 1:  # not silently one stage: a pipeline needs several processes
                warnings.warn("parallel=modules without torchrun runs every module in this one process (one stage, "
                              "as without it): start it with torchrun --nproc_per_node N to pipeline N stages",
                              stacklevel=2)
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
    """The one training loop. How a step runs, which parameters this process steps, and how processes are
    gathered for evaluation and saving is its step strategy: :class:`manpp.train.replica.ReplicaSteps` (one
    process, or data-parallel replicas) or :class:`manpp.train.pipeline.StageSteps` (``parallel=modules``)."""
    from tqdm.auto import tqdm

    pipelined = cfg.parallel == "modules"
    if not pipelined:
        D.check_batch_size(cfg.batch_size, D.world_size())
    verbose = verbose and D.is_main()
    out = run_folder(cfg, resume)
    life = RunLifecycle(out, resume=resume is not None, overwrite=overwrite, ckpt=ckpt, stop=stop)
    life.claim()  # locked and checked; nothing of the run is written before life.begin
    with life.guard(), contextlib.ExitStack() as stack:
        seed_everything(cfg.seed)
        cfg, train_set, test_set, info, n_train = _data(cfg, ckpt, pipelined)
        model = build_model(cfg, info, device)  # the same seed: the same initial weights on every process
        task = task_of(model.backbone)
        steps = StageSteps(cfg, model, task, device) if pipelined else ReplicaSteps(cfg, model, task, device)
        optimizer = build_optimizer(cfg, parameter_groups(model, cfg, steps.params))
        steps.attach(optimizer, stack)
        cfg = dataclasses.replace(cfg, out=str(out))
        loader_kw = dict(num_workers=cfg.workers, pin_memory=device.type == "cuda", persistent_workers=False,
                         collate_fn=task.collate, worker_init_fn=ignore_in_workers if cfg.workers else None)
        n_test = len(test_set) if test_set is not None else 0
        if D.is_initialized() and steps.shards_tests:  # each process evaluates its own part; the sums are reduced
            test_set = torch.utils.data.Subset(test_set, range(*D.shard_bounds(len(test_set))))
        at = Position.of(ckpt)
        if ckpt is not None:  # a checkpoint that does not fit fails here
            load_model_state(model, ckpt)
            steps.restore(ckpt)
        memory = at.memory
        if memory is None:
            memory = steps.measure(train_set)
            seed_everything(cfg.seed + 1 + steps.seed_offset)  # the same RNG stream whether or not it was measured
        history = at.history
        life.history = history
        life.summarize = lambda status, reason, **extra: dict(
            summary(cfg, model, history, memory, device, task.metric, status, reason, **extra), **steps.summary_extra())
        life.begin(cfg, history)  # everything checked: only now is the folder written
        if verbose:
            steps.announce(cfg, memory, n_train, n_test, out)
        per_epoch = steps_per_epoch_of(n_train, cfg.batch_size, cfg.drop_last)
        total = cfg.epochs * per_epoch if cfg.max_steps is None else min(cfg.max_steps, cfg.epochs * per_epoch)
        log = stack.enter_context(contextlib.closing(RunLog(out, cfg, write=D.is_main(), verbose=verbose,
                                                            total_steps=total)))
        log.start(at.step)
        # one bar for the whole run (its rate, and so its ETA, includes the evaluations); none off a terminal
        bar = tqdm(total=total, initial=min(at.step, total), leave=False, disable=None if verbose else True,
                   dynamic_ncols=True, file=sys.stderr, unit="step")
        stack.callback(bar.close)
        loop = _Loop(cfg, model, task, optimizer, steps, life, log, bar, stop, history, memory, per_epoch, train_set,
                     test_loader(test_set, cfg, **loader_kw) if test_set is not None else None, loader_kw, verbose,
                     at.epoch, at.step, at.batch_in_epoch)
        signum = 0
        while loop.epoch < cfg.epochs and (cfg.max_steps is None or loop.step < cfg.max_steps) and not signum:
            sums, n_batches, skipped, seconds, asked = loop.train_one_epoch(*at.take_partial(model.k + 3))
            complete = loop.batch_in_epoch >= per_epoch
            if asked and not complete:  # stopped mid-epoch by a signal: no evaluation, the sums are kept
                signum = agreed_signal(stop.signum)
                loop.save(None, {"sums": sums, "batches": n_batches, "skipped": skipped, "seconds": seconds})
                break
            row = loop.evaluate(sums, n_batches, skipped, seconds, complete)
            if complete:
                loop.epoch, loop.batch_in_epoch = loop.epoch + 1, 0
            loop.save(row)
            signum = agreed_signal(stop.signum)  # one that came during the evaluation or the save counts too
        result = life.end(*ending(cfg, out, loop.epoch, loop.step, loop.batch_in_epoch, signum), signal=signum,
                          step=loop.step)
    return RunResult(result, model, out)


def _data(cfg: C.TrainConfig, ckpt: dict | None, pipelined: bool) -> tuple:
    """``(cfg with its classes, train set, test set, dataset info, training images)``. Rank 0 builds (and
    downloads) the data first; under ``parallel=modules`` only stage 0 reads it, the others get its config."""
    main = D.is_main()
    if pipelined and not main:  # the other stages receive what they train on
        train_set, test_set, info = None, None, data_info(cfg)
    else:
        if not main:
            D.barrier()
        train_set, test_set, info = load_data(cfg)
        cfg = with_classes(cfg, info, ckpt)  # recorded in config.yaml and every checkpoint
        if main and not pipelined:
            D.barrier()
    if pipelined:
        cfg = D.broadcast_object(cfg)
    n_train = D.broadcast_object(len(train_set) if main else None) if pipelined else len(train_set)
    if n_train < cfg.batch_size:
        raise ManppError(f"batch_size {cfg.batch_size} is larger than the training set ({n_train} images)")
    return cfg, train_set, test_set, info, n_train


@dataclasses.dataclass
class _Loop:
    """One run's loop: its parts, and where it stands (epoch, step, batch in the epoch)."""

    cfg: C.TrainConfig
    model: object
    task: object
    optimizer: torch.optim.Optimizer
    steps: object  # ReplicaSteps or StageSteps
    life: RunLifecycle
    log: RunLog
    bar: object
    stop: StopSignals
    history: list
    memory: dict
    per_epoch: int
    train_set: object
    tests: object
    loader_kw: dict
    verbose: bool
    epoch: int
    step: int
    batch_in_epoch: int

    def train_one_epoch(self, sums, n_batches: int, skipped: int, elapsed: float) -> tuple:
        """The rest of the epoch (from where a stop left it, with its sums), until its end, ``max_steps``
        or a stop signal: ``(sums, batches, skipped, seconds, asked to stop)``; rank 0's sums are every
        process's (every stage's) after it."""
        cfg, model, steps = self.cfg, self.model, self.steps
        rank, world = steps.shard
        loader = (epoch_loader(self.train_set, cfg, self.epoch, self.batch_in_epoch, rank=rank, world=world,
                               **self.loader_kw) if steps.reads_data
                  else itertools.repeat(None, self.per_epoch - self.batch_in_epoch))
        model.train()
        # per module: summed mean losses; then training hits, what they were counted on, and images
        # (all processes: the global batch); carried over when a stop signal cut the epoch short
        sums = steps.own_partial(sums)
        asked = False
        started = time.perf_counter()
        self.bar.set_description(f"epoch {self.epoch + 1}/{cfg.epochs}", refresh=False)
        for batch in loader:
            lr = lr_at(self.step, cfg, self.per_epoch)
            set_lr(self.optimizer, lr, holds_backbone(self.step, cfg, self.per_epoch))
            stats, was_skipped = steps.step(batch, self.step, self.stop)
            skipped += was_skipped
            losses = stats[:model.k]
            if not torch.isfinite(losses).all():
                raise Diverged(f"training diverged at step {self.step}{steps.where}: a local loss is not finite "
                               f"({losses.tolist()}); lower the learning rate (lr={cfg.lr})")
            sums += stats[:-1]
            n_batches, self.step, self.batch_in_epoch = n_batches + 1, self.step + 1, self.batch_in_epoch + 1
            self.life.step = self.step
            means = [float(v) / n_batches for v in steps.shown(sums[:model.k].tolist())]
            self.bar.set_postfix_str(f"loss {loss_text(means)}", refresh=False)
            self.bar.update(1)
            self.log.step(self.step, self.epoch, cfg.epochs, steps.shown(losses.tolist()), lr)
            asked = bool(stats[-1] > 0)  # a stop signal reached some process: all stop after this step
            if asked or (cfg.max_steps is not None and self.step >= cfg.max_steps):
                break
        seconds = elapsed + time.perf_counter() - started
        return steps.end_epoch(sums), n_batches, skipped, seconds, asked  # (rank 0 then holds the whole model)

    def evaluate(self, sums, n_batches: int, skipped: int, seconds: float, complete: bool) -> dict | None:
        """The model on the test set as one ``log.csv`` row (where this process has one: every replica, or
        pipelined rank 0); a divergence ends every process."""
        cfg, model, steps = self.cfg, self.model, self.steps
        steps.before_evaluation()
        metrics = steps.evaluate(self.tests)
        row = None
        if metrics is not None:
            row = _epoch_row(model, self.optimizer, steps.scaler, self.task, metrics, sums, n_batches, skipped,
                             self.epoch, self.step, seconds, self.per_epoch, complete)
            self.history.append(row)
            self.log.epoch(row)
        bad = D.broadcast_object(divergence(model, row) if row is not None else None)  # every process ends together
        if bad is not None:
            raise Diverged(f"training diverged by step {self.step}: {bad}; lower the learning rate (lr={cfg.lr})")
        if self.verbose:
            means = [row[f"loss_{j}"] for j in range(model.k)]
            train_acc = "" if row["train_accuracy"] is None else f"  train acc {row['train_accuracy']:.2%}"
            print(f"epoch {self.epoch + 1}/{cfg.epochs}  loss {loss_text(means)}{train_acc}  test "
                  f"{metric_text(self.task.metric, metrics[self.task.metric])}  ({seconds:.1f} s, "
                  f"{row['images_per_s']:.0f} img/s)", flush=True)
        return row

    def save(self, row: dict | None, partial: dict | None = None) -> None:
        """The checkpoint (every process takes part; rank 0 writes), the log and ``best.pt``."""
        parts = self.steps.checkpoint_parts()
        if not D.is_main():
            return
        cfg, state = self.cfg, self.model.state_dict()
        epoch, step = self.epoch, self.step
        self.life.save({"model": state, **parts, "config": cfg.to_dict(), "epoch": epoch, "step": step,
                        "batch_in_epoch": self.batch_in_epoch, "history": self.history, "memory": self.memory,
                        "partial": partial, "status": "finished" if epoch >= cfg.epochs else "unfinished"},
                       self.history, score=row["test_score"] if row else None,
                       best=lambda: {"model": state, "config": cfg.to_dict(), "epoch": epoch, "step": step,
                                     "metric": self.task.metric, "score": row["test_score"]})


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
