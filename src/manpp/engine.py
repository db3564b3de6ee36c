"""The local training step (METHOD.md section 1), evaluation, and the model that holds both.

One step, for every module j in order: forward, local loss, backward (which frees module j's
graph at once), the auxiliary network's after-backward hook (the EMA update of MAN/MAN++),
then detach. The caller makes one optimizer step for all parameters afterwards. With K = 1
this is plain end-to-end training through the same code.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import nn

from .objectives import LocalContext
from .partition import Partition
from .tasks import task_of

LossScale = Callable[[torch.Tensor], torch.Tensor]  # or an object with such a ``scale`` method (GradScaler)


class Stage(nn.Module):
    """Module j of the partition: a run of backbone units (plus the task head for the last)."""

    def __init__(self, units: Sequence[nn.Module], head: nn.Module | None = None):
        super().__init__()
        self.units = nn.ModuleList(units)
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for unit in self.units:
            x = unit(x)
        return x if self.head is None else self.head(x)


@dataclass
class StepResult:
    losses: list[torch.Tensor]  # one detached scalar per module; the last is the task loss
    logits: Any  # detached output of the last module (logits; a dict of head outputs for detection)


def detach(h: Any) -> Any:
    """``h`` cut from the graph: a tensor, or a tuple/list/dict of them (dense backbones pass
    their kept feature maps along with the current one)."""
    if isinstance(h, torch.Tensor):
        return h.detach()
    if isinstance(h, (tuple, list)):
        return type(h)(detach(v) for v in h)
    if isinstance(h, dict):
        return {k: detach(v) for k, v in h.items()}
    return h


def primary(h: Any) -> torch.Tensor:
    """The feature map an auxiliary network reads: ``h``, or its first element when a dense
    backbone passes ``(current, kept...)`` between units."""
    return h[0] if isinstance(h, (tuple, list)) else h


class LocalModel(nn.Module):
    """A backbone cut into K gradient-isolated modules, each non-final one with an auxiliary net.

    ``aux[j]`` is any module with ``forward(features, ctx) -> loss`` and optionally
    ``after_backward()``. The backbone and the auxiliary networks are the registered
    submodules; the stages are views on the backbone's units, so checkpoints do not depend on K.
    """

    def __init__(self, backbone: nn.Module, partition: Partition, aux: Sequence[nn.Module],
                 denormalize: Callable[[torch.Tensor], torch.Tensor] | None = None, method: str = "custom"):
        super().__init__()
        if len(aux) != partition.k - 1:
            raise ValueError(f"{partition.k} modules need {partition.k - 1} auxiliary networks, got {len(aux)}")
        self.backbone = backbone
        self.aux = nn.ModuleList(aux)
        self.partition = partition
        self.method = method
        self.denormalize = denormalize
        self.amp_dtype: torch.dtype | None = None  # e.g. torch.bfloat16: forward passes under autocast
        units = backbone.units
        stages = [Stage([units[i] for i in partition.units_of(j)]) for j in range(partition.k)]
        stages[-1].head = backbone.head
        object.__setattr__(self, "stages", stages)  # views, not submodules
        object.__setattr__(self, "_aux_calls", list(self.aux))  # what the step calls (compiled or not)

    @property
    def k(self) -> int:
        return self.partition.k

    def local_loss(self, j: int) -> Callable:
        """Module j's loss: its auxiliary network (reading the module's main feature map), or for
        the last module the task's loss (the backbone's ``task``; classification by default)."""
        if j < self.k - 1:
            aux = self._aux_calls[j]
            return lambda h, ctx: aux(primary(h), ctx)
        return task_of(self.backbone).loss

    def compile_parts(self, **options) -> "LocalModel":
        """``torch.compile`` every module and auxiliary network, never the loop that calls backward.

        Parameters and checkpoints are unchanged (the compiled wrappers share the modules).
        """
        object.__setattr__(self, "stages", [torch.compile(s, **options) for s in self.stages])
        object.__setattr__(self, "_aux_calls", [torch.compile(a, **options) for a in self.aux])
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Inference: the backbone alone, no auxiliary networks."""
        return self.backbone(x)

    def train_step(self, inputs: torch.Tensor, targets: torch.Tensor, scaler: LossScale | None = None) -> StepResult:
        """Forward + backward of every module in turn; gradients accumulate in ``.grad``.

        ``scaler`` (a ``torch.amp.GradScaler`` or a callable) scales each local loss before its backward.
        """
        if self.recompute_pending:
            self.choose_recompute(inputs, targets)
        return local_step(self, inputs, targets, scaler)

    @property
    def recompute_pending(self) -> bool:
        """True until ``recompute_ema='auto'`` is settled (at the first training step)."""
        return any(getattr(a, "recompute_ema", None) == "auto" for a in self.aux)

    def choose_recompute(self, inputs: torch.Tensor, targets: torch.Tensor) -> list[int]:
        """Settle ``recompute_ema='auto'``: recompute the EMA branch only where keeping it would
        raise the step's activation peak, and return the modules that recompute.

        Modules run one at a time, so the step's peak is the largest module's. Two measured steps
        (the model is restored after each) give every module's peak with and without the
        recomputation; a module keeps its EMA activations when even then it stays at or below
        the peak of the all-recompute step. Memory is therefore that of ``recompute_ema=true``,
        and the modules that do not set the peak save one EMA forward pass each per step.
        """
        from .memory import measure_step

        auto = [a for a in self.aux if getattr(a, "recompute_ema", None) == "auto"]
        for a in auto:
            a.recompute_ema = True
        if auto:
            compiled = self.stages, self._aux_calls
            # measured on the plain modules: compiling the memory hooks would measure nothing useful
            object.__setattr__(self, "stages", [getattr(s, "_orig_mod", s) for s in compiled[0]])
            object.__setattr__(self, "_aux_calls", [getattr(a, "_orig_mod", a) for a in compiled[1]])
            try:
                with_recompute = measure_step(self, inputs, targets).module_peak_bytes
                for a in auto:
                    a.recompute_ema = False
                without = measure_step(self, inputs, targets).module_peak_bytes
            finally:
                object.__setattr__(self, "stages", compiled[0])
                object.__setattr__(self, "_aux_calls", compiled[1])
            limit = max(with_recompute)
            for j, a in enumerate(self.aux):
                if any(a is b for b in auto):
                    a.recompute_ema = without[j] > limit
        return [j for j, a in enumerate(self.aux) if getattr(a, "recompute_ema", False) is True]

    def parameters_to_optimize(self) -> list[nn.Parameter]:
        """Backbone, learnable copies, scales and heads; not the frozen EMA copies."""
        return [p for p in self.parameters() if p.requires_grad]

    def aux_parameter_count(self) -> list[int]:
        return [sum(p.numel() for p in a.parameters()) for a in self.aux]


