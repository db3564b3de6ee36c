"""Multi-process data parallelism with ``torch.distributed``, started by ``torchrun``.

``torchrun --nproc_per_node N -m manpp train ...`` starts N processes; each sees ``WORLD_SIZE``,
``RANK`` and ``LOCAL_RANK`` in its environment and :func:`setup` joins them in one process group
(NCCL on CUDA, each process on ``cuda:LOCAL_RANK``; gloo on CPU). There is no DDP wrapper: the
local step runs its K backward passes as usual and every trainable parameter's gradient (all K
modules, auxiliary networks, MAN++ scales) is averaged over the processes in flat buffers before
every process makes the same optimizer step. With ``overlap_comm`` (the default) each module's
all-reduce starts as soon as that module's backward ends (:class:`OverlappedReducer`), so it runs
while the next module computes; otherwise :func:`all_reduce_gradients` reduces them all at the end.

* ``batch_size`` is the global batch. Process ``r`` of ``W`` takes the contiguous slice
  ``[r * B/W, (r + 1) * B/W)`` of every global batch (see :func:`shard_bounds`), so the images of
  one step are those of single-process training.
* Parameters and buffers (including the frozen EMA copies) are broadcast from rank 0 at the
  start. BatchNorm statistics are per process (no SyncBN, as in the authors' release); the
  running statistics of rank 0 are broadcast before every evaluation and checkpoint.
* Helpers here work without a process group too (rank 0 of 1), so other code can call
  :func:`is_main`, :func:`rank` and :func:`world_size` unconditionally.
"""

from __future__ import annotations

import datetime
import os
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from .errors import ManppError, choices

BACKENDS = ("nccl", "gloo")
PARALLEL_MODES = ("modules",)  # parallel=: one pipelined stage of modules per process (manpp.train.pipeline)
OVERLAP_CHOICES = (True, False, "auto")  # overlap_comm=; auto: on CUDA (NCCL overlaps); the CPU measured no gain
DEFAULT_TIMEOUT_S = 600.0  # the config's dist_timeout
OVERLAP_MIN_BYTES = 1 << 20  # overlap_comm: finished modules' gradients are sent once they hold this much
BUCKET_BYTES = 64 * 2**20  # largest flat buffer one all-reduce carries


@dataclass(frozen=True)
class LaunchEnv:
    """What ``torchrun`` put in the environment (``None`` when this process was not started by it)."""

    rank: int
    world_size: int
    local_rank: int


def launch_env() -> LaunchEnv | None:
    """Rank, world size and local rank from ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``, or ``None``."""
    if "WORLD_SIZE" not in os.environ:
        return None
    values = {}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        raw = os.environ.get(name, "0" if name == "LOCAL_RANK" else None)
        if raw is None or not raw.strip().isdigit():
            raise ManppError(f"environment variable {name}={raw!r} is not a non-negative integer: start "
                             f"multi-process training with torchrun (e.g. torchrun --nproc_per_node 2 -m manpp train)")
        values[name] = int(raw)
    if values["WORLD_SIZE"] < 1 or values["RANK"] >= values["WORLD_SIZE"]:
        raise ManppError(f"RANK={values['RANK']} does not fit WORLD_SIZE={values['WORLD_SIZE']}: "
                         f"start multi-process training with torchrun")
    return LaunchEnv(values["RANK"], values["WORLD_SIZE"], values["LOCAL_RANK"])


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def _env_or_none() -> LaunchEnv | None:
    try:
        return launch_env()
    except ManppError:
        return None


def rank() -> int:
    """This process's rank: the group's, else torchrun's ``RANK`` (before setup, after shutdown), else 0."""
    if is_initialized():
        return dist.get_rank()
    env = _env_or_none()
    return env.rank if env is not None else 0


def world_size() -> int:
    """Number of processes: the group's, else torchrun's ``WORLD_SIZE``, else 1."""
    if is_initialized():
        return dist.get_world_size()
    env = _env_or_none()
    return env.world_size if env is not None else 1


def is_main() -> bool:
    """True in the process that prints and writes files (rank 0, or the only process)."""
    return rank() == 0


def planned_world_size() -> int:
    """The world size a run will have (torchrun's ``WORLD_SIZE`` before :func:`setup`); checks the variables."""
    if is_initialized():
        return world_size()
    env = launch_env()
    return env.world_size if env is not None else 1


