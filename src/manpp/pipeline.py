"""Update-unlocked parallel training of modules (``parallel: modules``, started by torchrun).

Process r of S runs stage r: a contiguous group of the K modules (K >= S), with their auxiliary
networks and an optimizer of its own. Every step, stage 0 reads the batch; each stage runs its
modules' local forward, backward and optimizer step as soon as its input arrives, and sends its
detached output, the labels and the input images (InfoPro reconstructs them) on to stage r+1
without waiting for it (``isend``). So stage r works on step t while stage r+1 works on step t-1:
no module waits for a later one's backward (no update locking), and S stages keep S devices
busy after a short fill.

MAN/MAN++: the EMA copy in the auxiliary network of stage r's last module follows the first unit
of stage r+1's first module. Stage r+1 sends that unit's parameters to stage r at the start of
every ``ema_sync_every``-th step (after its previous update), and stage r applies its EMA update
with them. With ``ema_sync_every: 1`` every stage computes exactly what sequential local training
computes, step for step (tested); larger values save communication and use a copy at most that
many steps old.

At the end of each epoch the stages send their modules, optimizer states, random generators and
loss sums to rank 0, which evaluates the whole backbone and writes the checkpoint, ``best.pt``, the
log and the summary through the same run lifecycle as data-parallel training
(:mod:`manpp.lifecycle`): the folder is locked, checked before it is written, and a run resumes
exactly on as many processes. A stop signal received by rank 0 travels down the pipeline with the
batch, so every stage stops after the same step and the checkpoint is consistent; one that reaches
only a later stage takes effect at the end of the epoch. Only classification backbones are
supported.
"""

from __future__ import annotations

import dataclasses
import time

import torch
import torch.distributed as dist

from . import config as C
from . import distributed as D
from .build import build_model, data_info, epoch_loader, load_data, seed_everything, test_loader, with_classes
from .build import steps_per_epoch as steps_per_epoch_of
from .checkpoint import load_model_state, rng_state, set_rng_state
from .engine import LocalContext, local_step
from .errors import ManppError
from .lifecycle import Diverged, Position, RunLifecycle, agreed_signal, ending
from .memory import format_bytes, measure_step
from .models import model_task
from .optim import build_optimizer, holds_backbone, lr_at, parameter_groups, set_lr
from .rundir import RunResult, run_folder
from .runlog import loss_text
from .runsummary import divergence, summary
from .stopsignals import StopSignals
from .tasks import task_of

_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.float64]


def stage_modules(k: int, stages: int) -> list[range]:
    """Modules of each stage: contiguous, as even as possible (the later stages take the remainder)."""
    if stages > k:
        raise ManppError(f"parallel modules: {stages} processes but only K={k} modules; start at most {k} "
                         f"processes (torchrun --nproc_per_node {k}) or raise K")
    base, extra = divmod(k, stages)
    sizes = [base + (1 if r >= stages - extra else 0) for r in range(stages)]
    starts = [sum(sizes[:r]) for r in range(stages)]
    return [range(s, s + n) for s, n in zip(starts, sizes)]


def _send(tensors: list[torch.Tensor], dst: int) -> list:
    """Non-blocking send of a header (dtype and shape of each tensor) and the tensors."""
    header = []
    for t in tensors:
        header += [_DTYPES.index(t.dtype), t.dim(), *t.shape]
    device = tensors[0].device  # NCCL sends device tensors only
    meta = torch.tensor([len(header)], dtype=torch.int64, device=device)
    head = torch.tensor(header, dtype=torch.int64, device=device)
    works = [dist.isend(meta, dst), dist.isend(head, dst)]
    works += [dist.isend(t.contiguous(), dst) for t in tensors]
    return works + [meta, head] + list(tensors)  # keep the buffers alive until the sends complete


def _recv(src: int, device: torch.device) -> list[torch.Tensor]:
    meta = torch.zeros(1, dtype=torch.int64, device=device)
    dist.recv(meta, src)
    header = torch.zeros(int(meta), dtype=torch.int64, device=device)
    dist.recv(header, src)
    values, out, i = header.tolist(), [], 0
    while i < len(values):
        dtype, ndim = _DTYPES[values[i]], values[i + 1]
        shape = values[i + 2:i + 2 + ndim]
        i += 2 + ndim
        t = torch.empty(shape, dtype=dtype, device=device)
        dist.recv(t, src)
        out.append(t)
    return out


