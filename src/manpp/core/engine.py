"""The local training step (docs/method.md), evaluation, and the model that holds both.

One step, for every module j in order: forward, local loss, backward (which frees module j's
graph at once), the auxiliary network's after-backward hook (the EMA update of MAN/MAN++),
then detach. The caller makes one optimizer step for all parameters afterwards. With K = 1
this is plain end-to-end training through the same code.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import nn

from ..memory.recompute import checkpointing_mode, run_units, segment_bounds
from ..memory.saved import saved_in
from .partition import Partition

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}  # amp= choices: the autocast dtypes
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")  # torch.compile's

LossScale = Callable[[torch.Tensor], torch.Tensor]  # or an object with such a ``scale`` method (GradScaler)
Backward = Callable[[torch.Tensor], Any]  # runs one local loss's backward (Lightning's ``manual_backward``, ...)
FirstStepHook = Callable[["LocalModel", Any, Any], None]


@dataclass
class LocalContext:
    """What a local loss may look at besides the features: the batch's targets and image."""

    inputs: torch.Tensor
    targets: Any
    denormalize: Callable[[torch.Tensor], torch.Tensor] | None = None
    _image01: torch.Tensor | None = None

    @property
    def image01(self) -> torch.Tensor:
        """The un-normalised input in [0, 1] (InfoPro's reconstruction target), computed once."""
        if self._image01 is None:
            x = self.inputs.detach()
            self._image01 = (self.denormalize(x) if self.denormalize else x).clamp(0, 1)
        return self._image01


def cross_entropy_loss(logits: torch.Tensor, ctx: LocalContext) -> torch.Tensor:
    """The default final loss: cross-entropy of the backbone's logits against the targets."""
    return nn.functional.cross_entropy(logits, ctx.targets)


