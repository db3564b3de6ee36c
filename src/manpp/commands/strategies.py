"""Ways to fit a training step in memory, measured side by side: the memory/time frontier.

A :class:`Strategy` is one way to train: E2E or a local method at some K, with or without activation
checkpointing (:mod:`manpp.memory.recompute`), bf16 saved activations and offload (:mod:`manpp.memory.saved`).
:func:`measure` builds one model per (method, K), local ones on the memory-balanced split, and applies
the other settings to it strategy by strategy, so every strategy starts from the same weights. For each
it measures one training step's activation peak (the tracker of :mod:`manpp.memory`; on CUDA also the
allocator's peak), the state it holds (:func:`manpp.memory.state_bytes`: parameters, buffers, gradients,
optimizer state) and the median step time, timing the strategies in interleaved rounds so that every
ratio comes from the same machine conditions. ``manpp plan`` and ``benchmarks/frontier.py`` read it.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from dataclasses import dataclass
from typing import Iterable, Sequence

import torch

from ..base.registry import METHODS
from ..config import trainconfig as C
from ..core.momentum import MomentumAux, settle_recompute
from ..memory.earlystep import StepInBackward
from ..memory.measure import MemoryReport, measure_step, state_bytes
from ..memory.saved import saved_dtype
from ..tasks import task_of
from ..train.build import build_model, data_info, memory_format, resolve_device

KS = (2, 4, 8, 16)  # the K a local method is measured at (capped at the backbone's units)
MEASURED, ESTIMATED = "measured", "estimated"  # every record says which its memory and its time are
CHECKPOINTING_VARIANTS = ("off", "units", "sqrt")
SAVED_VARIANTS = (None, "bf16")


@dataclass(frozen=True)
class Strategy:
    method: str  # 'e2e' or a local method
    k: int = 1
    checkpointing: str = "off"
    saved: str | None = None  # saved_activations
    offload: bool = False  # offload_activations
    early_step: bool = False  # step_in_backward: each gradient stepped and freed as soon as it is final

    @property
    def local(self) -> bool:
        return self.method != "e2e"

    @property
    def label(self) -> str:
        parts = ["E2E" if not self.local else f"{self.method} K={self.k}"]
        if self.checkpointing != "off":
            parts.append(f"ckpt({self.checkpointing})")
        if self.saved:
            parts.append(self.saved)
        if self.offload:
            parts.append("offload")
        if self.early_step:
            parts.append("early step")
        return " + ".join(parts)

    @property
    def gradients(self) -> str:
        """``exact`` (E2E's gradients), ``local`` (each module's own loss), either rounded by bf16 storage."""
        kind = "local" if self.local else "exact"
        return f"{kind}, bf16-rounded" if self.saved else kind

    def overrides(self) -> dict:
        """The config settings that train this strategy."""
        values = {"method": self.method, "k": self.k, "checkpointing": self.checkpointing,
                  "saved_activations": self.saved, "offload_activations": self.offload,
                  "step_in_backward": self.early_step}
        return values if self.local else {**values, "k": None}


def default_strategies(method: str, units: int, *, ks: Iterable[int] = KS, offload: bool = False,
                       early_step: bool = True) -> list[Strategy]:
    """E2E and ``method`` at every K of ``ks`` that the units allow, each plain, checkpointed (each
    unit, or sqrt(n) segments), with bf16 saved activations and with both; offloaded ones with ``offload``;
    and with ``early_step`` each of them again with the optimizer stepping inside the backward passes."""
    variants = [(c, s) for s in SAVED_VARIANTS for c in CHECKPOINTING_VARIANTS]
    out = [Strategy("e2e", 1, c, s) for c, s in variants]
    if offload:
        out += [Strategy("e2e", 1, "off", None, True), Strategy("e2e", 1, "units", None, True)]
    if METHODS.get(method).local:
        for k in sorted({k for k in ks if 2 <= k <= units}):
            out += [Strategy(method, k, c, s) for c, s in variants]
            if offload:
                out.append(Strategy(method, k, "units", None, True))
    if early_step:
        out += [dataclasses.replace(s, early_step=True) for s in out]
    return out


def config_of(cfg: C.TrainConfig, method: str, k: int) -> C.TrainConfig:
    """``cfg`` for ``method`` at K; a local method on the memory-balanced split (or the paper's, when ``cfg``
    asks for it), with the objective and its settings of ``cfg`` where the method takes an objective."""
    spec = METHODS.get(method)
    if not spec.local:
        return dataclasses.replace(cfg, method=method, k=None, split="even", objective=None, objective_settings={})
    same = spec.takes_objective
    return dataclasses.replace(cfg, method=method, k=k, split="paper" if cfg.split == "paper" else "memory",
                               objective=cfg.objective if same else None,
                               objective_settings=dict(cfg.objective_settings) if same else {})


def apply_strategy(model, strategy: Strategy) -> None:
    """Set ``strategy``'s checkpointing and saved-activation storage on ``model``."""
    model.checkpointing = strategy.checkpointing
    model.saved_dtype = saved_dtype(strategy.saved)
    model.offload = strategy.offload