def local_step(model: LocalModel, inputs: torch.Tensor, targets: torch.Tensor,
               scaler: LossScale | None = None, *, modules: Sequence[int] | None = None,
               ctx: LocalContext | None = None) -> StepResult:
    """The whole engine: K local forward/backward passes, gradient-isolated by ``detach``.

    With ``scaler`` (fp16: a ``torch.amp.GradScaler``, whose ``scale`` is used, or any callable
    ``loss -> scaled loss``) every module's loss is scaled before its backward, so all K modules
    share one scale and the caller unscales once (``scaler.step(optimizer)``). The reported losses
    are unscaled, and the MAN/MAN++ EMA hook reads parameters, not gradients, so scaling leaves it
    unchanged.

    ``modules`` runs only those consecutive modules, ``inputs`` being the first one's input, and
    ``ctx`` gives the batch's targets and images when ``inputs`` is not the image (a pipeline stage).
    """
    scale = (scaler.scale if hasattr(scaler, "scale") else scaler) if scaler is not None else None
    ctx = ctx or LocalContext(inputs, targets, model.denormalize)
    losses = []
    x = inputs
    amp = torch.autocast(inputs.device.type, dtype=model.amp_dtype, enabled=model.amp_dtype is not None)
    for j in modules if modules is not None else range(model.k):
        stage = model.stages[j]
        with amp:
            h = stage(x)
            loss = model.local_loss(j)(h, ctx)
        if loss.requires_grad:
            (loss if scale is None else scale(loss)).backward()  # frees module j's graph before module j+1 runs
        if j < model.k - 1:
            hook = getattr(model.aux[j], "after_backward", None)
            if hook is not None:
                hook()
        losses.append(loss.detach())
        x = detach(h)
    return StepResult(losses, x)


@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterable, device: torch.device | str = "cpu", *,
             reduce: bool = False) -> dict[str, float]:
    """Accuracy and cross-entropy of the backbone alone (eval mode) over ``batches``.

    With ``reduce`` under ``torch.distributed``, ``batches`` is this process's shard of the test
    set and the sums (correct, loss, count) are added over all processes, so every process
    returns the metrics of the whole set.
    """
    was_training = model.training
    model.eval()
    correct, total, loss_sum = 0, 0, 0.0
    for inputs, targets in batches:
        inputs, targets = inputs.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        with torch.autocast(inputs.device.type, dtype=getattr(model, "amp_dtype", None),
                            enabled=getattr(model, "amp_dtype", None) is not None):
            logits = model(inputs).float()
        loss_sum += float(nn.functional.cross_entropy(logits, targets, reduction="sum"))
        correct += int((logits.argmax(1) == targets).sum())
        total += targets.numel()
    model.train(was_training)
    if reduce:
        from . import distributed

        if distributed.is_initialized():
            sums = torch.tensor([correct, loss_sum, total], dtype=torch.float64, device=device)
            correct, loss_sum, total = distributed.all_reduce_sum(sums).tolist()
    total = max(total, 1)
    return {"accuracy": correct / total, "loss": loss_sum / total}
