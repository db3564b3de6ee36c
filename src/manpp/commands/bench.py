"""``manpp bench``: time training steps and measure memory on synthetic data of a dataset's shape.

Several methods are run in one process, interleaved step by step, so that their ratios to the
first method are measured under the same machine conditions. A method may carry its own settings:
``manpp@saved_activations=bf16`` (several joined by ``+``).
"""

from __future__ import annotations

import dataclasses
import statistics

import torch

from ..base.registry import METHODS
from ..config import trainconfig as C
from ..config.validate import check_config
from ..memory.measure import format_bytes, measure_step
from ..train.build import build_model, data_info, resolve_device
from .strategies import example_inputs, interleaved_times, timed


def bench(cfg: C.TrainConfig, methods: list[str], *, steps: int = 20, warmup: int = 3, prepare=None) -> list[dict]:
    """One record per method: median step time, images/s, activation and allocator peaks, sizes.

    ``prepare(model)``, if given, is applied to every model once it is built (benchmarks use it to
    switch an implementation detail, e.g. the InfoPro decoders' plain resize-then-conv).
    """
    info = data_info(cfg)
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    runs = []
    for label in methods:
        name, _, variant = label.partition("@")  # 'manpp@saved_activations=bf16': one setting changed
        method, _, objective = name.partition(":")  # 'manpp:dgl' = MAN++ on the DGL objective
        run_cfg = dataclasses.replace(cfg, method=method, k=None if method == "e2e" else cfg.k,
                                      objective=objective or cfg.objective)
        if variant:
            run_cfg = C.apply(run_cfg, C.parse_overrides(variant.split("+")), source=f"--methods '{label}'")
            check_config(run_cfg)
        model = build_model(run_cfg, info, device)
        if prepare is not None:
            prepare(model)
        opt = torch.optim.SGD(model.parameters_to_optimize(), lr=1e-3, momentum=0.9, nesterov=True)
        runs.append({"method": method, "label": label, "objective": run_cfg.objective, "model": model, "opt": opt,
                     "saved": run_cfg.saved_activations})
    x, y = example_inputs(cfg, runs[0]["model"], info, device)

    def step(run) -> float:
        def one() -> None:
            run["opt"].zero_grad(set_to_none=True)
            run["model"].train_step(x, y)
            run["opt"].step()

        return timed(device, one)

    for run in runs:
        for _ in range(warmup):
            step(run)
        run["memory"] = measure_step(run["model"], x, y)
        run["recompute"] = [j for j, a in enumerate(run["model"].aux) if getattr(a, "recompute_ema", None) is True]
    for run, times in zip(runs, interleaved_times(runs, step, rounds=steps, warmup=0)):  # the same machine state
        run["times"] = times
    records = []
    for run in runs:
        model, mem = run["model"], run["memory"]
        median = statistics.median(run["times"])
        records.append({
            "model": cfg.model, "method": run["method"], "label": run["label"],
            "objective": model.objective if METHODS.get(run["method"]).takes_objective else None,
            "modules": model.k, "partition": model.partition.label, "dataset_shape": cfg.dataset,
            "batch_size": cfg.batch_size, "device": str(device), "steps": steps,
            "channels_last": cfg.channels_last, "amp": cfg.amp, "saved_activations": run["saved"], "threads": torch.get_num_threads(),
            "step_time_s": median, "times_s": list(run["times"]), "images_per_s": cfg.batch_size / median,
            "peak_activation_bytes": mem.peak_activation_bytes, "peak_allocated_bytes": mem.peak_allocated_bytes,
            "params": sum(p.numel() for p in model.backbone.parameters()),
            "aux_params": sum(model.aux_parameter_count()), "torch_version": torch.__version__,
            "ema_recomputed_in_modules": run["recompute"] if METHODS.get(run["method"]).momentum else None,
        })
    base = records[0]
    for r in records:
        r["step_time_ratio"] = r["step_time_s"] / base["step_time_s"]
        r["activation_ratio"] = r["peak_activation_bytes"] / base["peak_activation_bytes"]
    return records


def format_bench(records: list[dict]) -> str:
    width = max(14, max(len(r["label"]) for r in records) + 2)
    lines = [f"{records[0]['model']}, batch {records[0]['batch_size']}, {records[0]['dataset_shape']} shape, "
             f"device {records[0]['device']}, median of {records[0]['steps']} steps",
             "",
             f"{'method':<{width}}{'modules':>8}{'step time':>12}{'img/s':>9}{'activations':>14}{'time x':>8}{'mem x':>7}"]
    for r in records:
        lines.append(f"{r['label']:<{width}}{r['modules']:>8}{r['step_time_s'] * 1000:>10.1f}ms{r['images_per_s']:>9.0f}"
                     f"{format_bytes(r['peak_activation_bytes']):>14}{r['step_time_ratio']:>8.2f}"
                     f"{r['activation_ratio']:>7.2f}")
    if records[0]["peak_allocated_bytes"] is not None:
        lines.append("CUDA allocator peak: " + ", ".join(
            f"{r['label']} {format_bytes(r['peak_allocated_bytes'])}" for r in records))
    return "\n".join(lines)
