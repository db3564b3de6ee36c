"""``manpp plan``: every way to fit a training step in a memory budget, estimated (or measured) and ranked.

The strategies are those of :mod:`manpp.commands.strategies`: E2E and the run's local method at K = 2, 4, 8, 16
(and the run's own K), each plain, with activation checkpointing (each unit a segment, or sqrt(n)
segments), with bf16 saved activations and with both (on CUDA also offloaded). By default each is
estimated in seconds (:mod:`manpp.commands.forecast`): its footprint (one training step's activation peak plus the
parameters, buffers, gradients and optimizer state of the backbone and auxiliary networks) from the step
run on fake tensors, its step time from its FLOPs at the rate of one short real probe of the model on the
device. The device need not be this machine's: ``--device cuda`` on a laptop plans for a GPU (memory
estimated, time as FLOPs). ``--measure`` builds and times every strategy for real instead (median of
interleaved rounds). Every figure says which it is.

The strategies that fit the budget come first, fastest first; each is marked exact (E2E's gradients) or
local, and a local one shows the accuracy it cost in the accuracy benchmark (:mod:`manpp.commands.accuracycost`)
where one measured it. When an exact strategy fits and is the fastest, the plan says so: then local
learning buys nothing. The activation figure is the device-independent one (what autograd holds), so on a
GPU keep a margin for the allocator's workspace and fragmentation (docs/memory.md).
"""

from __future__ import annotations

import dataclasses
import math
import re

from ..base.errors import ManppError
from ..config import trainconfig as C
from ..config.resolve import backbone_facts, data_info, resolve
from ..memory.measure import format_bytes
from .accuracycost import accuracy_cost, describe_cost, load_result
from .strategies import ESTIMATED, KS, default_strategies, measure

_UNITS = {"": 1, "b": 1, "k": 2**10, "kb": 2**10, "kib": 2**10, "m": 2**20, "mb": 2**20, "mib": 2**20,
          "g": 2**30, "gb": 2**30, "gib": 2**30, "t": 2**40, "tb": 2**40, "tib": 2**40}


