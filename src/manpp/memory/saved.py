"""Where saved activations live: what autograd keeps for backward, stored in bf16 and/or in host memory.

Every module's forward runs inside :func:`saved_in`, whose ``saved_tensors_hooks`` decide how each
tensor that autograd saves (activations, not parameters) is kept until backward:

- ``saved_activations=bf16`` stores each float32 activation as bfloat16 and gives it back as
  float32 in backward. The forward pass and the losses are unchanged; the gradients differ from full
  precision by bf16 rounding of the saved inputs (tested). About half the activation bytes.
- ``offload_activations=true`` (CUDA) copies each activation into pinned host memory as it is saved
  and back to the device in backward, as ``torch.autograd.graph.save_on_cpu(pin_memory=True)`` does;
  the gradients are exact (tested on the CPU, where the copy is a host copy). The device then holds
  almost no activations, at the price of two transfers over PCIe per activation.

Both together store the bf16 copy on the host. Under a :class:`~manpp.memory.ActivationTracker` the
tensors kept on the device are what it counts (the bf16 copies; nothing for offloaded ones), so
``describe``, ``plan`` and ``bench`` show the effect. :func:`current_saved` tells a recomputation in
backward (activation checkpointing, :mod:`manpp.memory.recompute`) which hooks its first pass ran under.
"""

from __future__ import annotations

import contextlib
import weakref

import torch

from ..base.errors import ManppError, choices
from .measure import ActivationTracker, active_tracker, storage_key

SAVED_DTYPES = {"bf16": torch.bfloat16}
MIN_ELEMENTS = 1024  # smaller saved tensors (statistics, scalars) stay as they are

_ACTIVE: list[tuple[torch.dtype | None, bool]] = []  # the saved_in settings in force, innermost last


def saved_dtype(name: str | None) -> torch.dtype | None:
    """The storage dtype of ``saved_activations`` (None: as computed)."""
    if name is None:
        return None
    if name not in SAVED_DTYPES:
        raise ManppError(f"unknown saved_activations {name!r}: accepted are {choices(SAVED_DTYPES)} or none")
    return SAVED_DTYPES[name]


def _activation(t: torch.Tensor) -> bool:
    """An activation: strided, real, and neither a parameter nor a view of one (those are stored once
    already: a linear layer saves its weight transposed, a batched matmul its weight expanded), nor an
    expanded tensor (a zero stride: a copy would hold every repetition, far more than the original).
    A leaf that requires grad is one: the input of a segment recomputed in backward
    (:mod:`manpp.memory.recompute`)."""
    if t.layout != torch.strided or t.device.type == "meta" or isinstance(t, torch.nn.Parameter):
        return False
    expanded = any(step == 0 and size > 1 for step, size in zip(t.stride(), t.shape))
    return not isinstance(t._base, torch.nn.Parameter) and not expanded


def _narrowed(t: torch.Tensor) -> bool:
    """Stored narrower: float32 activations large enough to matter."""
    return t.dtype == torch.float32 and t.numel() >= MIN_ELEMENTS and _activation(t)


def current_saved() -> tuple[torch.dtype | None, bool]:
    """The ``(dtype, offload)`` of the innermost :func:`saved_in` now in force (``(None, False)``: none)."""
    return _ACTIVE[-1] if _ACTIVE else (None, False)


def _to_host(t: torch.Tensor) -> torch.Tensor:
    # the same strides (a channels-last map stays one): backward then computes exactly as without
    host = torch.empty_like(t, device="cpu", pin_memory=t.device.type == "cuda" and torch.cuda.is_available())
    host.copy_(t, non_blocking=True)
    return host


@contextlib.contextmanager
def saved_in(dtype: torch.dtype | None = None, offload: bool = False):
    """Within the block, tensors saved for backward are stored in ``dtype`` (None: as computed) and,
    with ``offload``, in host memory (see the module docstring). Neither: no hooks, unless an outer
    ``saved_in`` is in force, whose storage is then undone within the block (kept as computed)."""
    if dtype is None and not offload and not _ACTIVE:
        yield
        return
    tracker = active_tracker()
    # one stored copy per saved tensor, however many ops save it (a ReLU's output is also the next
    # conv's input); the weak reference proves the storage is still the one the key names
    copies: dict[tuple, tuple[weakref.ref, torch.Tensor]] = {}

    def pack(t: torch.Tensor):
        narrow = dtype is not None and _narrowed(t)
        moved = offload and _activation(t)
        if not (narrow or moved):
            return (tracker.hold(t) if tracker is not None else t), None, None
        key = (storage_key(t), t.storage_offset(), tuple(t.shape), t.stride(), t._version)
        cached = copies.get(key)
        if cached is not None and cached[0]() is not None:
            stored = cached[1]
        else:
            stored = t.detach().to(dtype) if narrow else t.detach()
            stored = _to_host(stored) if moved else stored
            copies[key] = (weakref.ref(t), stored)
            if moved and tracker is not None:
                tracker.note_offloaded(stored)
        on_device = tracker.hold(stored) if tracker is not None and not moved else stored
        return on_device, (t.dtype if narrow else None), (t.device if moved else None)

    def unpack(obj) -> torch.Tensor:
        stored, original_dtype, device = obj
        tensor = ActivationTracker.held(stored)
        if device is not None:
            tensor = tensor.to(device, non_blocking=True)
        return tensor if original_dtype is None else tensor.to(original_dtype)

    _ACTIVE.append((dtype, offload))
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
            yield
    finally:
        _ACTIVE.pop()


__all__ = ["SAVED_DTYPES", "current_saved", "saved_dtype", "saved_in"]
