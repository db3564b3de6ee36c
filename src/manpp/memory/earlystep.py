"""``step_in_backward``: the optimizer steps inside the backward passes, and each gradient is freed at once.

Local learning isolates the gradients: module j's are final when its backward ends, and no later module
touches them. So its parameters can step right then, and their gradients be freed before module j + 1
runs: gradient memory peaks at one module's, not the whole network's. E2E gets the same through
``register_post_accumulate_grad_hook``: a parameter's gradient is final when autograd has accumulated it,
so it can step there; the gradients step a bucket at a time (about a sixteenth of them, at least the
largest parameter: :func:`manpp.memory.e2e_bucket_bytes`), which keeps one optimizer call per bucket
instead of one per parameter (a fair comparison: both keep little more than what they still need).

It is exact: the updates are those of one step after all the backward passes. The optimizer is the run's
own (its state, its checkpoint): ``optimizer.step()`` skips the parameters without a gradient, and when a
module (or a parameter) steps, it is the only one holding a gradient, since earlier ones were freed and
later ones have none yet. The MAN/MAN++ EMA update of module j's copies reads the first unit of module
j + 1, which has not stepped yet in either order. Under torchrun, module j's gradients are averaged over
the processes before it steps (E2E: each parameter's). A parameter that received gradients from two
modules' backward passes would step on half of them: that is detected and refused.

What it cannot do, and refuses: an fp16 loss scaler (its step is skipped for every parameter when any
gradient overflows, which a module stepping early cannot know yet), a global gradient-norm clip (it
needs every gradient at once), and pipelined stages (``parallel=modules``).
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..base import distributed as D
from ..base.errors import ManppError
from .measure import e2e_bucket_bytes


def check_step_in_backward(cfg) -> None:
    """One clear error for a setting that cannot combine with ``step_in_backward`` (see the module docstring)."""
    if not getattr(cfg, "step_in_backward", False):
        return
    if cfg.amp == "fp16":
        raise ManppError("step_in_backward cannot use amp=fp16: its loss scaler skips the step of every parameter "
                         "when any gradient overflows, which a module stepping early cannot know yet; use amp=bf16 "
                         "(no scaler) or step_in_backward=false")
    if cfg.grad_clip is not None:
        raise ManppError(f"step_in_backward cannot clip the global gradient norm (grad_clip={cfg.grad_clip}): the "
                         f"norm needs every gradient at once; drop grad_clip or step_in_backward")
    if cfg.parallel == "modules":
        raise ManppError("step_in_backward is not available with parallel=modules: the pipelined stages step each "
                         "stage itself; drop one of them")


class StepInBackward:
    """Steps ``optimizer`` inside ``model``'s backward passes (see the module docstring).

    Around each training step: :meth:`begin_step`, then ``train_step`` with :meth:`after_module` as its
    ``after_module`` (local models, K > 1; for E2E the hooks are on the parameters and it does nothing), then
    :meth:`end_step` (it checks that every gradient was stepped). Outside a step nothing steps, so another
    backward pass (a measured step, a user's own) leaves the optimizer alone. :meth:`close` removes the hooks.
    """

    def __init__(self, model, optimizer: torch.optim.Optimizer, params: Sequence[torch.nn.Parameter] | None = None):
        self.model, self.optimizer = model, optimizer
        self.params = list(model.parameters_to_optimize() if params is None else params)
        self.names = {id(p): name for name, p in model.named_parameters()}
        self.stepped: set[int] = set()
        self.active = False
        self.handles = []
        self.pending: list[torch.nn.Parameter] = []  # E2E: accumulated gradients waiting for their bucket to fill
        self.bucket = e2e_bucket_bytes(self.params)
        if model.k == 1:
            self.handles = [p.register_post_accumulate_grad_hook(self._parameter_done) for p in self.params]
        else:
            self.modules = [[p for p in model.module_parameters(j) if p.requires_grad] for j in range(model.k)]
            owner: dict[int, int] = {}
            for j, group in enumerate(self.modules):
                for p in group:
                    if id(p) in owner and owner[id(p)] != j:
                        raise ManppError(f"step_in_backward: parameter '{self._name(p)}' belongs to modules "
                                         f"{owner[id(p)]} and {j}; it could only step once both are done")
                    owner[id(p)] = j
            lost = [p for p in self.params if id(p) not in owner]
            if lost:
                raise ManppError(f"step_in_backward: parameter '{self._name(lost[0])}' belongs to no module, so no "
                                 f"backward pass says when its gradient is final")

    def _name(self, p) -> str:
        return self.names.get(id(p), "?")

    def _step(self, params: Sequence[torch.nn.Parameter]) -> None:
        mine = {id(p) for p in params}
        stray = [p for p in self.params if p.grad is not None and (id(p) not in mine or id(p) in self.stepped)]
        if stray:
            raise ManppError(f"step_in_backward: parameter '{self._name(stray[0])}' received gradients outside its "
                             f"own module's backward (it is used by two modules' losses), so stepping it early would "
                             f"not be exact; train without step_in_backward")
        if D.is_initialized():
            D.all_reduce_gradients(params)  # averaged over the processes before it steps
        self.optimizer.step()  # only these hold a gradient: the others were freed or have none yet
        for p in params:
            if p.grad is not None:
                self.stepped.add(id(p))
            p.grad = None

    def _parameter_done(self, p: torch.nn.Parameter) -> None:
        if self.active:
            self.pending.append(p)
            if sum(q.numel() * q.element_size() for q in self.pending) >= self.bucket:
                self._flush()

    def _flush(self) -> None:
        if self.pending:
            params, self.pending = self.pending, []
            self._step(params)

    def begin_step(self) -> None:
        """A training step starts: from now on, gradients step as they become final."""
        self.stepped.clear()
        self.pending = []
        self.active = True

    def after_module(self, j: int) -> None:
        """Module j's backward has ended: its parameters step and their gradients are freed."""
        if self.active and self.model.k > 1:
            self._step(self.modules[j])

    def end_step(self) -> None:
        """After ``train_step``: the last bucket steps (E2E), and every gradient has stepped."""
        self._flush()
        self.active = False
        left = [p for p in self.params if p.grad is not None]
        self.stepped.clear()
        if left:
            raise ManppError(f"step_in_backward: parameter '{self._name(left[0])}' still holds a gradient after the "
                             f"step; it was not stepped inside the backward passes")

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []


__all__ = ["StepInBackward", "check_step_in_backward"]
