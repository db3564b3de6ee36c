"""``manpp compare``: several methods, same data, backbone and recipe; one table, JSON and plot."""

from __future__ import annotations

import dataclasses
import io
import json
from pathlib import Path

from ..base.errors import ManppError
from ..base.extras import available, require
from ..base.registry import METHODS, OBJECTIVES, objective_takers
from ..base.safeio import make_folder, write_bytes, write_text
from ..config import trainconfig as C
from ..memory.measure import format_bytes
from ..run.rundir import has_weights
from ..run.runlock import FolderLock, holder
from ..tasks import metric_label, metric_title
from ..train.build import check_buildable
from ..train.loop import train

RECORD_KEYS = ("method", "status", "signal", "modules", "test_accuracy", "best_test_accuracy", "metric", "test_score", "best_test_score",
               "test_metrics", "peak_activation_bytes",
               "peak_allocated_bytes", "epoch_time_s", "step_time_s", "params", "aux_params", "partition",
               "objective", "epochs", "steps", "batch_size", "device", "model", "dataset", "torch_version", "history")


def parse_methods(text: str, *, objectives: bool = False) -> list[str]:
    """``'e2e,manpp'`` -> ``['e2e', 'manpp']``; with ``objectives``, ``'manpp:dgl'`` is accepted too."""
    methods = [m.strip() for m in text.split(",") if m.strip()]
    if not methods:
        raise ManppError("--methods is empty: give a comma-separated list such as e2e,manpp")
    for m in methods:
        name, colon, objective = m.partition("@")[0].partition(":")
        if "@" in m and not objectives:
            raise ManppError(f"'{m}': per-method settings (method@key=value) are for manpp bench; give key=value here")
        method = METHODS.get(name)
        takers = objective_takers()
        if colon and not objectives:
            raise ManppError(f"'{m}': choose the objective of {'/'.join(takers)} with --objective here")
        if colon and (objective not in OBJECTIVES or not method.takes_objective):
            raise ManppError(f"bad method '{m}': only {' and '.join(takers)} take an objective, one of "
                             f"{', '.join(OBJECTIVES)} (e.g. manpp:dgl)")
    if len(set(methods)) != len(methods):
        raise ManppError(f"--methods lists a method twice: {text}")
    return methods


def run_compare(cfg: C.TrainConfig, methods: list[str], *, json_path: str | None = None,
                verbose: bool = True, overwrite: bool = False) -> list[dict]:
    """Train each method with ``cfg`` (``k`` applies to the local methods) and report side by side.

    Each method's run goes to ``OUT/<method>``; a folder there that already holds a run is refused
    before anything trains, unless ``overwrite``."""
    out = Path(cfg.out or Path("runs") / f"compare-{cfg.model}-{cfg.dataset}")
    if out.exists() and not out.is_dir():
        raise ManppError(f"compare folder '{out}' is an existing file, not a folder: give --out a folder path")
    busy = [f"{m} ({holder(out / m)})" for m in methods if holder(out / m)]
    if busy:
        raise ManppError(f"'{out}' has run folders in use: {', '.join(busy)}; wait for them to end, or choose "
                         f"another --out")
    taken = [m for m in methods if has_weights(out / m)]
    if taken and not overwrite:
        raise ManppError(f"'{out}' already holds runs of {', '.join(taken)}: replace them with --overwrite, or "
                         f"choose another --out")
    for method in methods:  # every method's model is built once before any run starts: none is replaced in vain
        check_buildable(_method_config(cfg, method, out))
    make_folder(out, "write the compare folder")
    with FolderLock(out, "manpp compare"):  # one compare per folder; each run also locks its own
        records = []
        for method in methods:
            run_cfg = _method_config(cfg, method, out)
            if verbose:
                print(f"\n== {method} ==")
            result = train(run_cfg, verbose=verbose, overwrite=overwrite)
            records.append({k: result.summary.get(k) for k in RECORD_KEYS})
            if result.signal:  # stopped by a signal: the methods after it are not started
                break
        unfinished = [f"{r['method']} ({r['status']})" for r in records if r["status"] != "finished"]
        unfinished += [f"{m} (not run)" for m in methods[len(records):]]
        table = format_table(records) + "\n\n" + numerics_note(records)
        if unfinished:
            table += f"\n\nnot finished: {', '.join(unfinished)}"
        if verbose:
            print("\n" + table)
        write_text(out / "compare.md", table + "\n")
        payload = json.dumps(records, indent=2)
        write_text(out / "compare.json", payload)
        if json_path:
            make_folder(Path(json_path).parent)
            write_text(json_path, payload)
    plot = plot_compare(records, out / "compare.png") if available("matplotlib") else None
    if plot is None and verbose:
        print("(no compare.png: matplotlib is not installed; pip install 'manpp[plot]')")
    if verbose:
        print(f"\nwrote {out / 'compare.json'}, {out / 'compare.md'}" + (f", {plot}" if plot else "")
              + (f" and {json_path}" if json_path else ""))
    return records


