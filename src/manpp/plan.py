"""``manpp plan``: the smallest K (and its split) whose training step fits a memory budget.

Per-unit activation bytes come from one forward pass of the plain backbone under the activation
tracker (:mod:`manpp.memory`); ``balanced_ends`` cuts the units into K contiguous modules whose
largest activation sum is as small as possible (``split="memory"``). For each K from 1 up, the
planner builds the local model with that split and measures one real training step; the
footprint it compares with the budget is the measured activation peak plus the memory of the
parameters, their gradients and the optimizer state (SGD momentum: 3 copies; AdamW: 4) of the
backbone and auxiliary networks. The activation measure is the device-independent one, so the
plan holds for a GPU up to the allocator's workspace and fragmentation (keep a margin).
"""

from __future__ import annotations

import dataclasses
import re
import torch

from . import config as C
from .build import build_model, data_info, resolve_device
from .errors import ManppError
from .memory import format_bytes, measure_step
from .models import build_backbone
from .partition import balanced_ends, unit_activation_bytes
from .resolve import resolve_switches
from .tasks import task_of

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


@dataclasses.dataclass
class PlanRow:
    k: int
    split: list[str]
    peak_activation_bytes: int
    state_bytes: int  # parameters + gradients + optimizer state (backbone and auxiliary networks)

    @property
    def total_bytes(self) -> int:
        return self.peak_activation_bytes + self.state_bytes


def plan(cfg: C.TrainConfig, budget: int, *, max_k: int | None = None, verbose: bool = True) -> dict:
    """Measure K = 1, 2, ... with memory-balanced splits until one fits ``budget`` bytes."""
    cfg = resolve_switches(cfg)  # every K below is resolved as it is built (its objective follows its method)
    info = data_info(cfg)
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    backbone = build_backbone(cfg.model, num_classes=info.num_classes, in_channels=info.in_channels,
                              image_size=info.image_size).to(device)
    per_unit = unit_activation_bytes(backbone, cfg.batch_size, info.in_channels, info.image_size, device)
    n = len(per_unit)
    copies = 4 if cfg.optimizer == "adamw" else 3
    x, y = task_of(backbone).example_batch(cfg.batch_size, info, device)
    rows, chosen = [], None
    for k in range(1, min(n, max_k or n) + 1):
        method = "e2e" if k == 1 else cfg.method
        ends = balanced_ends(per_unit, k) if k > 1 else []
        run = dataclasses.replace(cfg, method=method, k=k, split=[backbone.unit_names[e] for e in ends] or "even")
        model = build_model(run, info, device)
        report = measure_step(model, x, y)
        state = sum(p.numel() * p.element_size() for p in model.parameters_to_optimize()) * copies
        row = PlanRow(k, model.partition.describe(model.backbone.unit_names), report.peak_activation_bytes, state)
        rows.append(row)
        if verbose:
            fits = "fits" if row.total_bytes <= budget else "too big"
            print(f"K={k:>2} ({method}): activations {format_bytes(row.peak_activation_bytes)}, weights/grads/"
                  f"optimizer {format_bytes(state)}, total {format_bytes(row.total_bytes)}: {fits}", flush=True)
        if row.total_bytes <= budget:
            chosen = row
            break
    return {"model": cfg.model, "method": cfg.method, "batch_size": cfg.batch_size, "image_size": info.image_size,
            "budget_bytes": budget, "unit_names": list(backbone.unit_names), "unit_activation_bytes": per_unit,
            "rows": [dict(dataclasses.asdict(r), total_bytes=r.total_bytes) for r in rows],
            "chosen": None if chosen is None else dict(dataclasses.asdict(chosen), total_bytes=chosen.total_bytes)}


def format_plan(result: dict) -> str:
    budget = format_bytes(result["budget_bytes"])
    head = (f"{result['model']} / {result['method']}, batch {result['batch_size']}, "
            f"{result['image_size']} px, budget {budget}")
    chosen = result["chosen"]
    if chosen is None:
        best = min(result["rows"], key=lambda r: r["total_bytes"])
        return (f"{head}\nno split fits: the smallest footprint measured is {format_bytes(best['total_bytes'])} "
                f"at K={best['k']}; lower the batch size or the image size")
    lines = [head, f"smallest K that fits: K={chosen['k']}, peak {format_bytes(chosen['total_bytes'])} "
             f"(activations {format_bytes(chosen['peak_activation_bytes'])}, weights/grads/optimizer "
             f"{format_bytes(chosen['state_bytes'])})", "modules: " + ", ".join(chosen["split"])]
    if chosen["k"] > 1:
        lines.append("train it with: split=" + ",".join(s.split("..")[-1] for s in chosen["split"][:-1]))
    return "\n".join(lines)
