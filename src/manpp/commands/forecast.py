"""Every strategy's memory and time, estimated in seconds instead of measured: what ``manpp plan`` shows.

:func:`estimate` takes the strategies of :mod:`manpp.commands.strategies` and, for each (method, K), builds the
model on the meta device (shapes only: nothing is initialised), makes it fake on the target device and
runs each strategy's training step on fake tensors (:mod:`manpp.memory.estimate`). That gives the activation
peak and the state as :func:`manpp.commands.strategies.measure` would measure them (the same tracker over the same
step; tests hold the two within 2 %), and the step's FLOPs, recomputation included. ``recompute_ema='auto'``
is settled from the same two steps a run settles it from (:func:`manpp.core.momentum.recompute_choice`).

Time is an estimate too, and says so: one short real probe (:func:`probe_rate`: E2E's plain step at a small
batch on the target device, timed, its FLOPs counted) gives the device's rate, and every strategy's time is
its FLOPs at that rate. That ranks the strategies by their arithmetic; what it leaves out (memory-bound
operations, the cost of many small modules, bf16 conversions) is what ``plan --measure`` times for real.
Where the target device is not on this machine (a GPU plan made on a laptop), there is no probe: the FLOPs
rank the strategies and no seconds are given.

A (method, K) whose step the fake tensors cannot follow (a detector's anchor matching: output shapes that
depend on values) is measured for real on the target device, and its records say so.

The (method, K) groups are independent, so with more than one core they are estimated in parallel
processes (``jobs``).
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Sequence

import torch

from ..base.errors import ManppError
from ..config import trainconfig as C
from ..config.resolve import data_info
from ..core.momentum import MomentumAux, recompute_choice, settle_recompute
from ..memory.estimate import (EstimateUnsupported, FlopCount, StepEstimate, estimate_step, fake_batch, fake_model,
                               new_mode)
from ..memory.measure import MemoryReport, measure_step
from ..tasks import task_of
from ..train.build import build_model, memory_format, resolve_device
from .strategies import (ESTIMATED, MEASURED, Strategy, apply_strategy, build_models, config_of, record_of, settle,
                         synchronize)

PROBE_FLOPS = {"cpu": 2e10, "cuda": 2e12}  # the work of one probe step: a fraction of a second on each
HOST_LINK_BYTES_PER_S = 16e9  # offloaded activations: about what a PCIe 4.0 x16 link moves each way (assumed)
PARALLEL_MIN_STRATEGIES = 12  # fewer are estimated in this process (starting workers costs seconds)


def target_device(name: str) -> tuple[torch.device, bool]:
    """The device a plan is for, and whether this machine has it: ``cuda`` (or ``cuda:N``) names a GPU
    even where there is none, since an estimate runs on fake tensors (``auto``: CUDA when there is one)."""
    if str(name).startswith("cuda") and not torch.cuda.is_available():
        if name != "cuda" and not str(name).removeprefix("cuda:").isdigit():
            raise ManppError(f"unknown device '{name}': accepted are 'auto', 'cpu', 'cuda' or 'cuda:N'")
        return torch.device(name), False
    return resolve_device(name), True


def _probe_batch(flops_per_image: float, batch: int, device: torch.device) -> int:
    """The probe's batch: about PROBE_FLOPS of work (a fraction of a second), at most the run's batch."""
    target = PROBE_FLOPS["cuda" if device.type == "cuda" else "cpu"]
    return int(max(1, min(batch, round(target / max(flops_per_image, 1.0)))))


def probe_rate(cfg: C.TrainConfig, info, device: torch.device, flops_per_image: float) -> dict:
    """One short real probe: E2E's plain step of ``cfg``'s model on ``device`` at a small batch (about
    PROBE_FLOPS of work), timed (the faster of two steps after one warm-up) with its FLOPs counted; its
    rate, FLOP/s, turns the strategies' FLOPs into estimated seconds."""
    batch = _probe_batch(flops_per_image, cfg.batch_size, device)
    torch.manual_seed(cfg.seed)
    model = build_model(dataclasses.replace(config_of(cfg, "e2e", 1), compile=False), info, device)
    x, y = task_of(model.backbone).example_batch(batch, info, device)
    x = x.contiguous(memory_format=memory_format(cfg))
    counter = FlopCount()
    times = []
    for i in range(3):
        model.zero_grad(set_to_none=True)
        synchronize(device)
        start = time.perf_counter()
        if i == 1:
            with counter:  # counting costs microseconds per operator: this step is timed as well
                model.train_step(x, y)
        else:
            model.train_step(x, y)
        synchronize(device)
        times.append(time.perf_counter() - start)
    seconds = min(times[1:])
    return {"batch_size": batch, "flops": counter.total, "seconds": seconds,
            "flops_per_s": counter.total / seconds if seconds > 0 else None, "device": str(device)}