def parse_bytes(text: str | int | float) -> int:
    """``'8GB'``, ``'512 MiB'``, ``1e9`` -> bytes (binary prefixes: 1 GB = 2**30 bytes, as GPU specs)."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        value, unit = float(text), ""
    else:
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-zA-Z]*)\s*", str(text))
        if not match or match.group(2).lower() not in _UNITS:
            raise ManppError(f"cannot read the memory size {text!r}: give a number with a unit such as 8GB, "
                             f"512MiB or 24G")
        value, unit = float(match.group(1)), match.group(2).lower()
    if not math.isfinite(value * _UNITS[unit]) or value * _UNITS[unit] >= 2**80:
        raise ManppError(f"the memory budget {text!r} is not a size a machine has: give one such as 16GB")
    if value <= 0:
        raise ManppError(f"the memory budget must be positive, got {text!r}")
    return int(value * _UNITS[unit])


def _exact(row: dict) -> bool:
    return row["gradients"].startswith("exact")


def settings_of(row: dict) -> str:
    """The key=value settings that train the strategy of ``row``."""
    parts = [f"method={row['method']}"]
    if row["local"]:
        parts += [f"k={row['k']}", f"split={row.get('split_name') or 'memory'}"]
        if row.get("objective") and row["objective"] != row["method"]:  # MAN/MAN++ around another method's heads
            parts.append(f"objective={row['objective']}")
    if row["checkpointing"] != "off":
        parts.append(f"checkpointing={row['checkpointing']}")
    if row["saved"]:
        parts.append(f"saved_activations={row['saved']}")
    if row["offload"]:
        parts.append("offload_activations=true")
    if row.get("early_step"):
        parts.append("step_in_backward=true")
    return " ".join(parts)


def plan(cfg: C.TrainConfig, budget: int | None, *, max_k: int | None = None, rounds: int = 2, accuracy=None,
         verbose: bool = True, measured: bool = False, jobs: int | None = None) -> dict:
    """Every strategy of ``cfg``'s model and method (see the module docstring) against ``budget`` bytes
    (None: the memory of ``cfg.device``, a GPU here), estimated, or with ``measured`` run and timed for real
    (``rounds`` interleaved rounds). ``accuracy``: a path to an accuracy benchmark result (default: the
    committed protocol's result where this checkout has it)."""
    from .forecast import estimate, target_device

    if max_k is not None and max_k < 1:
        raise ManppError(f"--max-k must be at least 1, got {max_k}")
    if rounds < 1:
        raise ManppError(f"--rounds must be at least 1, got {rounds}")
    if jobs is not None and jobs < 1:
        raise ManppError(f"--jobs must be at least 1, got {jobs}")
    doc = load_result(accuracy)
    cfg = resolve(cfg)
    info = data_info(cfg)
    device, present = target_device(cfg.device)
    if measured and not present:
        raise ManppError(f"--measure runs every strategy on {device}, which this machine does not have; without "
                         f"--measure the plan is estimated for it")
    budget = budget if budget is not None else device_memory(device, present)
    units = backbone_facts(cfg).units
    top = min(units, max_k or units)
    ks = sorted(k for k in {*KS, cfg.k or 1} if 2 <= k <= top)
    # offloading costs transfers, not FLOPs: it is ranked only where a probe gives seconds to add them to
    early = cfg.amp != "fp16" and cfg.grad_clip is None  # what step_in_backward cannot combine with (earlystep)
    strategies = default_strategies(cfg.method, units, ks=ks, offload=device.type == "cuda" and present,
                                    early_step=early)
    probe = None
    if measured:
        if verbose:
            print(f"measuring {len(strategies)} strategies ({rounds} timed round(s) each)", flush=True)
        records = measure(cfg, strategies, rounds=rounds, progress=verbose)
    else:
        if verbose:
            print(f"estimating {len(strategies)} strategies on fake tensors (--measure runs them for real)",
                  flush=True)
        records, probe = estimate(cfg, strategies, progress=verbose, jobs=jobs)
    default_objective = resolve(dataclasses.replace(cfg, objective=None)).objective
    family = backbone_facts(cfg).family
    rows = []
    for r in records:
        row = {key: r[key] for key in ("label", "method", "k", "checkpointing", "saved", "offload", "early_step",
                                       "local", "gradients", "objective", "split", "split_name",
                                       "peak_activation_bytes",
                                       "step_peak_bytes", "state_bytes", "total_bytes", "step_time_s", "flops",
                                       "memory_source", "time_source", "times_s")}
        row["accuracy_cost"] = (accuracy_cost(doc, r["method"], r["objective"], default_objective, r["k"],
                                              cfg.aux_lr_scale if r["method"] == cfg.method else 1.0, family)
                                if r["local"] else None)
        row["accuracy_how"] = None if not r["local"] or row["accuracy_cost"] else measure_command(cfg, r)
        row["settings"] = settings_of(row)
        rows.append(row)
    return rank(rows, budget, {"model": cfg.model, "method": cfg.method, "objective": cfg.objective,
                               "batch_size": cfg.batch_size, "image_size": info.image_size, "device": str(device),
                               "device_here": present, "units": units, "probe": probe,
                               "accuracy_source": None if doc is None else doc["path"]})


def measure_command(cfg: C.TrainConfig, row: dict) -> str:
    """The accuracy benchmark's command that measures ``row``'s method against E2E on this model and data."""
    method = row["method"] + (f":{row['objective']}" if row.get("objective") and row["objective"] != row["method"]
                              else "")
    data = f" --data-dir {cfg.data_dir}" if cfg.data_dir else ""
    return (f"python benchmarks/accuracy.py --model {cfg.model} --dataset {cfg.dataset}{data} --ks {row['k']} "
            f"--methods e2e,{method} --name my_accuracy, then --accuracy benchmarks/results/my_accuracy.json")


def device_memory(device, present: bool) -> int:
    """The total memory of a GPU this machine has (the budget when none is given)."""
    import torch

    if device.type == "cuda" and present:
        return int(torch.cuda.get_device_properties(device).total_memory)
    raise ManppError(f"give --budget (e.g. --budget 16GB): without it the plan takes the memory of the GPU it plans "
                     f"for, and {device} is not on this machine to read it from" if device.type == "cuda" else
                     "give --budget (e.g. --budget 16GB): a plan for the CPU has no device memory to default to")


def _time(row: dict) -> float:
    """What ranks by speed: the step time, or (an estimate with no probe) the FLOPs."""
    return row["step_time_s"] if row["step_time_s"] is not None else float(row.get("flops") or 0)


def _speed_ratio(slow: dict, fast: dict) -> str:
    return f"{_time(slow) / _time(fast):.2f}x" if _time(fast) else "?"


ESTIMATE_TIE = 0.10  # estimated times closer than this (relative) are a tie: the FLOP model is not finer


def tolerance(a: dict, b: dict) -> float:
    """How far apart the times of ``a`` and ``b`` may be and still be a tie: the larger spread of their
    measured rounds (max - min), or for an estimate ESTIMATE_TIE of the faster one's."""
    spreads = [max(r["times_s"]) - min(r["times_s"]) for r in (a, b) if r.get("times_s") and len(r["times_s"]) > 1]
    if spreads and not any(str(r.get("time_source", "")).startswith(ESTIMATED) for r in (a, b)):
        return max(spreads)
    return ESTIMATE_TIE * min(_time(a), _time(b))


def rank(rows: list[dict], budget: int, facts: dict) -> dict:
    """The plan of strategies for ``budget`` bytes: those that fit, fastest first, then the others, smallest
    first. ``chosen`` is the smallest of the fitting ones tied with the fastest (times within
    :func:`tolerance`: a difference smaller than what measuring or estimating can tell apart decides
    nothing); ``fastest_exact`` likewise among the exact ones; then the ``advice``."""
    rows = [dict(r, fits=r["total_bytes"] <= budget) for r in rows]
    fitting = sorted((r for r in rows if r["fits"]), key=lambda r: (_time(r), r["total_bytes"]))
    others = sorted((r for r in rows if not r["fits"]), key=lambda r: (r["total_bytes"], _time(r)))

    def best(candidates: list[dict]) -> tuple[dict | None, list[dict]]:
        if not candidates:
            return None, []
        tied = [r for r in candidates if _time(r) - _time(candidates[0]) <= tolerance(candidates[0], r)]
        return min(tied, key=lambda r: (r["total_bytes"], _time(r))), tied

    chosen, tied = best(fitting)
    exact, _ = best([r for r in fitting if _exact(r)])
    result = {**facts, "budget_bytes": budget, "strategies": fitting + others, "chosen": chosen,
              "tied": [r["label"] for r in tied if r is not chosen], "fastest_exact": exact}
    result["advice"] = advice(result)
    return result


def advice(result: dict) -> str:
    """What the measurements say to do, in one or two sentences."""
    chosen, exact = result["chosen"], result["fastest_exact"]
    if chosen is None:
        return _nothing_fits(result)
    tie = (f" ({', '.join(result['tied'][:3])} {'is' if len(result['tied']) == 1 else 'are'} as fast within what can "
           f"be told apart, and larger)" if result.get("tied") else "")
    if _exact(chosen):
        text = (f"{chosen['label']} fits and is the fastest strategy that does{tie}: use it. Its gradients are "
                f"E2E's, so local learning buys nothing here")
        local = next((r for r in result["strategies"] if r["fits"] and r["local"]), None)
        if local is not None:
            text += (f" (the fastest local one, {local['label']}, takes "
                     f"{_speed_ratio(local, chosen)} its step time{_estimated_time(local, chosen)})")
        return text + "."
    cost = describe_cost(chosen["accuracy_cost"], chosen.get("accuracy_how"))
    if exact is None:
        smallest = min((r for r in result["strategies"] if _exact(r)), key=lambda r: r["total_bytes"], default=None)
        need = f" (the smallest, {smallest['label']}, needs {format_bytes(smallest['total_bytes'])})" if smallest else ""
        return (f"no strategy with E2E's gradients fits{need}; {chosen['label']} fits and is the fastest "
                f"that does{tie}. It trains with local gradients: {cost}.")
    if _time(exact) - _time(chosen) <= tolerance(exact, chosen):  # no faster than the exact one, as far as known
        return (f"{exact['label']} fits and is as fast as the fastest local strategy ({chosen['label']}) within what "
                f"can be told apart: use it. Its gradients are E2E's, so local learning buys nothing here.")
    return (f"{chosen['label']} is the fastest that fits{tie}, {_speed_ratio(exact, chosen)} the speed of the fastest "
            f"exact strategy that fits ({exact['label']}){_estimated_time(exact, chosen)}. It trains with local "
            f"gradients: {cost}; {exact['label']} keeps E2E's.")


def _nothing_fits(result: dict) -> str:
    """Nothing fits: the smallest footprint, and what dominates it (what would have to shrink)."""
    budget = result["budget_bytes"]
    best = min(result["strategies"], key=lambda r: r["total_bytes"])
    text = (f"nothing fits {format_bytes(budget)}: the smallest footprint {_how(best)} is "
            f"{format_bytes(best['total_bytes'])} ({best['label']}), ")
    if best["state_bytes"] >= budget:
        return text + (f"and its parameters and optimizer state alone take {format_bytes(best['state_bytes'])}: a "
                       f"smaller batch cannot help; train a smaller model, fewer or lighter auxiliary networks "
                       f"(a lower K, DGL's heads), or with SGD rather than AdamW (one state copy, not two)")
    step = best.get("step_peak_bytes") or best["peak_activation_bytes"]
    if best["state_bytes"] > step:
        return text + (f"mostly parameters and optimizer state ({format_bytes(best['state_bytes'])}) against "
                       f"{format_bytes(step)} of activations and gradients: a smaller model or fewer auxiliary "
                       f"networks saves more than a smaller batch")
    return text + (f"mostly activations and gradients ({format_bytes(step)}, against "
                   f"{format_bytes(best['state_bytes'])} of state): lower the batch size or the image size")


def _how(row: dict) -> str:
    return "estimated" if str(row.get("memory_source", "")).startswith(ESTIMATED) else "measured"


def _estimated_time(*rows: dict) -> str:
    return ", estimated from FLOPs" if any(str(r.get("time_source", "")).startswith(ESTIMATED) for r in rows) else ""


def _mark(row: dict, key: str) -> str:
    """``~`` before an estimated figure; nothing before a measured one."""
    return "~" if str(row.get(key) or "").startswith(ESTIMATED) else ""


def _step_cell(row: dict) -> str:
    if row["step_time_s"] is not None:
        return f"{_mark(row, 'time_source')}{1000 * row['step_time_s']:.0f}ms"
    return f"~{row['flops'] / 1e12:.2f}TF" if row.get("flops") else "-"


def format_plan(result: dict) -> str:
    rows = result["strategies"]
    head = (f"{result['model']} / {result['method']}, batch {result['batch_size']}, {result['image_size']} px, "
            f"{result['device']}{'' if result.get('device_here', True) else ' (not on this machine)'}, budget "
            f"{format_bytes(result['budget_bytes'])}")
    lines = [head, f"{'':3}{'strategy':<34} {'gradients':<20} {'activations':>12} {'total':>12} {'step':>10}  "
                   "accuracy cost"]
    for r in rows:
        cost = "" if not r["local"] else describe_cost(r["accuracy_cost"]).removeprefix("accuracy ")
        memory = _mark(r, "memory_source")
        lines.append(f"{'ok' if r['fits'] else '--':<3}{r['label']:<34} {r['gradients']:<20} "
                     f"{memory + format_bytes(r['peak_activation_bytes']):>12} "
                     f"{memory + format_bytes(r['total_bytes']):>12} {_step_cell(r):>10}  {cost}")
    lines.append("(ok: fits the budget; fitting strategies fastest first, then the others smallest first; total = "
                 "the step's peak of activations and gradients + parameters, buffers, optimizer state; early step: "
                 "step_in_backward, each gradient stepped and freed as soon as it is final)")
    lines += _sources(result)
    lines.append(result["advice"])
    if result["chosen"] is not None:
        lines.append(f"train it with: {result['chosen']['settings']}")
    return "\n".join(lines)


def _sources(result: dict) -> list[str]:
    """Where the figures come from, in words (each figure estimated carries a ``~``)."""
    rows = result["strategies"]
    out = []
    if any(_mark(r, "memory_source") for r in rows):
        cpu = any("CPU's operators" in str(r.get("memory_source")) for r in rows)
        out.append("~ memory: estimated, the training step run on fake tensors (no arithmetic); the same accounting "
                   "as a measured step, held within 2% of it by the tests"
                   + (f"; with the CPU's operators, as {result['device']} is not on this machine" if cpu else ""))
    for r in rows:
        if not _mark(r, "memory_source") and str(r.get("memory_source", "")).startswith("measured:"):
            out.append(f"memory of {r['label']}: {r['memory_source']}")
            break
    probe = result.get("probe")
    if probe and any(_mark(r, "time_source") for r in rows):
        out.append(f"~ step: estimated, the step's FLOPs (recomputation included) at {probe['flops_per_s'] / 1e9:.1f} "
                   f"GFLOP/s, the rate of a real E2E step at batch {probe['batch_size']} on {result['device']}; "
                   f"memory-bound work and many small modules cost more than this says. manpp plan --measure times "
                   f"them for real")
    if any(r["step_time_s"] is None for r in rows):
        out.append(f"~ step in TF: estimated FLOPs of one step (10^12), recomputation included; {result['device']} "
                   f"is not on this machine, so nothing was timed and the FLOPs rank the strategies (offloading "
                   f"to host memory, whose cost is transfers rather than FLOPs, is left out)")
    return out
