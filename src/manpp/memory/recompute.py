"""Activation checkpointing: keep only the inputs of segments of units, recompute the rest in backward.

``checkpointing=units`` makes every unit of a module a segment, ``checkpointing=sqrt`` cuts each
module's n units into about sqrt(n) segments (Chen et al., 2016: O(sqrt n) memory for one more forward
pass). In the forward pass a segment keeps only its input; in backward it runs again, with grad, and its
gradients flow through the recomputed graph. E2E (K = 1) is checkpointed over segments of all units;
a local module only over its own units, so checkpointing and local learning combine: one module's
segment inputs and one segment's recomputation are all that is alive.

It is ``torch.utils.checkpoint`` in its reentrant form (the recomputation is an ordinary forward pass
inside backward, so an :class:`~manpp.memory.ActivationTracker` counts what it holds), and each segment
additionally:

- takes a dummy input that requires grad, so that a module whose input is detached (every module after
  the first, and the image) still gets its parameters' gradients;
- puts back the running statistics of its normalisation layers (BatchNorm) after the recomputation, so
  they are updated once per step, as without checkpointing;
- keeps its input as computed, never narrowed to bf16 (the recomputation must start from what the
  first pass read), though offloaded to host memory with ``offload_activations``; and recomputes under
  the saved-activation hooks of its first pass (``saved_activations=bf16``, offload);
- replays the RNG state (dropout, stochastic depth) and the autocast state of its first pass
  (``torch.utils.checkpoint``'s ``preserve_rng_state``).

The gradients are those of the plain step (tested: E2E and local, ResNets with BatchNorm, ViTs with
dropout). The cost is one more forward pass of the checkpointed units.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Callable, Sequence

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..base.settings import OneOf
from .saved import current_saved, saved_in

CHECKPOINTING = ("off", "units", "sqrt")
CHECKPOINTING_RULE = OneOf(CHECKPOINTING, meaning="activation checkpointing of every module's units: each unit a "
                           "segment, or about sqrt(n) segments")


def checkpointing_mode(mode: str | bool | None) -> str:
    """``mode`` checked: ``'off'`` (also None and False), ``'units'`` or ``'sqrt'``."""
    if mode is None or mode is False:
        return "off"
    if mode not in CHECKPOINTING:
        from ..base.errors import ManppError, choices

        raise ManppError(f"unknown checkpointing {mode!r}: accepted are {choices(CHECKPOINTING)}")
    return mode


def segment_bounds(n: int, mode: str | None) -> list[int] | None:
    """The boundaries ``[0, ..., n]`` of the segments ``mode`` cuts n units into (None: not checkpointed)."""
    if checkpointing_mode(mode) == "off" or n == 0:
        return None
    segments = n if mode == "units" else max(1, round(math.sqrt(n)))
    return sorted({round(i * n / segments) for i in range(segments + 1)})


STATISTICS = ("running_mean", "running_var", "num_batches_tracked")


@contextlib.contextmanager
def statistics_kept(modules: Sequence[nn.Module]):
    """Within the block, the running statistics of the normalisation layers of ``modules`` (BatchNorm,
    InstanceNorm with tracking) are scratch copies, so what a forward pass in training mode writes into
    them is dropped on exit. (Copies, not a restore afterwards: the recomputed graph keeps the statistics
    it read for its backward, which must not change under it.)"""
    kept = []
    for unit in modules:
        for m in unit.modules():
            if isinstance(m, nn.modules.batchnorm._NormBase) and m.track_running_stats and m.training:
                for name in STATISTICS:
                    buffer = getattr(m, name, None)
                    if buffer is not None:
                        kept.append((m, name, buffer))
                        setattr(m, name, buffer.clone())
    try:
        yield
    finally:
        for m, name, buffer in kept:
            setattr(m, name, buffer)


def _pack(h: Any) -> tuple[tuple[torch.Tensor, ...], bool]:
    if isinstance(h, torch.Tensor):
        return (h,), False
    if isinstance(h, (tuple, list)) and all(isinstance(t, torch.Tensor) for t in h):
        return tuple(h), True
    raise TypeError(f"checkpointing passes tensors or tuples of tensors between units, not {type(h).__name__}")


# Traced by torch.compile, the reentrant checkpoint gives wrong gradients (the units compile alone instead), so
# torch.compile must never trace it. torch._disable_dynamo is torch.compiler.disable that imports torch._dynamo
# only when the function is first called (about a second at import otherwise); torch uses it for the same reason.
_never_compiled = getattr(torch, "_disable_dynamo", None) or torch.compiler.disable


@_never_compiled
def run_checkpointed(fn: Callable[[Any], Any], h: Any, modules: Sequence[nn.Module]) -> Any:
    """``fn(h)`` keeping only ``h`` for backward, recomputed there (see the module docstring).
    ``modules`` are what ``fn`` runs (their running statistics are restored after the recomputation)."""
    tensors, as_tuple = _pack(h)
    hooks = current_saved()

    def segment(_dummy, *inputs):
        x = tuple(inputs) if as_tuple else inputs[0]
        if not torch.is_grad_enabled():  # the first pass: nothing is saved
            return _pack(fn(x))[0]
        with statistics_kept(modules), saved_in(*hooks):  # the recomputation in backward
            return _pack(fn(x))[0]

    dummy = torch.empty(0, device=tensors[0].device, requires_grad=True)
    with saved_in(None, hooks[1]):  # the input as computed (offloaded with the rest, if asked)
        out = checkpoint(segment, dummy, *tensors, use_reentrant=True, preserve_rng_state=True)
    return tuple(out) if as_tuple else out[0]


def run_units(units: Sequence[nn.Module], x: Any, bounds: Sequence[int] | None,
              calls: Sequence[Callable] | None = None) -> Any:
    """``units`` applied in order, each segment ``units[a:b]`` of ``bounds`` checkpointed when grad is on
    (``bounds`` None: none is). ``calls`` are what is called for the units (compiled ones), if not they."""
    calls = list(calls) if calls is not None else list(units)
    if bounds is None or not torch.is_grad_enabled():
        for call in calls:
            x = call(x)
        return x
    for a, b in zip(bounds, bounds[1:]):
        def fn(h, part=calls[a:b]):
            for call in part:
                h = call(h)
            return h

        x = run_checkpointed(fn, x, units[a:b])
    return x


__all__ = ["CHECKPOINTING", "CHECKPOINTING_RULE", "checkpointing_mode", "run_checkpointed", "run_units", "segment_bounds",
           "statistics_kept"]