def _wait(pending: list) -> None:
    for w in pending:
        if hasattr(w, "wait"):
            w.wait()
    pending.clear()


def _owned_keys(model, modules: range) -> set[str]:
    keys = set()
    units = {i for j in modules for i in model.partition.units_of(j)}
    for name in model.state_dict():
        parts = name.split(".")
        if parts[:2] == ["backbone", "units"] and int(parts[2]) in units:
            keys.add(name)
        elif parts[:2] == ["backbone", "head"] and model.k - 1 in modules:
            keys.add(name)
        elif parts[0] == "aux" and int(parts[1]) in modules:
            keys.add(name)
    return keys


def train_pipelined(cfg: C.TrainConfig, ckpt: dict | None, resume: str | None, device: torch.device, verbose: bool,
                    overwrite: bool, stop: StopSignals) -> RunResult:
    """One stage of the pipeline (see the module docstring); returns the run's result on every rank."""
    if model_task(cfg.model) != "classification":
        raise ManppError(f"parallel modules supports classification backbones; '{cfg.model}' is a "
                         f"{model_task(cfg.model)} model")
    if cfg.method == "e2e":
        raise ManppError("parallel modules needs a local method (dgl, infopro, man, manpp): e2e is one module")
    if cfg.amp == "fp16":
        raise ManppError("parallel modules does not support amp fp16 (one loss scale per stage); use bf16 or none")
    rank, stages, main = D.rank(), D.world_size(), D.is_main()
    if ckpt is not None and ckpt.get("parallel_stages") != stages:
        was = (f"{ckpt['parallel_stages']} pipelined stages" if ckpt.get("parallel_stages")
               else "data-parallel training (not pipelined)")
        raise ManppError(f"the checkpoint was written by {was}, and {stages} stages cannot continue it exactly: "
                         f"resume it as it was started")
    out = run_folder(cfg, resume)
    life = RunLifecycle(out, resume=resume is not None, overwrite=overwrite, ckpt=ckpt, stop=stop)
    life.claim()  # locked and checked; nothing of the run is written before life.begin
    with life.guard():
        seed_everything(cfg.seed)
        if main:
            train_set, test_set, info = load_data(cfg)
            cfg = with_classes(cfg, info, ckpt)  # recorded in config.yaml and the checkpoints
        else:
            train_set, test_set, info = None, None, data_info(cfg)
        cfg = D.broadcast_object(cfg)
        n_train = D.broadcast_object(len(train_set) if main else None)
        model = build_model(cfg, info, device)  # the same seed: the same initial weights on every stage
        task = task_of(model.backbone)
        layout = stage_modules(model.k, stages)
        mine = layout[rank]
        owned = _owned_keys(model, mine)
        params = [p for n, p in model.named_parameters() if n in owned and p.requires_grad]
        optimizer = build_optimizer(cfg, parameter_groups(model, cfg, params))
        cfg = dataclasses.replace(cfg, out=str(out))
        steps_per_epoch = steps_per_epoch_of(n_train, cfg.batch_size, cfg.drop_last)
        if steps_per_epoch < 1:
            raise ManppError(f"batch_size {cfg.batch_size} is larger than the training set ({n_train} images)")
        # the EMA copy of my last module follows the first unit of the next stage's first module
        first_unit_next = model.partition.bounds[mine[-1] + 1][0] if rank < stages - 1 else None
        ema_source = None
        if first_unit_next is not None and hasattr(model.aux[mine[-1]], "after_backward"):
            ema_source = list(model.aux[mine[-1]].source.parameters())
        i_feed = rank > 0 and hasattr(model.aux[mine[0] - 1], "after_backward")
        my_unit = model.backbone.units[model.partition.bounds[mine[0]][0]] if i_feed else None
        at = _restore(ckpt, model, optimizer, rank, device)  # a checkpoint that does not fit fails here

        memory = at.memory
        if memory is None and main:
            x, y = next(iter(torch.utils.data.DataLoader(train_set, batch_size=cfg.batch_size)))
            report = measure_step(model, x.to(device), y.to(device))
            memory = dict(report.__dict__, stage_peak_bytes=[max(report.module_peak_bytes[j] for j in r)
                                                             for r in layout])
        history = at.history
        life.history = history
        life.summarize = lambda status, reason, **extra: summary(
            cfg, model, history, memory, device, task.metric, status, reason, world_size=stages, parallel="modules",
            stage_modules=[[r.start, r.stop - 1] for r in layout], **extra)
        life.begin(cfg, history)  # everything checked: only now is the folder written
        if verbose:
            print(f"{cfg.method}: {cfg.model} on {cfg.dataset}, {model.k} modules in {stages} pipelined stages "
                  f"({', '.join(f'{r.start}-{r.stop - 1}' for r in layout)}), peak activation per stage "
                  f"{', '.join(format_bytes(b) for b in memory['stage_peak_bytes'])} at batch {cfg.batch_size}, "
                  f"EMA sync every {cfg.ema_sync_every} step(s), run folder {out}", flush=True)
        epoch, step, batch_in_epoch = at.epoch, at.step, at.batch_in_epoch
        if ema_source is not None:  # the next stage's first unit, as it is at this step, just before the EMA update
            def receive_source() -> list[torch.Tensor]:
                if step % cfg.ema_sync_every == 0:
                    with torch.no_grad():
                        torch._foreach_copy_([p.data for p in ema_source], _recv(rank + 1, device))
                return [p.detach() for p in ema_source]

            model.aux[mine[-1]].source_callback = receive_source  # read by the EMA update after the module's backward
        if ckpt is None:
            seed_everything(cfg.seed + 1)
        pending: list = []
        signum = 0
        while epoch < cfg.epochs and (cfg.max_steps is None or step < cfg.max_steps) and not signum:
            batches = iter(epoch_loader(train_set, cfg, epoch, batch_in_epoch)) if main else None
            sums, n_batches, _, elapsed = at.take_partial(model.k)
            sums[[j for j in range(model.k) if j not in mine]] = 0  # the partial sums of every stage were saved
            # together; each stage carries on its own modules' (they are added up across stages below)
            partial, flag = None, 0
            model.train()
            started = time.perf_counter()
            while batch_in_epoch < steps_per_epoch:
                if my_unit is not None and step % cfg.ema_sync_every == 0:  # my first unit, for the previous stage
                    _wait(pending)
                    pending += _send([p.detach() for p in my_unit.parameters()], rank - 1)
                if rank == 0:
                    x, y = next(batches)
                    x, y = x.to(device), y.to(device)
                    image = x
                else:
                    x, y, image, told = _recv(rank - 1, device)
                    flag = int(told)  # rank 0's stop decision travels with the batch
                set_lr(optimizer, lr_at(step, cfg, steps_per_epoch), holds_backbone(step, cfg, steps_per_epoch))
                optimizer.zero_grad(set_to_none=True)
                result = local_step(model, x, y, modules=mine, ctx=LocalContext(image, y, model.denormalize))
                losses = torch.stack(result.losses).double().cpu()
                if not torch.isfinite(losses).all():
                    raise Diverged(f"training diverged at step {step} in stage {rank} (modules {mine.start}-"
                                   f"{mine.stop - 1}): a local loss is not finite ({losses.tolist()}); lower the "
                                   f"learning rate (lr={cfg.lr})")
                sums[list(mine)] += losses
                optimizer.step()  # update-unlocked: this stage steps as soon as its own losses are known
                if rank == 0:
                    flag = stop.signum
                if rank < stages - 1:
                    _wait(pending)
                    pending += _send([result.logits, y, image, torch.tensor([flag], device=device)], rank + 1)
                n_batches, step, batch_in_epoch = n_batches + 1, step + 1, batch_in_epoch + 1
                life.step = step
                if flag or (cfg.max_steps is not None and step >= cfg.max_steps):
                    break
            _wait(pending)
            epoch_time = elapsed + time.perf_counter() - started
            complete = batch_in_epoch >= steps_per_epoch
            # every stage's modules, optimizer state, generators and loss sums, on rank 0
            parts = D.gather_objects(_to_cpu(({k: v for k, v in model.state_dict().items() if k in owned},
                                              optimizer.state_dict(), rng_state(device), sums)))
            total = sum(p[3] for p in parts)  # each stage filled only its own modules' sums
            row = None
            if main:
                model.load_state_dict({k: v for part in parts for k, v in part[0].items()}, strict=False)
            if flag and not complete:  # stopped mid-epoch by a signal: no evaluation, the sums are kept
                signum = flag
                partial = {"sums": total, "batches": n_batches, "seconds": epoch_time}
            else:
                bad = None
                if main:
                    row = _evaluate(model, task, test_set, cfg, optimizer, total, n_batches, epoch, step, epoch_time,
                                    steps_per_epoch, complete)
                    history.append(row)
                    bad = divergence(model, row)
                    if verbose:
                        means = [row[f"loss_{j}"] for j in range(model.k)]
                        print(f"epoch {epoch + 1}/{cfg.epochs}  loss {loss_text(means)}  test acc "
                              f"{row['test_accuracy']:.2%}  ({epoch_time:.1f} s, {row['images_per_s']:.0f} img/s)",
                              flush=True)
                bad = D.broadcast_object(bad)  # every stage ends together
                if bad is not None:
                    raise Diverged(f"training diverged by step {step}: {bad}; lower the learning rate (lr={cfg.lr})")
                if complete:
                    epoch, batch_in_epoch = epoch + 1, 0
            if main:
                state = model.state_dict()
                life.save({"model": state, "optimizers": [p[1] for p in parts], "config": cfg.to_dict(),
                           "epoch": epoch, "step": step, "batch_in_epoch": batch_in_epoch, "history": history,
                           "memory": memory, "rng_ranks": [p[2] for p in parts], "parallel_stages": stages,
                           "world_size": stages, "partial": partial,
                           "status": "finished" if epoch >= cfg.epochs else "unfinished"},
                          history, score=row["test_score"] if row else None,
                          best=lambda: {"model": state, "config": cfg.to_dict(), "epoch": epoch, "step": step,
                                        "metric": task.metric, "score": row["test_score"]})
            if not signum:  # one that came during the evaluation or the save counts too
                signum = agreed_signal(stop.signum)
        result = life.end(*ending(cfg, out, epoch, step, batch_in_epoch, signum), signal=signum, step=step)
    return RunResult(result, model, out)


