"""Saved activations in a narrower dtype: what autograd keeps for backward, stored in bf16.

``saved_activations=bf16`` runs every module's forward inside :func:`saved_in`, whose
``saved_tensors_hooks`` store each float32 tensor that autograd saves (activations, not
parameters) as bfloat16 and give it back as float32 in backward. The forward pass and the losses
are unchanged; the gradients differ from full precision by bf16 rounding of the saved inputs
(tested). Memory: about half the activation bytes. Under a :class:`~manpp.memory.ActivationTracker`
the stored bf16 tensors are what it counts, so ``describe``, ``plan`` and ``bench`` show the effect.
"""

from __future__ import annotations

import contextlib
import weakref

import torch

from .errors import ManppError, choices
from .memory import ActivationTracker, active_tracker

SAVED_DTYPES = {"bf16": torch.bfloat16}
MIN_ELEMENTS = 1024  # smaller saved tensors (statistics, scalars) stay as they are


def saved_dtype(name: str | None) -> torch.dtype | None:
    """The storage dtype of ``saved_activations`` (None: as computed)."""
    if name is None:
        return None
    if name not in SAVED_DTYPES:
        raise ManppError(f"unknown saved_activations {name!r}: accepted are {choices(SAVED_DTYPES)} or none")
    return SAVED_DTYPES[name]


def _stored(t: torch.Tensor, dtype: torch.dtype) -> bool:
    """Activations only: float32, large enough, and not a parameter (those are stored once already)."""
    return (t.dtype == torch.float32 and t.layout == torch.strided and t.numel() >= MIN_ELEMENTS
            and not isinstance(t, torch.nn.Parameter) and not (t.is_leaf and t.requires_grad)
            and t.device.type != "meta")


@contextlib.contextmanager
def saved_in(dtype: torch.dtype | None):
    """Within the block, tensors saved for backward are stored in ``dtype`` (None: no change)."""
    if dtype is None:
        yield
        return
    tracker = active_tracker()
    # one narrow copy per saved tensor, however many ops save it (a ReLU's output is also the next
    # conv's input); the weak reference proves the storage is still the one the key names
    copies: dict[tuple, tuple[weakref.ref, torch.Tensor]] = {}

    def pack(t: torch.Tensor):
        if not _stored(t, dtype):
            return (tracker.hold(t) if tracker is not None else t), None
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t._version)
        cached = copies.get(key)
        if cached is not None and cached[0]() is not None:
            narrow = cached[1]
        else:
            narrow = t.detach().to(dtype)
            copies[key] = (weakref.ref(t), narrow)
        return (tracker.hold(narrow) if tracker is not None else narrow), t.dtype

    def unpack(obj) -> torch.Tensor:
        stored, original = obj
        tensor = ActivationTracker.held(stored)
        return tensor if original is None else tensor.to(original)

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        yield


__all__ = ["SAVED_DTYPES", "saved_dtype", "saved_in"]
