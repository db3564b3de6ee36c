"""Memory: what a step holds and how to hold less.

measure (the activation tracker, ``measure_step``, the state a model holds), saved (activations stored
in bf16 or in host memory), recompute (checkpointing of units), estimate (a step on fake tensors) and
earlystep (the optimizer step inside the backward pass). ``manpp.memory.measure_step`` and the other
names of measure are importable from here, as they were before the layout.
"""

from .measure import (OPTIMIZER_STATE_COPIES, ActivationTracker, MemoryReport, active_tracker, e2e_bucket_bytes,
                      format_bytes, measure_step, state_bytes, storage_key)

__all__ = ["OPTIMIZER_STATE_COPIES", "ActivationTracker", "MemoryReport", "active_tracker", "e2e_bucket_bytes",
           "format_bytes", "measure_step", "state_bytes", "storage_key"]