def process_device(name: str, env: LaunchEnv | None) -> torch.device:
    """``--device`` for this process: ``cuda``/``auto`` become ``cuda:LOCAL_RANK`` under torchrun."""
    if name not in ("auto", "cpu", "cuda") and not name.startswith("cuda:"):
        raise ManppError(f"unknown device '{name}': accepted are 'auto', 'cpu' or 'cuda'")
    cuda = name.startswith("cuda") or (name == "auto" and torch.cuda.is_available())
    if cuda and not torch.cuda.is_available():
        raise ManppError(f"device '{name}' was asked for but CUDA is not available here; use --device cpu")
    if not cuda:
        return torch.device("cpu")
    if env is None:
        return torch.device("cuda" if name == "auto" else name)
    if name.startswith("cuda:") and env.world_size > 1:
        raise ManppError(f"device '{name}' names one GPU, but under torchrun each process uses cuda:LOCAL_RANK: "
                         f"give --device cuda (or auto)")
    count = torch.cuda.device_count()
    if env.local_rank >= count:
        raise ManppError(f"LOCAL_RANK {env.local_rank} has no GPU: this machine has {count} CUDA device(s), so "
                         f"start at most {count} process(es) per node (torchrun --nproc_per_node {count})")
    return torch.device("cuda", env.local_rank)


def setup(device: torch.device, backend: str | None = None, timeout_s: float = DEFAULT_TIMEOUT_S) -> bool:
    """Join the process group described by torchrun's environment; return True if this call created it.

    Nothing happens (False) without torchrun's environment or when a group already exists.
    ``backend`` None picks NCCL for CUDA devices and gloo otherwise. ``timeout_s``: how long a
    process waits in a collective for the others (a hung process makes the rest fail after it,
    instead of torch's default 30 minutes).
    """
    env = launch_env()
    if env is None or is_initialized():
        return False
    if backend is None:
        backend = "nccl" if device.type == "cuda" else "gloo"
    if backend not in BACKENDS:
        raise ManppError(f"unknown dist_backend '{backend}': accepted are {choices(BACKENDS)} (or none: nccl on "
                         f"CUDA, gloo on CPU)")
    if backend == "nccl" and device.type != "cuda":
        raise ManppError(f"dist_backend 'nccl' needs CUDA devices, but this run is on {device}: use gloo for CPU")
    missing = [v for v in ("MASTER_ADDR", "MASTER_PORT") if v not in os.environ]
    if missing:
        raise ManppError(f"WORLD_SIZE is set but {' and '.join(missing)} is not: start multi-process training with "
                         f"torchrun (e.g. torchrun --nproc_per_node 2 -m manpp train ...)")
    kwargs: dict[str, Any] = {"timeout": datetime.timedelta(seconds=timeout_s)}
    if device.type == "cuda":
        torch.cuda.set_device(device)
        if backend == "nccl":
            kwargs["device_id"] = device  # binds the communicator to this GPU (no guessing in barrier)
    dist.init_process_group(backend=backend, rank=env.rank, world_size=env.world_size, **kwargs)
    return True


def shutdown() -> None:
    """Destroy the process group once every process has reached this point (after the last
    collective; no process tears its connections down while another still uses them)."""
    if is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def barrier() -> None:
    if is_initialized():
        dist.barrier()


def shard_bounds(n: int, index: int | None = None, count: int | None = None) -> tuple[int, int]:
    """``[start, end)`` of process ``index``'s contiguous share of ``n`` items (disjoint, covering all)."""
    index = rank() if index is None else index
    count = world_size() if count is None else count
    return n * index // count, n * (index + 1) // count


def check_batch_size(batch_size: int, world: int | None = None) -> int:
    """The per-process batch; a clear error when the global batch does not split evenly."""
    world = planned_world_size() if world is None else world
    if batch_size < 1:
        raise ManppError(f"batch_size must be a positive number of images, got {batch_size}")
    if batch_size < world or batch_size % world:
        raise ManppError(f"batch_size {batch_size} cannot be split evenly across {world} processes: batch_size is "
                         f"the global batch, give a multiple of {world}")
    return batch_size // world