def _evaluate(model, task, test_set, cfg: C.TrainConfig, optimizer, sums, n_batches: int, epoch: int, step: int,
              epoch_time: float, steps_per_epoch: int, complete: bool) -> dict:
    """Rank 0: the whole model on the test set, as one ``log.csv`` row."""
    means = [float(s) / max(1, n_batches) for s in sums]
    metrics = task.evaluate(model, test_loader(test_set, cfg, collate_fn=task.collate),
                            next(model.parameters()).device)
    return {"epoch": epoch + 1, "step": step, "lr": optimizer.param_groups[0]["lr"], "train_loss": means[-1],
            "train_accuracy": None, **{f"test_{k}": v for k, v in metrics.items()},
            "test_score": metrics[task.metric], "epoch_time_s": epoch_time,
            "images_per_s": n_batches * cfg.batch_size / max(epoch_time, 1e-9), "steps": n_batches,
            "steps_per_epoch": steps_per_epoch, "complete": int(complete),
            **{f"loss_{j}": m for j, m in enumerate(means)}}


def _restore(ckpt: dict | None, model, optimizer, rank: int, device) -> Position:
    """The whole model, this stage's optimizer and generators from a checkpoint, else the start."""
    if ckpt is None:
        return Position()
    load_model_state(model, ckpt)
    try:
        optimizer.load_state_dict(ckpt["optimizers"][rank])
    except (ValueError, KeyError, IndexError) as exc:
        raise ManppError(f"the checkpoint's optimizer state of stage {rank} does not fit: {exc}") from None
    set_rng_state(ckpt["rng_ranks"][rank], device)
    return Position.of(ckpt)


def _to_cpu(obj):
    """Tensors moved to the CPU inside nested tuples, lists and dicts (for gathering and saving)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    return obj
