"""MAN and MAN++: the momentum auxiliary network (METHOD.md section 3).

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

from .errors import ManppError

INITS = ("copy", "random")


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
        ctx.save_for_backward(h, lb_out, s)
        return s * lb_out + (2 - s) * e

    @staticmethod
    def backward(ctx, g):
        h, lb_out, s = ctx.saved_tensors
        device, dtype, enabled = ctx.amp
        with torch.enable_grad(), torch.autocast(device, dtype=dtype, enabled=enabled):  # as in forward
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

    def __init__(self, unit: nn.Module, head: nn.Module, *, momentum: float = 0.995,
                 learnable_scale: bool = True, init: str = "copy", reinit=None, recompute_ema: bool | str = "auto"):
        super().__init__()
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"EMA momentum must be in [0, 1], got {momentum}")
        if init not in INITS:
            raise ValueError(f"copy init must be one of {INITS}, got {init!r}")
        if not (isinstance(recompute_ema, bool) or recompute_ema == "auto"):
            raise ManppError(f"bad recompute_ema {recompute_ema!r}: accepted are true, false or 'auto'")
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
        # 'auto': decided per module at the first training step (LocalModel.choose_recompute);
        # until then (e.g. a pipeline stage, which never decides) it recomputes
        self.recompute_ema = recompute_ema
        self.head = head
        self.momentum = momentum
        if learnable_scale:
            self.scale = nn.Parameter(torch.ones(()))
        else:
            self.register_buffer("scale", torch.ones(()), persistent=False)
        object.__setattr__(self, "_source", unit)  # not a submodule

    @property
    def source(self) -> nn.Module:
        return self._source

    def mix(self, h: torch.Tensor) -> torch.Tensor:
        """a = s * LB(h) + (2 - s) * EMA(h); with s fixed at 1 this is MAN's LB(h) + EMA(h)."""
        s = self.scale
        if self.recompute_ema and torch.is_grad_enabled() and h.requires_grad:
            return _RecomputedMix.apply(h, self.lb(h), s, self.ema)
        return s * self.lb(h) + (2 - s) * self.ema(h)

    def forward(self, h: torch.Tensor, ctx) -> torch.Tensor:
        return self.head(self.mix(h), ctx)

    @torch.no_grad()
    def after_backward(self) -> None:
        """The EMA step over parameters (not BN buffers), one fused multi-tensor lerp."""
        ema = list(self.ema.parameters())
        src = [p.detach() for p in self._source.parameters()]
        torch._foreach_lerp_(ema, src, 1.0 - self.momentum)

    def ema_distance(self) -> float:
        """||theta_EMA - theta_U||, for logging how closely the copy follows its unit."""
        with torch.no_grad():
            diffs = torch._foreach_sub([p.detach() for p in self.ema.parameters()],
                                       [p.detach() for p in self._source.parameters()])
            return float(torch.linalg.vector_norm(torch.stack(torch._foreach_norm(diffs))))
