"""Measuring a training step's memory: what autograd keeps alive for backward, and the gradients, on any device.

``ActivationTracker`` registers ``saved_tensors_hooks`` and counts the bytes of the distinct
storages that autograd graphs hold, excluding parameters and buffers, from the moment a tensor
is saved until its graph releases it. Its peak is the activation memory of a training step,
independent of the allocator (so it works on CPU). :func:`measure_step` also counts each parameter's
gradient (``.grad``) from the moment autograd accumulates it until it is freed (at the end of the step,
or early with ``step_in_backward``), so the step's peak of activations plus gradients is known too; with
:func:`state_bytes` (parameters, buffers, optimizer state) it makes the step's total footprint. Not
counted: the gradients in flight inside a backward pass, temporaries, and what an allocator adds
(a CUDA workspace, rounding, fragmentation). On CUDA, ``measure_step`` also reports the allocator's peak
(``torch.cuda.max_memory_allocated`` after a reset), which holds all of it.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Iterable

import torch


def storage_key(t: torch.Tensor) -> tuple[str, int]:
    """Which storage ``t`` lives in: the same for every view of it, for real and for fake tensors (whose
    storages have no data pointer: :mod:`manpp.memory.estimate` runs the same accounting on them)."""
    return str(t.device), t.untyped_storage()._cdata


class _Saved:
    """A tensor held by a graph; its release (when the graph frees it) is reported back."""

    __slots__ = ("tensor", "tracker", "key", "__weakref__")

    def __init__(self, tensor: torch.Tensor, tracker: "ActivationTracker", key):
        self.tensor, self.tracker, self.key = tensor, tracker, key

    def __del__(self):
        self.tracker._release(self.key)


class ActivationTracker:
    """Context manager tracking the bytes of storages saved for backward (see module docstring)."""

    def __init__(self, exclude: Iterable[torch.Tensor] = ()):
        self.excluded = {storage_key(t) for t in exclude}
        self.live: dict = {}
        self.current = 0
        self.peak = 0
        self.phase = None
        self.phase_peaks: dict = {}
        self.offloaded = 0  # bytes copied to host memory (offload_activations): each crosses the bus twice
        # the parameters' gradients now alive (counted by measure_step): kept to the end of the step, and as
        # step_in_backward keeps them (freed when their module's backward ends; E2E: at once)
        self.gradients = {"end": 0, "early": 0}
        self.gradient_live: dict = {"end": {}, "early": {}}
        self.total_peaks = {"end": 0, "early": 0}  # the peaks of activations plus gradients
        self.phase_total_peaks: dict = {"end": {}, "early": {}}
        self._hooks = None

    def set_phase(self, phase) -> None:
        """Attribute what is alive from now on to ``phase`` (e.g. the module index)."""
        self.phase = phase
        self._note()

    def _note(self) -> None:
        self.peak = max(self.peak, self.current)
        if self.phase is not None:
            self.phase_peaks[self.phase] = max(self.phase_peaks.get(self.phase, 0), self.current)
        for when, held in self.gradients.items():
            total = self.current + held
            self.total_peaks[when] = max(self.total_peaks[when], total)
            if self.phase is not None:
                peaks = self.phase_total_peaks[when]
                peaks[self.phase] = max(peaks.get(self.phase, 0), total)

    def gradient_ready(self, p: torch.Tensor) -> None:
        """``p.grad`` now exists (autograd accumulated it): counted in both ways until released."""
        key = storage_key(p.grad)
        for when, live in self.gradient_live.items():
            if key not in live:
                live[key] = p.grad.untyped_storage().nbytes()
                self.gradients[when] += live[key]
        self._note()

    def release_early(self, params) -> None:
        """``step_in_backward`` would step ``params`` now and free their gradients (only the "early" count)."""
        live = self.gradient_live["early"]
        for p in params:
            if p.grad is not None:
                self.gradients["early"] -= live.pop(storage_key(p.grad), 0)

    def _pack(self, t: torch.Tensor):
        if t.layout != torch.strided:
            return t
        key = storage_key(t)
        if key in self.excluded:
            return t
        entry = self.live.get(key)
        if entry is None:
            nbytes = t.untyped_storage().nbytes()
            self.live[key] = [nbytes, 1]
            self.current += nbytes
            self._note()
        else:
            entry[1] += 1
        return _Saved(t, self, key)

    @staticmethod
    def _unpack(obj):
        return obj.tensor if isinstance(obj, _Saved) else obj

    def _release(self, key) -> None:
        entry = self.live.get(key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            self.current -= entry[0]
            del self.live[key]

    def note_offloaded(self, t: torch.Tensor) -> None:
        """Count ``t`` as copied to host memory (it is not held on the device, so not in the peak)."""
        self.offloaded += t.numel() * t.element_size()

    def hold(self, t: torch.Tensor):
        """Count ``t`` as saved for backward until what this returns is released (for another
        ``saved_tensors_hooks`` pair that stores tensors its own way, e.g. in bf16)."""
        return self._pack(t)

    @staticmethod
    def held(obj) -> torch.Tensor:
        """The tensor behind what :meth:`hold` returned."""
        return ActivationTracker._unpack(obj)

    def __enter__(self) -> "ActivationTracker":
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        self._hooks.__enter__()
        _ACTIVE.append(self)
        return self

    def __exit__(self, *exc) -> None:
        _ACTIVE.remove(self)
        self._hooks.__exit__(*exc)


_ACTIVE: list[ActivationTracker] = []  # trackers inside their ``with`` block, innermost last


def active_tracker() -> ActivationTracker | None:
    """The innermost tracker now measuring (None: nothing is measured)."""
    return _ACTIVE[-1] if _ACTIVE else None


@dataclass
class MemoryReport:
    peak_activation_bytes: int  # max over the step of autograd-held bytes (params and buffers excluded)
    module_peak_bytes: list[int] = field(default_factory=list)  # the same, while module j was running
    peak_allocated_bytes: int | None = None  # CUDA allocator peak during the step; None elsewhere
    allocated_before_bytes: int | None = None  # CUDA: allocated when the step began (weights, gradients, ...)
    offloaded_bytes: int = 0  # saved activations copied to host memory during the step (offload_activations)
    peak_step_bytes: int | None = None  # max over the step of activations plus the gradients alive then
    module_step_peak_bytes: list[int] = field(default_factory=list)  # the same, while module j was running
    peak_step_early_bytes: int | None = None  # the same with step_in_backward (each gradient freed when final)
    module_step_early_peak_bytes: list[int] = field(default_factory=list)
    trained_bytes: int | None = None  # bytes of the parameters that received a gradient (hold optimizer state)

    @property
    def step_allocated_bytes(self) -> int | None:
        """CUDA: what the step added to the allocator at its peak (the tracker's view plus gradients in
        flight, temporaries and workspace)."""
        if self.peak_allocated_bytes is None or self.allocated_before_bytes is None:
            return None
        return self.peak_allocated_bytes - self.allocated_before_bytes


def measure_step(model, inputs: torch.Tensor, targets: torch.Tensor, *, restore: bool = True) -> MemoryReport:
    """Run one training step of a :class:`~manpp.core.engine.LocalModel` and measure its memory.

    The step starts as a training step does, with no gradient (they are put aside). Each gradient counts
    from the moment autograd accumulates it, in two ways from the same step: kept to the end of the step
    (an optimizer step after all the backward passes), and freed where ``step_in_backward``
    (:mod:`manpp.memory.earlystep`) frees it, when its module's backward ends (E2E: at once). With ``restore``
    (the default) the model's parameters, buffers and gradients are put back afterwards, so measuring has
    no effect on training (on fake tensors, :mod:`manpp.memory.estimate`, there is nothing to put back).
    """
    fake = isinstance(inputs, torch._subclasses.fake_tensor.FakeTensor)
    if fake:
        restore = False
    if getattr(model, "first_step_hooks", None):
        model.run_first_step_hooks(inputs, targets)  # settled first: their own measured steps are not counted here
    saved = copy.deepcopy(model.state_dict()) if restore else None
    grads = {p: (None if p.grad is None else p.grad.clone()) for p in model.parameters()} if restore else None
    trainable = [p for p in model.parameters() if p.requires_grad]
    for p in trainable:
        p.grad = None
    was_training = model.training
    model.train()
    cuda = inputs.is_cuda and not fake  # a fake CUDA tensor has no allocator to read
    tracker = ActivationTracker(list(model.parameters()) + list(model.buffers()))
    trained: dict[int, int] = {}
    k = len(model.local_modules)

    bucket = e2e_bucket_bytes(trainable)
    pending: list[torch.Tensor] = []

    def ready(p: torch.Tensor) -> None:
        trained[id(p)] = p.numel() * p.element_size()
        tracker.gradient_ready(p)
        if k == 1:  # E2E steps its gradients as they are accumulated, a bucket at a time
            pending.append(p)
            if sum(q.numel() * q.element_size() for q in pending) >= bucket:
                tracker.release_early(pending)
                pending.clear()

    handles = [stage.register_forward_pre_hook(lambda _m, _a, j=j: tracker.set_phase(j))
               for j, stage in enumerate(model.local_modules)]
    handles += [p.register_post_accumulate_grad_hook(ready) for p in trainable]
    try:
        before = None
        if cuda:
            torch.cuda.synchronize(inputs.device)
            torch.cuda.reset_peak_memory_stats(inputs.device)
            before = int(torch.cuda.memory_allocated(inputs.device))
        with tracker:
            model.train_step(inputs, targets,
                             after_module=(lambda j: tracker.release_early(model.module_parameters(j))) if k > 1
                             else None)
        allocated = None
        if cuda:
            torch.cuda.synchronize(inputs.device)
            allocated = int(torch.cuda.max_memory_allocated(inputs.device))
    finally:
        for h in handles:
            h.remove()
        if restore:
            model.load_state_dict(saved)
            for p, g in grads.items():
                p.grad = g
        model.train(was_training)
    phases = range(k)
    return MemoryReport(
        tracker.peak, [tracker.phase_peaks.get(j, 0) for j in phases], allocated, before, tracker.offloaded,
        tracker.total_peaks["end"], [tracker.phase_total_peaks["end"].get(j, 0) for j in phases],
        tracker.total_peaks["early"], [tracker.phase_total_peaks["early"].get(j, 0) for j in phases],
        sum(trained.values()))


E2E_BUCKETS = 16  # step_in_backward under E2E: gradients step in about this many buckets per step (manpp.memory.earlystep)


def e2e_bucket_bytes(params) -> int:
    """The bytes of gradients E2E's ``step_in_backward`` collects before it steps them: a sixteenth of all,
    and at least the largest parameter (one optimizer call per bucket, not per parameter)."""
    sizes = [p.numel() * p.element_size() for p in params]
    return max(max(sizes, default=0), sum(sizes) // E2E_BUCKETS)


OPTIMIZER_STATE_COPIES = {"sgd": 1, "adamw": 2}  # per trainable parameter: SGD momentum; AdamW's two moments


def state_bytes(model, optimizer: str = "sgd", trained_bytes: int | None = None) -> int:
    """What a model holds across steps: every parameter and buffer once (backbone, auxiliary networks,
    frozen EMA copies, BatchNorm statistics), and the optimizer's state of each parameter it trains:
    ``trained_bytes`` of them (a step's :attr:`MemoryReport.trained_bytes`: those that receive a gradient;
    the optimizer makes no state for the others), or without it every parameter that requires grad. The
    gradients are not here: they live within a step (:attr:`MemoryReport.peak_step_bytes`)."""
    held = {}
    for t in list(model.parameters()) + list(model.buffers()):
        held[storage_key(t)] = t.untyped_storage().nbytes()
    if trained_bytes is None:
        trained_bytes = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    return sum(held.values()) + trained_bytes * OPTIMIZER_STATE_COPIES[optimizer]


def format_bytes(n: int | float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"