def _buckets(tensors: Iterable[torch.Tensor], limit: int = BUCKET_BYTES) -> list[list[int]]:
    """Indices of ``tensors`` grouped by (device, dtype) into buckets of at most ``limit`` bytes."""
    groups: dict[tuple, list[list[int]]] = defaultdict(list)
    sizes: dict[tuple, int] = {}
    for i, t in enumerate(tensors):
        key = (t.device, t.dtype)
        nbytes = t.numel() * t.element_size()
        if not groups[key] or sizes[key] + nbytes > limit:
            groups[key].append([])
            sizes[key] = 0
        groups[key][-1].append(i)
        sizes[key] += nbytes
    return [bucket for buckets in groups.values() for bucket in buckets]


@torch.no_grad()
def broadcast_tensors(tensors: Sequence[torch.Tensor], src: int = 0) -> None:
    """Overwrite ``tensors`` in place with rank ``src``'s values, a few flat buffers at a time."""
    if not is_initialized():
        return
    tensors = [t for t in tensors if t.numel() > 0]
    for bucket in _buckets(tensors):
        chunk = [tensors[i] for i in bucket]
        flat = _flatten_dense_tensors(chunk)
        dist.broadcast(flat, src)
        for t, synced in zip(chunk, _unflatten_dense_tensors(flat, chunk)):
            t.copy_(synced)


def broadcast_state(model: torch.nn.Module) -> None:
    """All parameters and buffers (``state_dict``: backbone, heads, EMA copies, BN statistics) from rank 0."""
    broadcast_tensors([t for t in model.state_dict(keep_vars=True).values() if isinstance(t, torch.Tensor)])


def broadcast_buffers(model: torch.nn.Module) -> None:
    """Buffers only (BatchNorm running statistics) from rank 0, so every rank evaluates one model."""
    broadcast_tensors(list(model.buffers()))


@torch.no_grad()
def all_reduce_gradients(params: Sequence[torch.nn.Parameter]) -> None:
    """Average ``.grad`` of ``params`` over all processes, in place.

    Gradients go through flat buffers per (device, dtype), at most ``BUCKET_BYTES`` each. A
    gradient that is ``None`` counts as zeros; it stays ``None`` only when it is ``None`` on
    every process (so the optimizer skips that parameter, as a single process would), which
    one presence flag per parameter, reduced with the first bucket, decides.
    """
    _finish(_launch(params, async_op=False))


def ddp_wrapper_of(module: torch.nn.Module):
    """The ``DistributedDataParallel`` that wraps ``module``, if one does (found through the objects that
    refer to it: DDP keeps it in its ``_modules``); None otherwise, and always without a process group."""
    if not is_initialized():
        return None
    import gc

    from torch.nn.parallel import DistributedDataParallel

    frontier: list = [module]
    for _ in range(3):  # module <- DDP._modules <- DDP.__dict__ <- DDP
        found = []
        for obj in gc.get_referrers(*frontier):
            if isinstance(obj, DistributedDataParallel) and obj.module is module:
                return obj
            if isinstance(obj, dict):
                found.append(obj)
        if not found:
            return None
        frontier = found
    return None


def refuse_ddp_wrapper(module: torch.nn.Module) -> None:
    """DDP cannot average a local model's gradients: it expects one backward per forward of the wrapped
    module, while a local step runs K backward passes outside its forward. The processes would silently
    drift apart, so this is one clear error instead."""
    if ddp_wrapper_of(module) is not None:
        raise ManppError("this LocalModel is wrapped in DistributedDataParallel, which does not see its K local "
                         "backward passes: the gradients would not be averaged and the processes would drift apart. "
                         "Train the LocalModel itself and average the gradients before the optimizer step: "
                         "model.train_step(x, y); manpp.base.distributed.all_reduce_gradients("
                         "model.parameters_to_optimize()); optimizer.step() (or use torchrun -m manpp train; "
                         "docs/distributed.md)")


class _Pending:
    """One group's gradients on their way through all-reduce: the flat buffers and their handles."""

    def __init__(self, params: list, grads: list, flags: torch.Tensor):
        self.params, self.grads, self.flags = params, grads, flags
        self.parts: list[tuple[Any, torch.Tensor, list[torch.Tensor]]] = []  # (work, flat, tensors)


