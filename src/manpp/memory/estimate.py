"""A training step's memory and arithmetic, estimated without computing it: the step under fake tensors.

:func:`estimate_step` runs exactly the step that :func:`manpp.memory.measure_step` measures (the same
``train_step``, the same :class:`~manpp.memory.ActivationTracker` counting the storages autograd saves),
but on a model whose parameters, buffers and inputs are fake tensors
(``torch._subclasses.fake_tensor.FakeTensorMode``): every operator computes only the shape, dtype, strides
and device of its result, never its values. So the activation peak, the per-module peaks and the state
(:func:`manpp.memory.state_bytes`) come out as a real step would give them, with checkpointing, bf16 saved
activations, the EMA branch recomputed or kept, autocast and every objective's heads, in a fraction of a
second for a ResNet-101 at any batch size, and for a device this machine does not have (fake CUDA tensors
need no GPU). The same step under ``torch.utils.flop_counter.FlopCounterMode`` counts its floating-point
operations (matrix products, convolutions, attention; in forward, in backward and in every recomputation),
per module too, which :mod:`manpp.commands.strategies` turns into an estimated step time.

What the fake step cannot follow raises :class:`EstimateUnsupported` naming the operator and why: an
output whose shape depends on values (a detector matching its anchors to the boxes of an image), or a
library operator without a shape function. The caller then measures for real and says so.

The model is converted in place (:func:`fake_model`): build one for estimating, and drop it afterwards.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn
from torch._subclasses import fake_tensor
from torch.utils import _pytree as pytree
from torch.utils import flop_counter
from torch.utils._python_dispatch import TorchDispatchMode

from .measure import MemoryReport, measure_step

# the fake step's own failures: it needed a value (data-dependent control flow or output shape), or an
# operator has no shape function; anything else is a real error the real step would raise as well
_CANNOT_FOLLOW = (fake_tensor.DataDependentOutputException, fake_tensor.DynamicOutputShapeException,
                  fake_tensor.UnsupportedOperatorException, fake_tensor.UnsupportedFakeTensorException,
                  NotImplementedError)


class EstimateUnsupported(Exception):
    """The step cannot run on fake tensors (the message says which operation, and why)."""


@dataclasses.dataclass
class StepEstimate:
    report: MemoryReport  # the activation peak and its per-module peaks, as measure_step reports them
    flops: int  # the step's floating-point operations (forward, backward and recomputation)
    module_flops: list[int]  # the same, while module j ran (its forward, its loss, its backward)
    device: str  # the device the fake tensors were on


def new_mode() -> fake_tensor.FakeTensorMode:
    """A fake tensor mode that also takes real tensors (constants a step creates, such as a normalisation's
    mean), making them fake as they arrive."""
    return fake_tensor.FakeTensorMode(allow_non_fake_inputs=True)


def is_fake(t) -> bool:
    return isinstance(t, fake_tensor.FakeTensor)


def _fake_like(t: torch.Tensor, mode: fake_tensor.FakeTensorMode, device: torch.device) -> torch.Tensor:
    """A fake tensor of ``t``'s shape, strides and dtype on ``device`` (no value is copied)."""
    with mode:
        return torch.empty_strided(tuple(t.shape), tuple(t.stride()), dtype=t.dtype, device=device)


def fake_model(model: nn.Module, device: torch.device | str, mode: fake_tensor.FakeTensorMode) -> nn.Module:
    """Replace, in place, every parameter and buffer of ``model`` by a fake tensor of its shape, strides and
    dtype on ``device``; tensors shared by several modules stay shared, parameters stay parameters (with
    their ``requires_grad``). Returns ``model``."""
    device = torch.device(device)
    made: dict[int, torch.Tensor] = {}

    def convert(t: torch.Tensor | None, parameter: bool) -> torch.Tensor | None:
        if t is None:
            return None
        if id(t) not in made:
            fake = _fake_like(t.detach(), mode, device)
            made[id(t)] = nn.Parameter(fake, requires_grad=t.requires_grad) if parameter else fake
        return made[id(t)]

    for m in model.modules():
        for name, p in list(m._parameters.items()):
            m._parameters[name] = convert(p, True)
        for name, b in list(m._buffers.items()):
            m._buffers[name] = convert(b, False)
    return model