class LocalModule(nn.Module):
    """Module j of the partition, gradient-isolated from the others: a run of backbone units (plus the
    task head for the last). Not a pipeline stage (a process's group of modules, :mod:`manpp.train.pipeline`)
    nor a stage of the backbone (``unit_stages``: where its feature maps shrink)."""

    def __init__(self, units: Sequence[nn.Module], head: nn.Module | None = None):
        super().__init__()
        self.units = nn.ModuleList(units)
        self.head = head
        self.segments: list[int] | None = None  # activation checkpointing: segment bounds over the units
        self.unit_calls: list | None = None  # what is called for the units when not they (compiled ones)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = run_units(self.units, x, self.segments, self.unit_calls)
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

    The contract, and all the engine knows:

    - ``backbone`` has ``units`` (an ordered ``nn.ModuleList``) and a ``head``;
    - ``aux[j]`` (j < K - 1) is any module with ``forward(features, ctx) -> loss`` and optionally
      ``after_backward()`` (called right after module j's backward);
    - ``final_loss(output, ctx) -> loss`` trains the last module (default: cross-entropy);
    - ``first_step_hooks``: callables ``hook(model, inputs, targets)`` run once, before the first
      training step (a method that must see a real batch before it trains registers one).

    The backbone and the auxiliary networks are the registered submodules; the local modules are views on
    the backbone's units, so checkpoints do not depend on K.
    """

    def __init__(self, backbone: nn.Module, partition: Partition, aux: Sequence[nn.Module],
                 denormalize: Callable[[torch.Tensor], torch.Tensor] | None = None, method: str = "custom",
                 final_loss: Callable[[Any, LocalContext], torch.Tensor] | None = None,
                 first_step_hooks: Sequence[FirstStepHook] = ()):
        super().__init__()
        if len(aux) != partition.k - 1:
            raise ValueError(f"{partition.k} modules need {partition.k - 1} auxiliary networks, got {len(aux)}")
        self.backbone = backbone
        self.aux = nn.ModuleList(aux)
        self.partition = partition
        self.method = method
        self.objective: str | None = None  # the builder records the objective and its settings here
        self.objective_settings = None
        self.denormalize = denormalize
        self.final_loss = final_loss or cross_entropy_loss
        self.first_step_hooks: list[FirstStepHook] = list(first_step_hooks)
        self.amp_dtype: torch.dtype | None = None  # e.g. torch.bfloat16: forward passes under autocast
        self.saved_dtype: torch.dtype | None = None  # e.g. torch.bfloat16: saved activations stored narrower
        self.offload = False  # saved activations kept in host memory (manpp.memory.saved)
        self._checkpointing = "off"
        self._compile_options: dict | None = None  # torch.compile's options, once compile_parts was called
        units = backbone.units
        modules = [LocalModule([units[i] for i in partition.units_of(j)]) for j in range(partition.k)]
        modules[-1].head = backbone.head
        object.__setattr__(self, "plain_modules", modules)  # views, not submodules
        object.__setattr__(self, "local_modules", list(modules))  # what the step calls (compiled or not)
        object.__setattr__(self, "aux_calls", list(self.aux))

    @property
    def k(self) -> int:
        return self.partition.k

    @property
    def checkpointing(self) -> str:
        """Activation checkpointing of every module's units (:mod:`manpp.memory.recompute`): ``'off'``, ``'units'``
        (each unit a segment) or ``'sqrt'`` (about sqrt(n) segments of a module's n units). Settable."""
        return self._checkpointing

    @checkpointing.setter
    def checkpointing(self, mode: str | None) -> None:
        mode = checkpointing_mode(mode)
        for module in self.plain_modules:
            module.segments = segment_bounds(len(module.units), mode)
        for part in self.aux.modules():  # the parts of an auxiliary network that checkpoint themselves
            if "checkpointing" in vars(part):  # (an attribute ``checkpointing``) are told the mode
                part.checkpointing = mode
        self._checkpointing = mode
        self._set_calls(self._compile_options)  # compiled, what is compiled depends on the mode

    def local_loss(self, j: int) -> Callable:
        """Module j's loss: its auxiliary network (reading the module's main feature map), or for
        the last module ``final_loss``."""
        if j < self.k - 1:
            aux = self.aux_calls[j]
            return lambda h, ctx: aux(primary(h), ctx)
        return self.final_loss

    def compile_parts(self, **options) -> "LocalModel":
        """``torch.compile`` every module and auxiliary network, never the loop that calls backward.

        Parameters and checkpoints are unchanged (the compiled wrappers share the modules). With activation
        checkpointing each unit is compiled on its own and the checkpointed segments call them: a
        checkpoint traced by ``torch.compile`` would not recompute as it must.
        """
        self._compile_options = dict(options)
        self._set_calls(self._compile_options)
        return self

    def _set_calls(self, options: dict | None) -> None:
        """What the step calls: the plain modules (``options`` None), or compiled with ``options``."""
        checkpointed = self._checkpointing != "off"
        for module in self.plain_modules:
            module.unit_calls = ([torch.compile(u, **options) for u in module.units]
                                 if options is not None and checkpointed else None)
        calls = [torch.compile(m, **options) for m in self.plain_modules] \
            if options is not None and not checkpointed else list(self.plain_modules)
        object.__setattr__(self, "local_modules", calls)
        object.__setattr__(self, "aux_calls", [torch.compile(a, **options) for a in self.aux]
                           if options is not None else list(self.aux))

    @contextlib.contextmanager
    def uncompiled(self):
        """Within the block the step runs the plain (not compiled) modules and auxiliary networks."""
        calls = self.local_modules, self.aux_calls, [m.unit_calls for m in self.plain_modules]
        self._set_calls(None)
        try:
            yield self
        finally:
            object.__setattr__(self, "local_modules", calls[0])
            object.__setattr__(self, "aux_calls", calls[1])
            for module, unit_calls in zip(self.plain_modules, calls[2]):
                module.unit_calls = unit_calls

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Inference: the backbone alone, no auxiliary networks."""
        return self.backbone(x)

    def run_first_step_hooks(self, inputs, targets) -> None:
        """Run (and drop) the pending first-step hooks; the first ``train_step`` does this itself."""
        hooks, self.first_step_hooks = self.first_step_hooks, []
        for hook in hooks:
            hook(self, inputs, targets)

    def train_step(self, inputs: torch.Tensor, targets, scaler: LossScale | None = None, *,
                   backward: Backward | None = None, after_module: Callable[[int], None] | None = None
                   ) -> StepResult:
        """Forward + backward of every module in turn; gradients accumulate in ``.grad``.

        ``scaler`` (a ``torch.amp.GradScaler`` or a callable) scales each local loss before its
        backward; ``backward(loss)`` replaces ``loss.backward()`` (for example Lightning's
        ``manual_backward``, Fabric's or Accelerate's ``backward``), and is called K times.
        ``after_module(j)`` is called once module j's gradients are final (after its backward).
        """
        if not self.__dict__.get("_wrapper_checked"):  # once: DDP around a local model would silently diverge
            from ..base.distributed import refuse_ddp_wrapper

            refuse_ddp_wrapper(self)
            self.__dict__["_wrapper_checked"] = True
        if self.first_step_hooks:
            self.run_first_step_hooks(inputs, targets)
        return local_step(self, inputs, targets, scaler, backward=backward, after_module=after_module)

    def module_parameters(self, j: int) -> list[nn.Parameter]:
        """The parameters module j's loss trains: its units (the head, for the last) and its
        auxiliary network (learnable copy, scale, head); the frozen EMA copies are left out."""
        parts = [self.local_modules[j]] + ([self.aux[j]] if j < len(self.aux) else [])
        return [p for part in parts for p in part.parameters() if p.requires_grad]

    def parameters_to_optimize(self) -> list[nn.Parameter]:
        """Backbone, learnable copies, scales and heads; not the frozen EMA copies."""
        return [p for p in self.parameters() if p.requires_grad]

    def aux_parameter_count(self) -> list[int]:
        return [sum(p.numel() for p in a.parameters()) for a in self.aux]

    def export_state_dict(self) -> dict[str, torch.Tensor]:
        """The trained network without its auxiliary networks, under the plain model's names where
        the backbone knows them (``backbone.export_state_dict()``), else the backbone's own."""
        export = getattr(self.backbone, "export_state_dict", None)
        if export is not None:
            return export()
        return {k: v.detach().clone() for k, v in self.backbone.state_dict().items()}


def autocast_of(model: nn.Module, inputs: torch.Tensor):
    """``model.amp_dtype``'s autocast; without one, nothing: an autocast the caller entered (Lightning's
    ``precision="bf16-mixed"``, your own ``with torch.autocast(...)``) stays in force."""
    dtype = getattr(model, "amp_dtype", None)
    return torch.autocast(inputs.device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def local_step(model: LocalModel, inputs: torch.Tensor, targets, scaler: LossScale | None = None, *,
               modules: Sequence[int] | None = None, ctx: LocalContext | None = None,
               backward: Backward | None = None, after_module: Callable[[int], None] | None = None) -> StepResult:
    """The whole engine: K local forward/backward passes, gradient-isolated by ``detach``.

    With ``scaler`` (fp16: a ``torch.amp.GradScaler``, whose ``scale`` is used, or any callable
    ``loss -> scaled loss``) every module's loss is scaled before its backward, so all K modules
    share one scale and the caller unscales once (``scaler.step(optimizer)``). The reported losses
    are unscaled, and the MAN/MAN++ EMA hook reads parameters, not gradients, so scaling leaves it
    unchanged. ``backward(loss)``, if given, runs each backward instead of ``loss.backward()``.

    ``modules`` runs only those consecutive modules, ``inputs`` being the first one's input, and
    ``ctx`` gives the batch's targets and images when ``inputs`` is not the image (a pipeline stage).
    ``after_module(j)`` runs when module j's backward (and EMA update) is done: its gradients are
    final, so a data-parallel run can start averaging them while module j + 1 computes.
    """
    scale = (scaler.scale if hasattr(scaler, "scale") else scaler) if scaler is not None else None
    run_backward = backward or torch.Tensor.backward
    ctx = ctx or LocalContext(inputs, targets, model.denormalize)
    losses = []
    x = inputs
    for j in modules if modules is not None else range(model.k):
        module = model.local_modules[j]
        with autocast_of(model, inputs), saved_in(model.saved_dtype, model.offload):
            h = module(x)
            loss = model.local_loss(j)(h, ctx)
        if loss.requires_grad:
            run_backward(loss if scale is None else scale(loss))  # frees module j's graph before module j+1 runs
        if j < model.k - 1:
            hook = getattr(model.aux[j], "after_backward", None)
            if hook is not None:
                hook()
        if after_module is not None:
            after_module(j)
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
        with autocast_of(model, inputs):
            logits = model(inputs).float()
        loss_sum += float(nn.functional.cross_entropy(logits, targets, reduction="sum"))
        correct += int((logits.argmax(1) == targets).sum())
        total += targets.numel()
    model.train(was_training)
    if reduce:
        from ..base import distributed

        if distributed.is_initialized():
            sums = torch.tensor([correct, loss_sum, total], dtype=torch.float64, device=device)
            correct, loss_sum, total = distributed.all_reduce_sum(sums).tolist()
    total = max(total, 1)
    return {"accuracy": correct / total, "loss": loss_sum / total}
