"""``manpp plan``: every way to fit a training step in a memory budget, measured and ranked.

The strategies are those of :mod:`manpp.strategies`: E2E and the run's local method at K = 2, 4, 8, 16
(and the run's own K), each plain, with activation checkpointing (each unit a segment, or sqrt(n)
segments), with bf16 saved activations and with both (on CUDA also offloaded). Each is built and
measured for real: one training step's activation peak plus the parameters, buffers, gradients and
optimizer state of the backbone and auxiliary networks (its footprint), and its median step time over
interleaved rounds. The strategies that fit the budget come first, fastest first; each is marked exact
(E2E's gradients) or local, and a local one shows the accuracy it cost in the accuracy benchmark
(:mod:`manpp.accuracycost`) where one measured it. When an exact strategy fits and is the fastest, the
plan says so: then local learning buys nothing. The activation measure is the device-independent one,
so on a GPU keep a margin for the allocator's workspace and fragmentation.
"""

from __future__ import annotations

import dataclasses
import re

from . import config as C
from .accuracycost import accuracy_cost, describe_cost, load_result
from .build import resolve_device
from .errors import ManppError
from .memory import format_bytes
from .resolve import backbone_facts, data_info, resolve
from .strategies import KS, default_strategies, measure

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
    if value <= 0:
        raise ManppError(f"the memory budget must be positive, got {text!r}")
    return int(value * _UNITS[unit])


def _exact(row: dict) -> bool:
    return row["gradients"].startswith("exact")


def settings_of(row: dict) -> str:
    """The key=value settings that train the strategy of ``row``."""
    parts = [f"method={row['method']}"]
    if row["local"]:
        parts += [f"k={row['k']}", "split=memory"]
        if row.get("objective") and row["objective"] != row["method"]:  # MAN/MAN++ around another method's heads
            parts.append(f"objective={row['objective']}")
    if row["checkpointing"] != "off":
        parts.append(f"checkpointing={row['checkpointing']}")
    if row["saved"]:
        parts.append(f"saved_activations={row['saved']}")
    if row["offload"]:
        parts.append("offload_activations=true")
    return " ".join(parts)


def plan(cfg: C.TrainConfig, budget: int, *, max_k: int | None = None, rounds: int = 2, accuracy=None,
         verbose: bool = True) -> dict:
    """Measure every strategy of ``cfg``'s model and method (see the module docstring) against ``budget``
    bytes. ``accuracy``: a path to an accuracy benchmark result (default: the committed protocol's
    result where this checkout has it)."""
    if max_k is not None and max_k < 1:
        raise ManppError(f"--max-k must be at least 1, got {max_k}")
    if rounds < 1:
        raise ManppError(f"--rounds must be at least 1, got {rounds}")
    doc = load_result(accuracy)
    cfg = resolve(cfg)
    info = data_info(cfg)
    device = resolve_device(cfg.device)
    units = backbone_facts(cfg).units
    top = min(units, max_k or units)
    ks = sorted(k for k in {*KS, cfg.k or 1} if 2 <= k <= top)
    strategies = default_strategies(cfg.method, units, ks=ks, offload=device.type == "cuda")
    if verbose:
        print(f"measuring {len(strategies)} strategies ({rounds} timed round(s) each)", flush=True)
    records = measure(cfg, strategies, rounds=rounds, progress=verbose)
    default_objective = resolve(dataclasses.replace(cfg, objective=None)).objective
    rows = []
    for r in records:
        row = {key: r[key] for key in ("label", "method", "k", "checkpointing", "saved", "offload", "local",
                                       "gradients", "objective", "split", "peak_activation_bytes", "state_bytes",
                                       "total_bytes", "step_time_s")}
        row["accuracy_cost"] = (accuracy_cost(doc, r["method"], r["objective"], default_objective, r["k"],
                                              cfg.aux_lr_scale if r["method"] == cfg.method else 1.0)
                                if r["local"] else None)
        row["settings"] = settings_of(row)
        rows.append(row)
    return rank(rows, budget, {"model": cfg.model, "method": cfg.method, "objective": cfg.objective,
                               "batch_size": cfg.batch_size, "image_size": info.image_size, "device": str(device),
                               "units": units, "accuracy_source": None if doc is None else doc["path"]})