def _method_config(cfg: C.TrainConfig, method: str, out: Path) -> C.TrainConfig:
    """One method's run: the shared recipe, its own folder; ``k`` applies to the local methods only."""
    return dataclasses.replace(cfg, method=method, k=None if method == "e2e" else cfg.k, out=str(out / method))


def format_table(records: list[dict]) -> str:
    """A markdown table; memory and time also as ratios to the first method."""
    base = records[0]
    name = metric_label(base.get("metric") or "accuracy")
    lines = [f"| method | modules | test {name} | best {name} | peak activation | vs first | time / epoch | vs first |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in records:  # a run stopped before its first evaluation has no score and no epoch time: '-'
        mem_ratio = r["peak_activation_bytes"] / base["peak_activation_bytes"]
        time_ratio = _ratio(r["epoch_time_s"], base["epoch_time_s"])
        lines.append(f"| {r['method']} | {r['modules']} | {_text(r['test_score'], '.2%')} "
                     f"| {_text(r['best_test_score'], '.2%')} | {format_bytes(r['peak_activation_bytes'])} "
                     f"| {mem_ratio:.2f}x | {_text(r['epoch_time_s'], '.1f')} s | {_text(time_ratio, '.2f')}x |")
    return "\n".join(lines)


def numerics_note(records: list[dict]) -> str:
    """Where the numbers were made: on a CPU the thread count changes the order of floating-point sums,
    so the accuracies of the same command vary by a few test images from machine to machine."""
    import torch

    devices = {r.get("device") for r in records if r.get("device")}
    if devices and not any(str(d).startswith("cpu") for d in devices):
        return f"device: {', '.join(sorted(map(str, devices)))}, torch {torch.__version__}"
    return (f"{torch.get_num_threads()} CPU thread(s), torch {torch.__version__}: another thread count or CPU sums "
            f"in another order, so the accuracies differ by a few test images (docs/demo.md gives the range)")


def _text(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _ratio(a, b):
    return a / b if a is not None and b else None


def plot_compare(records: list[dict], path: Path) -> Path:
    """Write :func:`compare_figure` to ``path``."""
    import matplotlib.pyplot as plt

    fig = compare_figure(records)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    write_bytes(path, buffer.getvalue())
    return path


def compare_figure(records: list[dict]):
    """Test score per epoch, peak activation memory and time per epoch per method, side by side
    (matplotlib: the ``plot`` extra)."""
    matplotlib = require("matplotlib", "the comparison plot (compare.png)")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_acc, ax_mem, ax_time) = plt.subplots(1, 3, figsize=(14, 4))
    for r in records:
        rows = [h for h in r["history"] if h.get("complete", True)] or r["history"]
        epochs = [h["epoch"] for h in rows]
        acc = [100 * h["test_score"] for h in rows]
        ax_acc.plot(epochs, acc, marker="o", label=f"{r['method']} (K={r['modules']})")
    ax_acc.set_xlabel("epoch")
    ax_acc.set_ylabel(f"test {metric_title(records[0].get('metric') or 'accuracy')} (%)")
    ax_acc.set_title(f"{records[0]['model']} on {records[0]['dataset']}")
    ax_acc.grid(alpha=0.3)
    ax_acc.legend()
    names = [r["method"] for r in records]
    mib = [r["peak_activation_bytes"] / 2**20 for r in records]
    bars = ax_mem.bar(names, mib, color=["#777777"] + ["#3b75af"] * (len(names) - 1))
    for bar, value in zip(bars, mib):
        ax_mem.annotate(f"{value:.0f}", (bar.get_x() + bar.get_width() / 2, value), ha="center", va="bottom")
    ax_mem.set_ylabel(f"peak activation memory (MiB, batch {records[0]['batch_size']})")
    ax_mem.set_title("activation memory per training step")
    seconds = [r["epoch_time_s"] or 0.0 for r in records]
    bars = ax_time.bar(names, seconds, color=["#777777"] + ["#c0504d"] * (len(names) - 1))
    for bar, value in zip(bars, seconds):
        ax_time.annotate(f"{value:.1f}", (bar.get_x() + bar.get_width() / 2, value), ha="center", va="bottom")
    ax_time.set_ylabel(f"time per epoch (s, {records[0].get('device', '')})")
    ax_time.set_title("training time per epoch (no evaluation)")
    fig.tight_layout()
    return fig