def _estimate_settled(model, x, y, mode, auto: bool) -> tuple[StepEstimate, list | None]:
    """The step of ``model`` estimated as a run of it would take it: with ``recompute_ema='auto'`` its
    momentum auxiliary networks settled as :func:`~manpp.core.momentum.settle_recompute` settles them, from a
    step that recomputes every EMA branch and one that recomputes none (each module's peaks and FLOPs are
    then those of its choice: modules run one at a time). Returns the estimate and the choices."""
    momentum = [a for a in model.aux if isinstance(a, MomentumAux)]
    if not momentum:
        return estimate_step(model, x, y, mode), None
    if any(a.inplace_input is None for a in momentum):  # their first call tries the unit on a copy: not counted
        estimate_step(model, x, y, mode, flops=False)
    if not auto:
        return estimate_step(model, x, y, mode), [a.recompute_ema for a in momentum]
    for a in momentum:
        a.recompute_ema = True
    every = estimate_step(model, x, y, mode)
    for a in momentum:
        a.recompute_ema = False
    none = estimate_step(model, x, y, mode)
    flags = recompute_choice(every.report.module_peak_bytes, none.report.module_peak_bytes)
    for j, a in enumerate(model.aux):
        if isinstance(a, MomentumAux):
            a.recompute_ema = flags[j]
    if every.report.offloaded_bytes or none.report.offloaded_bytes:  # what moves is counted per step: take it
        return estimate_step(model, x, y, mode), [a.recompute_ema for a in momentum]
    chosen = [every if j < len(model.aux) and flags[j] else none for j in range(model.k)]

    def composed(field: str) -> list[int]:
        return [getattr(c.report, field)[j] for j, c in enumerate(chosen)]

    peaks, step_peaks, early_peaks = (composed("module_peak_bytes"), composed("module_step_peak_bytes"),
                                      composed("module_step_early_peak_bytes"))
    report = dataclasses.replace(every.report, peak_activation_bytes=max(peaks), module_peak_bytes=peaks,
                                 peak_step_bytes=max(step_peaks), module_step_peak_bytes=step_peaks,
                                 peak_step_early_bytes=max(early_peaks), module_step_early_peak_bytes=early_peaks)
    module_flops = [c.module_flops[j] for j, c in enumerate(chosen)]
    return StepEstimate(report, sum(module_flops), module_flops, every.device), [a.recompute_ema for a in momentum]


def _estimate_group(job: tuple) -> dict:
    """One (method, K): every strategy of ``group`` estimated on one fake model. Returns ``{"records": ...}``,
    or ``{"unsupported": why}`` when the fake step cannot follow it. Runs in a worker process, or here."""
    cfg, group, device, source = job
    info = data_info(cfg)
    entry = build_models(cfg, group, info, "meta")[(group[0].method, group[0].k)]  # shapes only, made fake below
    x_real, y_real = task_of(entry["model"].backbone).example_batch(cfg.batch_size, info, "cpu")
    x_real = x_real.contiguous(memory_format=memory_format(cfg))
    mode = new_mode()
    model = fake_model(entry["model"], device, mode)
    x, y = fake_batch((x_real, y_real), device, mode)
    # the EMA recomputation is settled below, from the same two steps settle_recompute takes
    model.first_step_hooks = [h for h in model.first_step_hooks if h is not settle_recompute]
    auto = cfg.recompute_ema == "auto"
    records = []
    steps: dict[Strategy, tuple] = {}  # one fake step gives a strategy and its early-step twin
    try:
        for s in group:
            base = dataclasses.replace(s, early_step=False)
            if base not in steps:
                apply_strategy(model, base)
                steps[base] = _estimate_settled(model, x, y, mode, auto)
            est, recompute = steps[base]
            run = {"strategy": s, "entry": entry, "report": est.report, "recompute": recompute, "flops": est.flops,
                   "memory_source": source, "step_time_s": None, "time_source": None}
            records.append(record_of(cfg, run, info, device))
    except EstimateUnsupported as exc:
        return {"unsupported": str(exc)}
    return {"records": records}


def _measured_instead(cfg, group, info, device, present: bool, why: str) -> list[dict]:
    """The strategies of one (method, K) measured for real, because the fake step could not follow (``why``)."""
    if not present:
        raise ManppError(f"{cfg.model} cannot be estimated on fake tensors ({why}), and it cannot be measured "
                         f"instead: {device} is not on this machine. Plan on the machine that has it")
    entry = build_models(cfg, group, info, device)[(group[0].method, group[0].k)]
    model = entry["model"]
    x, y = task_of(model.backbone).example_batch(cfg.batch_size, info, device)
    x = x.contiguous(memory_format=memory_format(cfg))
    auto = cfg.recompute_ema == "auto"
    out = []
    for s in group:
        recompute = settle(model, s, x, y, auto)  # (an early-step twin measures the same step again)
        counter = FlopCount()
        with counter:
            report = measure_step(model, x, y)
        run = {"strategy": s, "entry": entry, "report": report, "recompute": recompute, "flops": counter.total,
               "memory_source": f"{MEASURED}: the fake step cannot follow it ({why})", "step_time_s": None,
               "time_source": None}
        out.append(record_of(cfg, run, info, device))
    return out