def synchronize(device: torch.device) -> None:
    """Wait for the device (a step timed on CUDA is timed when it ends, not when it was queued)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(device: torch.device, fn) -> float:
    """Seconds that ``fn()`` takes on ``device``, from an idle device to the end of its work."""
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def interleaved_times(runs: Sequence, step, *, rounds: int, warmup: int, tick=None) -> list[list[float]]:
    """Each run's step times: ``warmup`` untimed steps of each run, then ``rounds`` rounds of one step per run
    in turn, so that every run sees the same machine conditions. ``step(run)`` returns its timed seconds;
    ``tick()`` is called after each timed step (a progress bar)."""
    for run in runs:
        for _ in range(warmup):
            step(run)
    times: list[list[float]] = [[] for _ in runs]
    for _ in range(rounds):
        for i, run in enumerate(runs):
            times[i].append(step(run))
            if tick is not None:
                tick()
    return times


def example_inputs(cfg: C.TrainConfig, model, info, device: torch.device) -> tuple:
    """The synthetic batch of ``cfg``'s dataset shape and batch size that steps are timed and measured on,
    in ``cfg``'s memory format."""
    x, y = task_of(model.backbone).example_batch(cfg.batch_size, info, device)
    return x.contiguous(memory_format=memory_format(cfg)), y


def build_models(cfg: C.TrainConfig, strategies: Sequence[Strategy], info, device) -> dict[tuple[str, int], dict]:
    """One model per (method, K) of ``strategies``, each from the seed of ``cfg`` (the same backbone weights).
    On the meta device (for an estimate: shapes only, nothing initialised) where the model builds there,
    else on the CPU."""
    models: dict[tuple[str, int], dict] = {}
    for s in strategies:
        key = (s.method, s.k)
        if key not in models:
            torch.manual_seed(cfg.seed)
            run = dataclasses.replace(config_of(cfg, s.method, s.k), compile=False)
            models[key] = {"model": _build_on(run, info, device), "cfg": run}
    return models


def _build_on(cfg: C.TrainConfig, info, device):
    if torch.device(device).type != "meta":
        return build_model(cfg, info, device)
    try:
        with torch.device("meta"):
            return build_model(cfg, info, "meta")
    except (RuntimeError, NotImplementedError):  # a builder that reads values: built for real
        return build_model(cfg, info, "cpu")


def settle(model, strategy: Strategy, x, y, auto: bool) -> list | None:
    """Apply ``strategy`` to ``model`` and settle its EMA recomputation as a run of it would (``auto``);
    returns each momentum auxiliary network's choice (None: the method has none)."""
    apply_strategy(model, strategy)
    if model.first_step_hooks:
        model.run_first_step_hooks(x, y)
    momentum = [a for a in model.aux if isinstance(a, MomentumAux)]
    if momentum and auto:
        for a in momentum:
            a.recompute_ema = "auto"
        settle_recompute(model, x, y)
    return [a.recompute_ema for a in momentum] if momentum else None