def _launch(params: Sequence[torch.nn.Parameter], async_op: bool) -> _Pending | None:
    """Start the all-reduce of ``params``' gradients (asynchronously with ``async_op``)."""
    if not is_initialized():
        return None
    params = list(params)
    if not params:
        return None
    grads = [p.grad if p.grad is not None else torch.zeros_like(p, memory_format=torch.preserve_format)
             for p in params]
    flags = torch.tensor([p.grad is not None for p in params], dtype=torch.float32, device=params[0].device)
    pending = _Pending(params, grads, flags)
    tensors = [flags] + grads
    for bucket in _buckets(tensors):
        chunk = [tensors[i] for i in bucket]
        flat = _flatten_dense_tensors(chunk)
        pending.parts.append((dist.all_reduce(flat, async_op=async_op), flat, chunk))
    return pending


def _finish(pending: _Pending | None) -> None:
    """Wait for ``pending``'s all-reduce, then write the averages back into the gradients."""
    if pending is None:
        return
    world = world_size()
    for work, flat, chunk in pending.parts:
        if work is not None:
            work.wait()
        if world > 1:
            flat.div_(world)
        for t, reduced in zip(chunk, _unflatten_dense_tensors(flat, chunk)):
            t.copy_(reduced)
    present = (pending.flags > 0).tolist()  # flags were averaged: > 0 where any process had a gradient
    for p, g, has in zip(pending.params, pending.grads, present):
        if has and p.grad is None:
            p.grad = g


class OverlappedReducer:
    """Gradient averaging that overlaps communication with compute, module by module.

    Local learning finishes module j's gradients when module j's backward ends (later modules
    never reach them), so :meth:`start` launches that module's all-reduce asynchronously right
    then, while module j + 1 computes; :meth:`wait`, before the optimizer step, reduces what no
    module owns and waits for everything. The averages are those of :func:`all_reduce_gradients`
    (the same sums, grouped by module). Small modules wait for the next ones until together they
    hold ``min_bytes``, so a step sends a few messages, not K. The flat buffers are alive until
    :meth:`wait`: one extra copy of the gradients, where the synchronous path holds one bucket.
    """

    def __init__(self, groups: Sequence[Sequence[torch.nn.Parameter]], params: Sequence[torch.nn.Parameter],
                 min_bytes: int = OVERLAP_MIN_BYTES):
        self.min_bytes = min_bytes
        self.queue: list[torch.nn.Parameter] = []  # finished modules' parameters, not yet launched
        wanted = {id(p) for p in params}
        seen: set[int] = set()
        self.groups: list[list[torch.nn.Parameter]] = []
        for group in groups:  # each parameter in the first group that has it, if it is optimized at all
            mine = [p for p in group if id(p) in wanted and id(p) not in seen]
            seen.update(id(p) for p in mine)
            self.groups.append(mine)
        self.rest = [p for p in params if id(p) not in seen]
        self.pending: list[_Pending | None] = []

    def start(self, j: int) -> None:
        """Module j's backward has ended: launch its gradients' all-reduce, together with those of
        the modules before it still waiting, once they hold ``min_bytes`` (fewer, larger messages)."""
        self.queue += self.groups[j]
        if sum(p.numel() * p.element_size() for p in self.queue) >= self.min_bytes:
            self.pending.append(_launch(self.queue, async_op=True))
            self.queue = []

    def wait(self) -> None:
        """Before the optimizer step: every gradient averaged, in place."""
        self.pending.append(_launch(self.queue + self.rest, async_op=True))
        self.queue = []
        for pending in self.pending:
            _finish(pending)
        self.pending = []


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over all processes (in place) and return it; unchanged without a group."""
    if is_initialized():
        dist.all_reduce(values)
    return values


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` (picklable) on every process."""
    if not is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src)
    return box[0]


def gather_objects(obj: Any) -> list[Any]:
    """Every process's ``obj``, in rank order, on every process (``[obj]`` without a group)."""
    if not is_initialized():
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


__all__ = ["BACKENDS", "OVERLAP_CHOICES", "PARALLEL_MODES", "LaunchEnv", "OverlappedReducer", "all_reduce_gradients", "all_reduce_sum", "barrier",
           "broadcast_buffers", "ddp_wrapper_of", "refuse_ddp_wrapper",
           "broadcast_object", "broadcast_state", "broadcast_tensors", "check_batch_size", "gather_objects",
           "is_initialized", "is_main", "launch_env", "planned_world_size", "process_device", "rank", "setup",
           "shard_bounds", "shutdown", "world_size"]