def default_jobs() -> int:
    """The cores this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def _one_thread() -> None:
    torch.set_num_threads(1)


def estimate(cfg: C.TrainConfig, strategies: Sequence[Strategy], *, probe: bool = True, progress: bool = True,
             jobs: int | None = None) -> tuple[list[dict], dict | None]:
    """One record per strategy, in the order given, none of them run for real (see the module docstring):
    ``memory_source`` and ``time_source`` say how each figure was obtained. ``jobs``: processes estimating
    (method, K) groups side by side (default: one per core when there are enough strategies). Returns the
    records and the probe (None: no probe, so ``step_time_s`` is None and ``flops`` ranks)."""
    from tqdm.auto import tqdm

    info = data_info(cfg)
    device, present = target_device(cfg.device)
    groups: dict[tuple[str, int], list[Strategy]] = {}
    for s in strategies:
        groups.setdefault((s.method, s.k), []).append(s)
    # the largest first, so that parallel workers finish together
    order = sorted(groups, key=lambda key: -key[1] * (2 if key[0] != "e2e" else 1))
    jobs = jobs or (default_jobs() if len(strategies) >= PARALLEL_MIN_STRATEGIES else 1)
    jobs = max(1, min(jobs, len(groups)))
    # fake CUDA tensors need a CUDA driver for their backward; without one the step runs on fake CPU tensors,
    # whose operators save the same tensors as the GPU's for convolutions, normalisations and (fused) attention
    fake_device = device if present or device.type == "cpu" else torch.device("cpu")
    source = ESTIMATED if fake_device == device else f"{ESTIMATED} with the CPU's operators ({device} is not here)"
    work = [(cfg, groups[key], str(fake_device), source) for key in order]
    bar = tqdm(total=len(strategies), desc="strategies (estimated)", unit="strategy", leave=False,
               disable=None if progress else True)  # None: no bar off a terminal
    results: dict[tuple[str, int], dict] = {}
    if jobs == 1:
        for key, job in zip(order, work):
            results[key] = _estimate_group(job)
            bar.update(len(groups[key]))
    else:
        import concurrent.futures
        import multiprocessing

        threads = torch.get_num_threads()
        with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"),
                                                    initializer=_one_thread) as pool:
            futures = {pool.submit(_estimate_group, job): key for key, job in zip(order, work)}
            for future in concurrent.futures.as_completed(futures):
                key = futures[future]
                results[key] = future.result()
                bar.update(len(groups[key]))
        torch.set_num_threads(threads)
    bar.close()
    records: dict[Strategy, dict] = {}
    for key in order:
        result = results[key]
        found = result.get("records") or _measured_instead(cfg, groups[key], info, device, present,
                                                           result.get("unsupported", ""))
        records.update(zip(groups[key], found))
    out = [records[s] for s in strategies]
    probed = None
    e2e = next((r for r in out if not r["local"] and r["flops"]), None) or next((r for r in out if r["flops"]), None)
    if probe and present and e2e is not None:
        probed = probe_rate(cfg, info, device, e2e["flops"] / max(1, cfg.batch_size))
    rate = probed["flops_per_s"] if probed else None
    for r in out:
        transfers = 2 * r["offloaded_bytes"] / HOST_LINK_BYTES_PER_S
        r["step_time_s"] = r["flops"] / rate + transfers if rate else None
        r["images_per_s"] = cfg.batch_size / r["step_time_s"] if r["step_time_s"] else None
        moved = (f", plus {transfers * 1000:.0f} ms to move its offloaded activations to the host and back at "
                 f"{HOST_LINK_BYTES_PER_S / 1e9:.0f} GB/s (assumed)" if r["offloaded_bytes"] else "")
        r["time_source"] = (f"{ESTIMATED}: its FLOPs at {rate / 1e9:.1f} GFLOP/s, the rate of a real E2E step at "
                            f"batch {probed['batch_size']} on {device}{moved}" if rate else
                            f"{ESTIMATED}: FLOPs only ({device} is not on this machine: no probe)" if not present
                            else f"{ESTIMATED}: FLOPs only (no probe)")
    return out, probed


__all__ = ["PROBE_FLOPS", "default_jobs", "estimate", "probe_rate", "target_device"]
