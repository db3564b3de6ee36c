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

This is not a second training loop: :class:`StageSteps` is a step strategy of the one loop,
:func:`manpp.train.loop._train` (the other is :class:`manpp.train.replica.ReplicaSteps`). It says which parameters
a stage owns, how a step runs with send and receive, and how the stages are gathered on rank 0 for
evaluation and saving: at the end of each epoch the stages send their modules and loss sums to rank 0,
which evaluates the whole backbone; at each save, their optimizer states and random generators. The
run folder, the log, the checkpoint and a resume are the loop's, the same as for data-parallel
training, and a run resumes exactly on as many processes. A stop signal received by rank 0 travels
down the pipeline with the batch, so every stage stops after the same step and the checkpoint is
consistent; one that reaches only a later stage takes effect at the end of the epoch. Only
classification backbones are supported.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ..base import distributed as D
from ..base.checkpoint import rng_state, set_rng_state
from ..base.errors import ManppError
from ..config import trainconfig as C
from ..core.engine import LocalContext, local_step
from ..memory.measure import format_bytes, measure_step
from ..models import model_task
from .build import memory_format

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


def check_pipelined(cfg: C.TrainConfig, ckpt: dict | None) -> None:
    """Before any work: what a pipelined run cannot do, and a checkpoint it cannot continue."""
    if model_task(cfg.model) != "classification":
        raise ManppError(f"parallel modules supports classification backbones; '{cfg.model}' is a "
                         f"{model_task(cfg.model)} model")
    if cfg.method == "e2e":
        raise ManppError("parallel modules needs a local method (dgl, infopro, man, manpp): e2e is one module")
    if cfg.amp == "fp16":
        raise ManppError("parallel modules does not support amp fp16 (one loss scale per stage); use bf16 or none")
    if cfg.grad_clip is not None:
        raise ManppError(f"parallel modules cannot clip the global gradient norm (grad_clip={cfg.grad_clip}): each "
                         f"stage steps with its own gradients only; drop grad_clip")
    stages = D.world_size()
    if ckpt is not None and ckpt.get("parallel_stages") != stages:
        was = (f"{ckpt['parallel_stages']} pipelined stages" if ckpt.get("parallel_stages")
               else "data-parallel training (not pipelined)")
        raise ManppError(f"the checkpoint was written by {was}, and {stages} stages cannot continue it exactly: "
                         f"resume it as it was started")


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