def fake_batch(batch, device: torch.device | str, mode: fake_tensor.FakeTensorMode):
    """``batch`` (a tensor, or tuples, lists and dicts of them) with every tensor made fake on ``device``."""
    device = torch.device(device)
    return pytree.tree_map(lambda v: _fake_like(v, mode, device) if isinstance(v, torch.Tensor) else v, batch)


def _attention_flops(q, k, v, *_args, **_kwargs) -> int:
    return flop_counter.sdpa_flop_count(q.shape, k.shape, v.shape)


def _attention_backward_flops(grad, q, k, v, *_args, **_kwargs) -> int:
    return flop_counter.sdpa_backward_flop_count(grad.shape, q.shape, k.shape, v.shape)


# torch's formulas, and the CPU's fused attention, which torch's table lacks (the same arithmetic as the others)
_FLOPS = {**flop_counter.flop_registry,
          torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _attention_flops,
          torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _attention_backward_flops}
_SHAPE_ONLY = set(flop_counter.flop_registry)  # torch's formulas take shapes; ours read the tensors


class FlopCount(TorchDispatchMode):
    """Counts the floating-point operations of the operators that run under it, with torch's formulas
    (``torch.utils.flop_counter``: matrix products, convolutions, attention; a multiply-add is 2). Unlike
    ``FlopCounterMode`` it attributes nothing to modules, so it puts no hooks on autograd (whose module
    tracking refuses the ``autograd.grad`` inside MAN++'s recomputed backward)."""

    def __init__(self):
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = _FLOPS.get(func._overloadpacket)
        if formula is not None:
            self.total += int(formula(*args, **kwargs, out_val=out) if func._overloadpacket in _SHAPE_ONLY
                              else formula(*args, **kwargs))
        return out


def _reason(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:200]}" if text else type(exc).__name__


def estimate_step(model, inputs, targets, mode: fake_tensor.FakeTensorMode, *, flops: bool = True) -> StepEstimate:
    """One training step of a fake :class:`~manpp.core.engine.LocalModel` (:func:`fake_model`) on fake ``inputs``
    and ``targets`` (:func:`fake_batch`), measured as :func:`manpp.memory.measure_step` measures a real one;
    with ``flops`` also counted (see the module docstring). Raises :class:`EstimateUnsupported` when the
    step cannot run on fake tensors."""
    marks: list[int] = []
    counter = FlopCount() if flops else None
    handles = []
    model.zero_grad(set_to_none=True)  # as a training step starts: no gradient to accumulate into
    try:
        with mode:
            if getattr(model, "first_step_hooks", None):  # settled first, outside the count (as measure_step does)
                model.run_first_step_hooks(inputs, targets)
            if counter is None:
                report = measure_step(model, inputs, targets, restore=False)
            else:
                handles = [stage.register_forward_pre_hook(lambda *_: marks.append(counter.total))
                           for stage in model.local_modules]
                with counter:
                    report = measure_step(model, inputs, targets, restore=False)
    except _CANNOT_FOLLOW as exc:
        raise EstimateUnsupported(_reason(exc)) from exc
    except RuntimeError as exc:  # a meta kernel that refuses (e.g. an op with no fake implementation)
        if "meta" in str(exc).lower() or "fake" in str(exc).lower():
            raise EstimateUnsupported(_reason(exc)) from exc
        raise
    finally:
        for h in handles:
            h.remove()
    leaves = [v for v in pytree.tree_leaves(inputs) if isinstance(v, torch.Tensor)]
    device = str(leaves[0].device) if leaves else "cpu"
    if counter is None:
        return StepEstimate(report, 0, [], device)
    total = counter.total
    bounds = marks + [total] if len(marks) == model.k else [0] * model.k + [total]  # (a compiled module: no marks)
    return StepEstimate(report, total, [b - a for a, b in zip(bounds, bounds[1:])], device)


__all__ = ["EstimateUnsupported", "FlopCount", "StepEstimate", "estimate_step", "fake_batch", "fake_model", "is_fake", "new_mode"]
