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

INITS = ("copy", "random")


class MomentumAux(nn.Module):
    """EMA copy + learnable copy of ``unit`` [+ learnable scale], then ``head``.

    ``unit`` stays owned by the backbone: it is referenced, not registered, so it is neither
    saved twice nor trained through this module. ``init='copy'`` starts both copies from the
    unit's current weights; ``init='random'`` re-draws them with ``reinit`` (what the authors'
    release ends up doing).
    """

    def __init__(self, unit: nn.Module, head: nn.Module, *, momentum: float = 0.995,
                 learnable_scale: bool = True, init: str = "copy", reinit=None):
        super().__init__()
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"EMA momentum must be in [0, 1], got {momentum}")
        if init not in INITS:
            raise ValueError(f"copy init must be one of {INITS}, got {init!r}")
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
