"""MAN and MAN++: the momentum auxiliary network (docs/method.md, MAN and MAN++).

For module j the auxiliary network reads h_j through two copies of U, the first unit of
module j+1: a frozen copy EMA_j, moved towards U after each local backward,
``p_ema <- m * p_ema + (1 - m) * p_U``, and a trainable copy LB_j. MAN adds them; MAN++
mixes them with one learnable scalar s_j (initialised to 1):

    a_j = s_j * LB_j(h_j) + (2 - s_j) * EMA_j(h_j)

and the base head (DGL or InfoPro) takes a_j. h_j is not detached, so module j learns
through both branches.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from ..base.settings import Number, OneOf, check_rule
from ..memory.recompute import run_checkpointed
from ..memory.saved import current_saved, saved_in

INITS = ("copy", "random")
EMA_MOMENTUM = 0.995  # the paper's m
SCALE_INIT = 1.0  # MAN++'s s_j at the start (the paper's): LB and EMA weighted equally
RECOMPUTE_CHOICES = (True, False, "auto")


class _RecomputedMix(torch.autograd.Function):
    """a = s * lb_out + (2 - s) * EMA(h), keeping nothing of the EMA branch for backward.

    The EMA copy is frozen, so backward only needs its input gradient: it recomputes EMA(h)
    from h (which the module's own graph keeps anyway) and back-propagates through it then.
    The forward pass keeps no EMA activations, which lowers the module's activation peak by
    about one unit's worth. Same values as the plain expression (tested).
    """

    @staticmethod
    def forward(ctx, h, lb_out, s, ema):
        with torch.no_grad():
            e = ema(h)
        ctx.ema = ema
        device = h.device.type
        ctx.amp = (device, torch.get_autocast_dtype(device), torch.is_autocast_enabled(device))
        ctx.saved = current_saved()  # how the forward pass stores what it saves (bf16, offloaded)
        ctx.save_for_backward(h, lb_out, s)
        return s * lb_out + (2 - s) * e

    @staticmethod
    def backward(ctx, g):
        h, lb_out, s = ctx.saved_tensors
        device, dtype, enabled = ctx.amp
        with torch.enable_grad(), torch.autocast(device, dtype=dtype, enabled=enabled), saved_in(*ctx.saved):
            h_ = h.detach().requires_grad_(True)
            e = ctx.ema(h_)
        grad_lb = g * s if ctx.needs_input_grad[1] else None
        grad_s = None
        if ctx.needs_input_grad[2]:
            grad_s = ((g * lb_out).sum() - (g * e.detach()).sum()).reshape(s.shape)
        grad_h = None
        if ctx.needs_input_grad[0]:
            (grad_h,) = torch.autograd.grad(e, h_, g * (2 - s))
        return grad_h, grad_lb, grad_s, None


class MomentumAux(nn.Module):
    """EMA copy + learnable copy of ``unit`` [+ learnable scale], then ``head``.

    ``unit`` stays owned by the backbone: it is referenced, not registered, so it is neither
    saved twice nor trained through this module. ``init='copy'`` starts both copies from the
    unit's current weights; ``init='random'`` re-draws them with ``reinit`` (what the authors'
    release ends up doing).
    """

    def __init__(self, unit: nn.Module, head: nn.Module, *, momentum: float = EMA_MOMENTUM,
                 learnable_scale: bool = True, init: str = "copy", reinit=None, recompute_ema: bool | str = "auto",
                 scale_init: float = SCALE_INIT):
        super().__init__()
        check_settings(momentum, init, recompute_ema, scale_init)
        self.lb = copy.deepcopy(unit)
        self.ema = copy.deepcopy(unit)
        if init == "random":
            for module in (self.lb, self.ema):
                if reinit is not None:
                    reinit(module)
                else:
                    for m in module.modules():
                        if hasattr(m, "reset_parameters"):
                            m.reset_parameters()
        self.ema.requires_grad_(False)
        # The copy always normalises with batch statistics (it is only run in training, and the
        # release never uses its running statistics), so it keeps none: this also makes a
        # recomputation in backward identical to the first pass.
        for m in self.ema.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.track_running_stats = False
                m.running_mean = m.running_var = m.num_batches_tracked = None
        # 'auto': decided per module at the first training step (settle_recompute, a first-step
        # hook of the local model); until then (e.g. a pipeline stage, which never decides) it recomputes
        self.recompute_ema = recompute_ema
        self.head = head
        self.momentum = momentum
        if learnable_scale:
            self.scale = nn.Parameter(torch.full((), float(scale_init)))
        else:
            self.register_buffer("scale", torch.ones(()), persistent=False)
        object.__setattr__(self, "_source", unit)  # not a submodule
        self.inplace_input: bool | None = None  # whether the unit writes into its input (found at the first call)
        # activation checkpointing (the local model's ``checkpointing``, set by it): with any mode the
        # learnable copy is recomputed in backward too instead of keeping its activations
        self.checkpointing = "off"
        # where the EMA update reads the unit's current parameters from: the unit itself, or (a
        # pipeline stage whose next unit lives in another process) a callback that receives them
        self.source_callback = None

    @property
    def source(self) -> nn.Module:
        return self._source

    def source_parameters(self) -> list[torch.Tensor]:
        """The parameters the EMA copy moves towards: ``source_callback()`` if set, else the unit's."""
        if self.source_callback is not None:
            return list(self.source_callback())
        return [p.detach() for p in self._source.parameters()]

    def _writes_into_its_input(self, h: torch.Tensor) -> bool:
        """Whether the unit modifies its input in place (a block that starts with ``ReLU(inplace=True)``,
        or adds into ``x``): tried once, on a copy, in eval mode (no statistics change)."""
        probe = h.detach().clone()
        version = probe._version
        mode = self.lb.training
        self.lb.eval()
        try:
            with torch.no_grad():
                self.lb(probe)
        finally:
            self.lb.train(mode)
        return probe._version != version

    def _lb(self, h: torch.Tensor) -> torch.Tensor:
        return self.lb(h.clone() if self.inplace_input else h)

    def _ema(self, h: torch.Tensor) -> torch.Tensor:
        return self.ema(h.clone() if self.inplace_input else h)

    def mix(self, h: torch.Tensor) -> torch.Tensor:
        """a = s * LB(h) + (2 - s) * EMA(h); with s fixed at 1 this is MAN's LB(h) + EMA(h).

        A unit that writes into its input would overwrite h, which module j's own graph still needs:
        such a unit's copies each read a copy of h (one more activation, only for such units)."""
        if self.inplace_input is None:
            self.inplace_input = self._writes_into_its_input(h)
        s = self.scale
        if self.checkpointing != "off" and torch.is_grad_enabled() and h.requires_grad:
            # the copy's activations are not kept: they would sit beside the EMA branch's recomputation
            # in the mix's backward; recomputed in turn, only one of the two is alive at a time
            lb_out = run_checkpointed(self._lb, h, [self.lb])
        else:
            lb_out = self._lb(h)
        if self.recompute_ema and torch.is_grad_enabled() and h.requires_grad:
            return _RecomputedMix.apply(h, lb_out, s, self._ema)
        return s * lb_out + (2 - s) * self._ema(h)

    def forward(self, h: torch.Tensor, ctx) -> torch.Tensor:
        return self.head(self.mix(h), ctx)

    @torch.no_grad()
    def after_backward(self) -> None:
        """The EMA step over parameters (not BN buffers), one fused multi-tensor lerp; nothing to do for a
        unit without parameters (a pooling or an activation given as a unit)."""
        ema = list(self.ema.parameters())
        if ema:
            torch._foreach_lerp_(ema, self.source_parameters(), 1.0 - self.momentum)

    def ema_distance(self) -> float:
        """||theta_EMA - theta_U||, for logging how closely the copy follows its unit."""
        ema = [p.detach() for p in self.ema.parameters()]
        if not ema:
            return 0.0
        with torch.no_grad():
            diffs = torch._foreach_sub(ema, [p.detach() for p in self._source.parameters()])
            return float(torch.linalg.vector_norm(torch.stack(torch._foreach_norm(diffs))))