class StageSteps:
    """The step strategy of one pipelined stage (see the module docstring): this process trains the
    modules of its stage, fed by the previous stage and feeding the next."""

    shards_tests = False  # rank 0 evaluates the whole model on the whole test set
    seed_offset = 0  # every stage draws from seed + 1 (only stage 0 draws: its batches' augmentation)

    def __init__(self, cfg: C.TrainConfig, model, task, device: torch.device):
        self.cfg, self.model, self.task, self.device = cfg, model, task, device
        self.rank, self.stages = D.rank(), D.world_size()
        self.reads_data = self.rank == 0
        self.shard = (0, 1)  # stage 0 reads the whole of each batch
        self.layout = stage_modules(model.k, self.stages)
        self.mine = self.layout[self.rank]
        self.owned = _owned_keys(model, self.mine)
        self.params = [p for n, p in model.named_parameters() if n in self.owned and p.requires_grad]
        self.where = f" in stage {self.rank} (modules {self.mine.start}-{self.mine.stop - 1})"
        self.scaler, self.optimizer, self.step_index = None, None, 0
        self.fmt = memory_format(cfg)
        self.pending: list = []
        # MAN/MAN++: the EMA copy of my last module follows the first unit of the next stage's first module
        last = model.aux[self.mine[-1]] if self.mine[-1] < len(model.aux) else None
        if self.rank < self.stages - 1 and hasattr(last, "after_backward"):
            source = list(last.source.parameters())

            def receive_source() -> list[torch.Tensor]:  # the next stage's unit as it is now, before the EMA update
                if self.step_index % cfg.ema_sync_every == 0:
                    with torch.no_grad():
                        torch._foreach_copy_([p.data for p in source], _recv(self.rank + 1, device))
                return [p.detach() for p in source]

            last.source_callback = receive_source  # read by the EMA update after the module's backward
        feeds = self.rank > 0 and hasattr(model.aux[self.mine[0] - 1], "after_backward")
        self.my_unit = model.backbone.units[model.partition.bounds[self.mine[0]][0]] if feeds else None

    def attach(self, optimizer, stack) -> None:
        self.optimizer = optimizer
        stack.callback(_wait, self.pending)

    def restore(self, ckpt: dict) -> None:
        """This stage's optimizer and generators (the model is loaded by the loop)."""
        try:
            self.optimizer.load_state_dict(ckpt["optimizers"][self.rank])
        except (ValueError, KeyError, IndexError) as exc:
            raise ManppError(f"the checkpoint's optimizer state of stage {self.rank} does not fit: {exc}") from None
        set_rng_state(ckpt["rng_ranks"][self.rank], self.device)

    def measure(self, train_set) -> dict:
        """Rank 0 measures a step of the whole model (its EMA copies following their own units: no stage is
        sending), and each stage's peak."""
        memory = None
        if D.is_main():
            batch = next(iter(torch.utils.data.DataLoader(train_set, batch_size=self.cfg.batch_size,
                                                          collate_fn=self.task.collate)))
            callbacks = [(aux, aux.source_callback) for aux in self.model.aux if hasattr(aux, "source_callback")]
            for aux, _ in callbacks:
                aux.source_callback = None
            try:
                report = measure_step(self.model, *self.task.prepare(batch, self.device, self.fmt))
            finally:
                for aux, callback in callbacks:
                    aux.source_callback = callback
            memory = dict(report.__dict__, stage_peak_bytes=[max(report.module_peak_bytes[j] for j in r)
                                                             for r in self.layout])
        return D.broadcast_object(memory)

    def step(self, batch, step: int, stop) -> tuple[torch.Tensor, int]:
        """One step of this stage; the stats of :meth:`manpp.train.replica.ReplicaSteps.step`, this stage's part
        of them: its modules' losses, the training hits (last stage), the images (stage 0), the stop flag."""
        cfg, device, k = self.cfg, self.device, self.model.k
        self.step_index = step
        if self.my_unit is not None and step % cfg.ema_sync_every == 0:  # my first unit, for the previous stage
            _wait(self.pending)
            self.pending += _send([p.detach() for p in self.my_unit.parameters()], self.rank - 1)
        if self.rank == 0:
            x, y = self.task.prepare(batch, device, self.fmt)
            image = x
        else:
            x, y, image, told = _recv(self.rank - 1, device)
            flag = int(told)  # rank 0's stop decision travels with the batch
        self.optimizer.zero_grad(set_to_none=True)
        result = local_step(self.model, x, y, modules=self.mine, ctx=LocalContext(image, y, self.model.denormalize))
        self.optimizer.step()  # update-unlocked: this stage steps as soon as its own losses are known
        if self.rank == 0:
            flag = int(stop.signum)  # read after the step, as the replicas read it
        if self.rank < self.stages - 1:
            _wait(self.pending)
            self.pending += _send([result.logits, y, image, torch.tensor([flag], device=device)], self.rank + 1)
        stats = torch.zeros(k + 4, dtype=torch.float64)
        stats[list(self.mine)] = torch.stack([v.float() for v in result.losses]).double().cpu()
        hits = self.task.train_hits(result.logits, y) if self.rank == self.stages - 1 else None
        if hits is not None:
            stats[k:k + 2] = hits.double().cpu()
        stats[k + 2] = x.shape[0] if self.rank == 0 else 0
        stats[k + 3] = float(flag > 0)
        return stats, 0

    def shown(self, losses: list[float]) -> list[float]:
        """The losses a progress line shows: this stage's modules' (rank 0 prints)."""
        return [losses[j] for j in self.mine]

    def own_partial(self, sums: torch.Tensor) -> torch.Tensor:
        """A stopped epoch's sums (of every stage, as saved), reduced to what this stage adds itself."""
        k, keep = self.model.k, torch.zeros_like(sums)
        keep[list(self.mine)] = sums[list(self.mine)]
        if self.rank == self.stages - 1:
            keep[k:k + 2] = sums[k:k + 2]
        if self.rank == 0:
            keep[k + 2:] = sums[k + 2:]
        return keep

    def end_epoch(self, sums: torch.Tensor) -> torch.Tensor:
        """Every stage's modules and loss sums on rank 0 (which then holds the whole model); the total sums."""
        _wait(self.pending)
        parts = D.gather_objects(_to_cpu(({k: v for k, v in self.model.state_dict().items() if k in self.owned},
                                          sums)))
        if not D.is_main():
            return sums
        self.model.load_state_dict({k: v for part in parts for k, v in part[0].items()}, strict=False)
        return sum(part[1] for part in parts)

    def before_evaluation(self) -> None:
        pass

    def evaluate(self, tests) -> dict | None:
        return self.task.evaluate(self.model, tests, self.device) if D.is_main() else None

    def checkpoint_parts(self) -> dict | None:
        """Every stage's optimizer state and generators, on rank 0."""
        parts = D.gather_objects(_to_cpu((self.optimizer.state_dict(), rng_state(self.device))))
        if not D.is_main():
            return None
        return {"optimizers": [p[0] for p in parts], "rng_ranks": [p[1] for p in parts],
                "parallel_stages": self.stages, "world_size": self.stages}

    def summary_extra(self) -> dict:
        return {"world_size": self.stages, "parallel": "modules",
                "stage_modules": [[r.start, r.stop - 1] for r in self.layout]}

    def announce(self, cfg: C.TrainConfig, memory: dict, n_train: int, n_test: int, out) -> None:
        print(f"{cfg.method}: {cfg.model} on {cfg.dataset} ({n_train} train / {n_test} test), {self.model.k} modules "
              f"in {self.stages} pipelined stages ({', '.join(f'{r.start}-{r.stop - 1}' for r in self.layout)}), "
              f"peak activation per stage {', '.join(format_bytes(b) for b in memory['stage_peak_bytes'])} at batch "
              f"{cfg.batch_size}, EMA sync every {cfg.ema_sync_every} step(s), run folder {out}", flush=True)


def _to_cpu(obj):
    """Tensors moved to the CPU inside nested tuples, lists and dicts (for gathering and saving)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    return obj
