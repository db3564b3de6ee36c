"""The step strategy of a process that holds the whole model: one process, or one of torchrun's
data-parallel replicas (see :mod:`manpp.base.distributed`).

It is one of the two step strategies of the one training loop, :func:`manpp.train.loop._train` (the other,
:class:`manpp.train.pipeline.StageSteps`, trains one pipelined stage of modules per process). Every process
trains every module on its share of each global batch; the gradients are averaged before the one
optimizer step (as each module's backward ends, with ``overlap_comm``), or each module steps inside the
backward pass (``step_in_backward``, :mod:`manpp.memory.earlystep`); fp16 runs through a loss scaler. The loss
sums, training hits and a stop signal travel in one all-reduce per step, and every process evaluates
its part of the test set.
"""

from __future__ import annotations

import torch

from ..base import distributed as D
from ..base.checkpoint import rng_state, set_rng_state
from ..base.errors import ManppError
from ..config import trainconfig as C
from ..core.optim import build_scaler
from ..memory.earlystep import StepInBackward
from ..memory.measure import format_bytes, measure_step
from .build import RANK_SEED, memory_format


class ReplicaSteps:
    """Every module on this process's share of the batch (see the module docstring)."""

    reads_data = True
    shards_tests = True  # under torchrun each process evaluates its own part; the sums are reduced
    where = ""  # what a divergence message adds: nothing, every module is here

    def __init__(self, cfg: C.TrainConfig, model, task, device: torch.device):
        self.cfg, self.model, self.task, self.device = cfg, model, task, device
        self.world = D.world_size()
        self.seed_offset = D.rank() * RANK_SEED
        self.shard = (D.rank(), self.world)  # this process's share of each global batch (rank, processes)
        D.broadcast_state(model)  # every process starts from rank 0's parameters, EMA copies and buffers
        self.params = model.parameters_to_optimize()
        self.fmt = memory_format(cfg)
        self.optimizer = self.scaler = self.reducer = self.early = None

    def attach(self, optimizer, stack) -> None:
        cfg = self.cfg
        self.optimizer = optimizer
        if D.is_initialized() and (cfg.overlap_comm is True or cfg.overlap_comm == "auto" and
                                   self.device.type == "cuda"):  # each module's all-reduce starts as its backward ends
            self.reducer = D.OverlappedReducer([self.model.module_parameters(j) for j in range(self.model.k)],
                                               self.params)
        self.scaler = build_scaler(cfg, self.device)
        if cfg.step_in_backward:  # every module (E2E: every parameter) steps when its gradients are final
            self.early = StepInBackward(self.model, optimizer, self.params)
            stack.callback(self.early.close)
            self.reducer = None  # each module's gradients are averaged when it steps

    def restore(self, ckpt: dict) -> None:
        """The optimizer, the loss scale and this process's generators (the model is loaded by the loop)."""
        if "optimizer" not in ckpt:
            raise ManppError(f"the checkpoint was written by a run of {ckpt.get('parallel_stages', '?')} pipelined "
                             f"stages: resume it with parallel=modules on as many processes")
        try:
            self.optimizer.load_state_dict(ckpt["optimizer"])
        except (ValueError, KeyError) as exc:
            raise ManppError(f"the checkpoint's optimizer state does not fit this model: {exc}") from None
        if self.scaler is not None and ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        ranks = ckpt.get("rng_ranks") or [ckpt["rng"]]
        if D.rank() < len(ranks):
            set_rng_state(ranks[D.rank()], self.device)
        else:  # more processes than when it was saved: a fresh stream for this one
            from .build import seed_everything

            seed_everything(self.cfg.seed + 1 + self.seed_offset + ckpt["step"])

    def measure(self, train_set) -> dict:
        """One measured step on the first batch (per process: what one GPU holds for its share)."""
        memory = None
        if D.is_main():
            local_batch = D.check_batch_size(self.cfg.batch_size, self.world)
            batch = next(iter(torch.utils.data.DataLoader(train_set, batch_size=local_batch,
                                                          collate_fn=self.task.collate)))
            memory = measure_step(self.model, *self.task.prepare(batch, self.device, self.fmt)).__dict__
        return D.broadcast_object(memory)

    def step(self, batch, step: int, stop) -> tuple[torch.Tensor, int]:
        """One training step with its optimizer step; returns every module's loss, the training hits and
        count and the images over the global batch, last whether a stop signal (``stop.signum``, read after
        the optimizer step) reached any process (CPU, float64; one all-reduce carries all of it), and 1 if
        fp16 skipped the step."""
        inputs, targets = self.task.prepare(batch, self.device, self.fmt)
        self.optimizer.zero_grad(set_to_none=True)
        early, reducer = self.early, self.reducer
        after = early.after_module if early is not None else reducer.start if reducer is not None else None
        if early is not None:
            early.begin_step()
        result = self.model.train_step(inputs, targets, self.scaler, after_module=after)
        if early is not None:
            early.end_step()
            skipped = 0
        else:
            skipped = self._optimizer_step()
        hits = self.task.train_hits(result.logits, targets)
        if hits is None:
            hits = torch.zeros(2, dtype=torch.float64, device=self.device)
        stats = torch.cat([torch.stack([v.float() for v in result.losses]).double(), hits.double(),
                           torch.tensor([inputs.shape[0], float(stop.signum > 0)], dtype=torch.float64,
                                        device=self.device)])
        if D.is_initialized():
            D.all_reduce_sum(stats)
            stats[:self.model.k] /= self.world  # mean over the shards = mean over the global batch
        return stats.cpu(), skipped

    def _optimizer_step(self) -> int:
        """Average gradients over processes, clip, step (fp16: unscale, maybe skip); 1 if the step was skipped."""
        cfg, optimizer, scaler = self.cfg, self.optimizer, self.scaler
        if self.reducer is not None:
            self.reducer.wait()  # the per-module all-reduces started during the backward passes
        elif D.is_initialized():
            D.all_reduce_gradients(self.params)  # every module's gradients, averaged over the processes
        if cfg.grad_clip is not None:  # the global norm over all modules, as the release's detection code
            if scaler is not None:
                scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(self.params, cfg.grad_clip)
        if scaler is None:
            optimizer.step()
            return 0
        before = scaler.get_scale()  # a step with an inf/nan gradient is skipped (the same on every process)
        scaler.step(optimizer)
        scaler.update()
        return int(scaler.get_scale() < before)

    def shown(self, losses: list[float]) -> list[float]:
        return losses

    def own_partial(self, sums: torch.Tensor) -> torch.Tensor:
        return sums  # reduced over the processes every step: every process holds the whole sums

    def end_epoch(self, sums: torch.Tensor) -> torch.Tensor:
        return sums

    def before_evaluation(self) -> None:
        D.broadcast_buffers(self.model)  # BatchNorm statistics are per process: evaluate and save rank 0's

    def evaluate(self, tests) -> dict:
        return self.task.evaluate(self.model, tests, self.device, reduce=True)

    def checkpoint_parts(self) -> dict | None:
        rngs = D.gather_objects(rng_state(self.device))  # every process's generators, for an exact resume
        if not D.is_main():
            return None
        return {"optimizer": self.optimizer.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler is not None else None,
                "rng": rngs[0], "rng_ranks": rngs, "world_size": self.world}

    def summary_extra(self) -> dict:
        return {"world_size": self.world}

    def announce(self, cfg: C.TrainConfig, memory: dict, n_train: int, n_test: int, out) -> None:
        model, world = self.model, self.world
        per = f"at batch {cfg.batch_size}" if world == 1 else (
            f"at batch {cfg.batch_size // world} per process ({world} processes, global batch {cfg.batch_size})")
        objective = f" ({model.objective})" if model.objective and model.objective != cfg.method else ""
        print(f"{cfg.method}{objective}: {cfg.model} on {cfg.dataset} ({n_train} train / {n_test} test), "
              f"{model.k} module{'s' if model.k > 1 else ''} [{model.partition.label}], activation peak "
              f"{format_bytes(memory['peak_activation_bytes'])} {per}, device {self.device}, run folder {out}")
        if model.k > 1:
            print("  modules: " + ", ".join(model.partition.describe(model.backbone.unit_names)))
        recompute = [getattr(a, "recompute_ema", None) for a in model.aux]
        if cfg.recompute_ema == "auto" and recompute and all(isinstance(r, bool) for r in recompute):
            chosen = [str(j) for j, r in enumerate(recompute) if r]
            print(f"  EMA branch recomputed in backward in module{'s' if len(chosen) != 1 else ''} "
                  f"{', '.join(chosen) or 'none'} (recompute_ema=auto: where it sets the activation peak)")


__all__ = ["ReplicaSteps"]