def measure(cfg: C.TrainConfig, strategies: Sequence[Strategy], *, rounds: int = 3, warmup: int = 1,
            progress: bool = True) -> list[dict]:
    """One record per strategy (see the module docstring), in the order given: memory and time measured
    by running each strategy's step for real (``rounds=0``: memory only)."""
    from tqdm.auto import tqdm

    info = data_info(cfg)
    device = resolve_device(cfg.device)
    models = build_models(cfg, strategies, info, device)
    for entry in models.values():
        entry["opt"] = torch.optim.SGD(entry["model"].parameters_to_optimize(), lr=1e-4, momentum=0.9)
    x, y = example_inputs(cfg, next(iter(models.values()))["model"], info, device)
    auto = cfg.recompute_ema == "auto"
    runs = []
    bar = tqdm(total=len(strategies) * (1 + rounds), desc="strategies", unit="step", leave=False,
               disable=None if progress else True)  # None: no bar off a terminal
    steps: dict[Strategy, tuple] = {}  # one measured step gives a strategy and its early-step twin
    for s in strategies:
        entry = models[(s.method, s.k)]
        base = dataclasses.replace(s, early_step=False)
        if base not in steps:
            recompute = settle(entry["model"], base, x, y, auto)
            steps[base] = (measure_step(entry["model"], x, y), recompute)
        report, recompute = steps[base]
        runs.append({"strategy": s, "entry": entry, "report": report, "recompute": recompute,
                     "memory_source": MEASURED})
        bar.update(1)

    def step(run) -> float:
        model, opt = run["entry"]["model"], run["entry"]["opt"]
        apply_strategy(model, run["strategy"])
        if run["recompute"] is not None:
            for a, flag in zip((a for a in model.aux if isinstance(a, MomentumAux)), run["recompute"]):
                a.recompute_ema = flag
        early = StepInBackward(model, opt) if run["strategy"].early_step else None

        def one() -> None:
            opt.zero_grad(set_to_none=True)
            if early is not None:
                early.begin_step()
            model.train_step(x, y, after_module=early.after_module if early is not None else None)
            if early is None:
                opt.step()
            else:
                early.end_step()

        try:
            return timed(device, one)
        finally:
            if early is not None:
                early.close()

    for run, times in zip(runs, interleaved_times(runs, step, rounds=rounds, warmup=warmup,
                                                  tick=lambda: bar.update(1))):
        run["times"] = times
    bar.close()
    for run in runs:
        run["step_time_s"] = statistics.median(run["times"]) if run["times"] else None
        run["time_source"] = f"{MEASURED}: median of {rounds} interleaved round(s)" if rounds else None
    return [record_of(cfg, run, info, device) for run in runs]


def record_of(cfg: C.TrainConfig, run: dict, info, device: torch.device) -> dict:
    """The record of one strategy's run (``strategy``, ``entry`` with its model, memory ``report``,
    ``recompute``, ``step_time_s``, ``flops``, and where the memory and the time come from)."""
    s: Strategy = run["strategy"]
    model = run["entry"]["model"]
    report: MemoryReport = run["report"]
    state = state_bytes(model, cfg.optimizer, report.trained_bytes)
    step_peak = report.peak_step_early_bytes if s.early_step else report.peak_step_bytes
    step_peak = report.peak_activation_bytes if step_peak is None else step_peak
    median = run["step_time_s"]
    return {
        "label": s.label, **dataclasses.asdict(s), "local": s.local, "gradients": s.gradients,
        "objective": model.objective, "split": model.partition.describe(model.backbone.unit_names),
        "split_name": run["entry"]["cfg"].split,
        "model": cfg.model, "batch_size": cfg.batch_size, "image_size": info.image_size, "device": str(device),
        "peak_activation_bytes": report.peak_activation_bytes, "module_peak_bytes": report.module_peak_bytes,
        "peak_allocated_bytes": report.peak_allocated_bytes, "step_allocated_bytes": report.step_allocated_bytes,
        "offloaded_bytes": report.offloaded_bytes,
        "step_peak_bytes": step_peak, "state_bytes": state, "total_bytes": step_peak + state,
        "step_time_s": median, "times_s": run.get("times"), "flops": run.get("flops"),
        "images_per_s": cfg.batch_size / median if median else None,
        "ema_recomputed": run["recompute"],
        "memory_source": run["memory_source"], "time_source": run["time_source"],
    }


def pareto(records: Sequence[dict], *, time_key: str = "step_time_s", memory_key: str = "total_bytes") -> list[bool]:
    """Whether each record is on the memory/time frontier: no other one is at most as slow and as large,
    and better in one of the two."""
    def dominated(r: dict) -> bool:
        return any(o is not r and o[time_key] <= r[time_key] and o[memory_key] <= r[memory_key]
                   and (o[time_key] < r[time_key] or o[memory_key] < r[memory_key]) for o in records)

    return [not dominated(r) for r in records]


__all__ = ["ESTIMATED", "KS", "MEASURED", "Strategy", "apply_strategy", "build_models", "config_of",
           "default_strategies", "measure", "pareto", "record_of", "settle", "synchronize"]
