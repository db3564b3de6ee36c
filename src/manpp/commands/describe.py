"""``manpp describe``: the module table of a method on a backbone, measured on one synthetic batch."""

from __future__ import annotations

import dataclasses

import torch

from ..config import trainconfig as C
from ..config.resolve import resolve
from ..memory.measure import format_bytes, measure_step
from ..tasks import task_of
from ..train.build import build_model, data_info, resolve_device


def describe(cfg: C.TrainConfig) -> tuple[str, dict]:
    """Build the model for ``cfg`` and measure one step on random data of the dataset's shape."""
    cfg = resolve(cfg)
    info = data_info(cfg)
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, info, device)
    x, y = task_of(model.backbone).example_batch(cfg.batch_size, info, device)
    report = measure_step(model, x, y)
    names = model.backbone.unit_names
    aux_params = model.aux_parameter_count() + [0]
    rows = []
    for j in range(model.k):
        units = model.partition.units_of(j)
        params = sum(p.numel() for i in units for p in model.backbone.units[i].parameters())
        if j == model.k - 1:
            params += sum(p.numel() for p in model.backbone.head.parameters())
        span = names[units[0]] if len(units) == 1 else f"{names[units[0]]}..{names[units[-1]]}"
        if j == model.k - 1:
            span += " + head"
        rows.append({"module": j, "units": span, "n_units": len(units), "params": params,
                     "aux_params": aux_params[j], "activation_bytes": report.module_peak_bytes[j]})
    objective = f" ({model.objective})" if model.objective and model.objective != cfg.method else ""
    lines = [f"{cfg.model} / {cfg.method}{objective}"
             + f": {model.k} module{'s' if model.k > 1 else ''} [{model.partition.label}], input "
             f"{cfg.batch_size}x{info.in_channels}x{info.image_size}x{info.image_size} ({cfg.dataset} shape, "
             f"random data)", "",
             f"{'module':>6}  {'units':<28}{'#':>3}  {'params':>10}  {'aux params':>10}  {'activations':>12}"]
    for r in rows:
        lines.append(f"{r['module']:>6}  {r['units']:<28}{r['n_units']:>3}  {r['params']:>10,}  "
                     f"{r['aux_params']:>10,}  {format_bytes(r['activation_bytes']):>12}")
    total_params = sum(r["params"] for r in rows)
    total_aux = sum(r["aux_params"] for r in rows)
    lines.append(f"{'total':>6}  {'':<28}{sum(r['n_units'] for r in rows):>3}  {total_params:>10,}  "
                 f"{total_aux:>10,}  {format_bytes(report.peak_activation_bytes):>12} peak")
    if report.peak_allocated_bytes is not None:
        lines.append(f"CUDA allocator peak during the step: {format_bytes(report.peak_allocated_bytes)}")
    if model.objective_settings is not None:
        settings = ", ".join(f"{k}={v}" for k, v in dataclasses.asdict(model.objective_settings).items())
        lines.append(f"objective {model.objective}: objective_settings.{{{settings}}}" if settings else
                     f"objective {model.objective} (no settings)")
    data = {"modules": rows, "peak_activation_bytes": report.peak_activation_bytes,
            "peak_allocated_bytes": report.peak_allocated_bytes, "partition": model.partition.label,
            "objective": model.objective,
            "objective_settings": dataclasses.asdict(model.objective_settings) if model.objective_settings is not None
            else None}
    return "\n".join(lines), data