# the rules of the MAN/MAN++ settings, declared once: the config's fields and local_model's checks read them
EMA_MOMENTUM_RULE = Number(low=0, high=1, meaning="the EMA copies' momentum m in p_ema <- m p_ema + (1 - m) p_U")
SCALE_INIT_RULE = Number(low=0, high=2, meaning="MAN++'s scale s at the start, in s LB + (2 - s) EMA")
SCALE_LR_SCALE_RULE = Number(low=0, meaning="MAN++'s scales' lr over the auxiliary networks' (0 holds s at scale_init)")
INIT_RULE = OneOf(INITS, meaning="how the copies start: the unit's weights, or re-drawn as the release does")
RECOMPUTE_RULE = OneOf(RECOMPUTE_CHOICES, meaning="recompute the EMA branch in backward")


def check_settings(momentum: float, init: str, recompute_ema, scale_init: float = 1.0) -> None:
    """One clear error for a bad MAN/MAN++ setting."""
    check_rule("scale_init", SCALE_INIT_RULE, scale_init)
    check_rule("ema_momentum", EMA_MOMENTUM_RULE, momentum)
    check_rule("copy_init", INIT_RULE, init)
    check_rule("recompute_ema", RECOMPUTE_RULE, recompute_ema)


def settle_recompute(model, inputs, targets) -> list[int]:
    """Settle ``recompute_ema='auto'``: recompute the EMA branch only where keeping it would raise
    the step's activation peak; returns the modules that recompute. A first-step hook.

    Modules run one at a time, so the step's peak is the largest module's. Two measured steps
    (the model is restored after each) give every module's peak with and without the
    recomputation; a module keeps its EMA activations when even then it stays at or below the
    peak of the all-recompute step (:func:`recompute_choice`). Memory is therefore that of
    ``recompute_ema=true``, and the modules that do not set the peak save one EMA forward pass each per step.
    """
    from ..memory.measure import measure_step

    auto = [a for a in model.aux if isinstance(a, MomentumAux) and a.recompute_ema == "auto"]
    if auto:
        for a in auto:
            a.recompute_ema = True
        with model.uncompiled():  # compiling the memory hooks would measure nothing useful
            with_recompute = measure_step(model, inputs, targets).module_peak_bytes
            for a in auto:
                a.recompute_ema = False
            without = measure_step(model, inputs, targets).module_peak_bytes
        flags = recompute_choice(with_recompute, without)
        for j, a in enumerate(model.aux):
            if any(a is b for b in auto):
                a.recompute_ema = flags[j]
    return [j for j, a in enumerate(model.aux) if getattr(a, "recompute_ema", False) is True]


def recompute_choice(with_recompute: list[int], without: list[int]) -> list[bool]:
    """``recompute_ema='auto'``'s rule, from every module's activation peak in a step that recomputes the
    EMA branch everywhere and in one that recomputes it nowhere: module j recomputes when keeping its EMA
    activations would lift it above the largest peak of the all-recompute step."""
    limit = max(with_recompute)
    return [peak > limit for peak in without]