def rank(rows: list[dict], budget: int, facts: dict) -> dict:
    """The plan of measured strategies for ``budget`` bytes: those that fit, fastest first (the first is
    ``chosen``), then the others, smallest first; ``fastest_exact`` and the ``advice``."""
    rows = [dict(r, fits=r["total_bytes"] <= budget) for r in rows]
    fitting = sorted((r for r in rows if r["fits"]), key=lambda r: (r["step_time_s"], r["total_bytes"]))
    others = sorted((r for r in rows if not r["fits"]), key=lambda r: (r["total_bytes"], r["step_time_s"]))
    result = {**facts, "budget_bytes": budget, "strategies": fitting + others,
              "chosen": fitting[0] if fitting else None,
              "fastest_exact": next((r for r in fitting if _exact(r)), None)}
    result["advice"] = advice(result)
    return result


def advice(result: dict) -> str:
    """What the measurements say to do, in one or two sentences."""
    chosen, exact = result["chosen"], result["fastest_exact"]
    if chosen is None:
        best = result["strategies"][0]
        return (f"nothing fits {format_bytes(result['budget_bytes'])}: the smallest footprint measured is "
                f"{format_bytes(best['total_bytes'])} ({best['label']}); lower the batch size or the image size")
    if _exact(chosen):
        text = (f"{chosen['label']} fits and is the fastest strategy that does: use it. Its gradients are "
                f"E2E's, so local learning buys nothing here")
        local = next((r for r in result["strategies"] if r["fits"] and r["local"]), None)
        if local is not None:
            text += (f" (the fastest local one, {local['label']}, takes "
                     f"{local['step_time_s'] / chosen['step_time_s']:.2f}x its step time)")
        return text + "."
    cost = describe_cost(chosen["accuracy_cost"])
    if exact is None:
        smallest = min((r for r in result["strategies"] if _exact(r)), key=lambda r: r["total_bytes"], default=None)
        need = f" (the smallest, {smallest['label']}, needs {format_bytes(smallest['total_bytes'])})" if smallest else ""
        return (f"no strategy with E2E's gradients fits{need}; {chosen['label']} fits and is the fastest "
                f"that does. It trains with local gradients: {cost}.")
    return (f"{chosen['label']} is the fastest that fits, {exact['step_time_s'] / chosen['step_time_s']:.2f}x "
            f"the speed of the fastest exact strategy that fits ({exact['label']}). It trains with local "
            f"gradients: {cost}; {exact['label']} keeps E2E's.")


def format_plan(result: dict) -> str:
    head = (f"{result['model']} / {result['method']}, batch {result['batch_size']}, {result['image_size']} px, "
            f"{result['device']}, budget {format_bytes(result['budget_bytes'])}")
    lines = [head, f"{'':3}{'strategy':<34} {'gradients':<20} {'activations':>11} {'total':>11} {'step':>9}  "
                   "accuracy cost"]
    for r in result["strategies"]:
        cost = "" if not r["local"] else describe_cost(r["accuracy_cost"]).removeprefix("accuracy ")
        lines.append(f"{'ok' if r['fits'] else '--':<3}{r['label']:<34} {r['gradients']:<20} "
                     f"{format_bytes(r['peak_activation_bytes']):>11} {format_bytes(r['total_bytes']):>11} "
                     f"{1000 * r['step_time_s']:>7.0f}ms  {cost}")
    lines.append("(ok: fits the budget; fitting strategies fastest first, then the others smallest first; total = "
                 "activations + parameters, gradients, optimizer state)")
    lines.append(result["advice"])
    if result["chosen"] is not None:
        lines.append(f"train it with: {result['chosen']['settings']}")
    return "\n".join(lines)
