"""The regime map: where local learning pays in memory, against and with activation checkpointing.

For each model (ResNet-32 K up to 16 and ResNet-110 K up to 55 at CIFAR shape, ResNet-101 and ViT-S/16 at
224 px) and each batch size people train at (ImageNet: 8, 32 and 128 per GPU, the paper's 128; CIFAR: 128
and the paper's 1024), every strategy of ``manpp.commands.strategies``, with one set of weights per (method, K):

- E2E, plain, with activation checkpointing (each unit a segment, or sqrt(n) segments), with bf16 saved
  activations, and with both;
- MAN++ (the paper's objective: InfoPro on ResNets, the class-token head on ViTs) at K = 2, 4, 8, 16 (and 55
  on ResNet-110), the same six ways, on the memory-balanced split; DGL at the same K, plain and checkpointed;
- each of them again with ``step_in_backward`` (``early step``: the optimizer steps inside the backward
  passes and each gradient is freed at once; E2E a parameter at a time), which is exact;
- on CUDA also offloaded saved activations.

Each strategy: the activation peak, the step's peak of activations and gradients, the state (parameters,
buffers, SGD momentum of the parameters that train), the total (the two), the step time, and whether the
gradients are exact (E2E's) or local. Every figure is estimated (``manpp.commands.forecast``: the step on fake
tensors; time from FLOPs at a probe's rate) and, where this machine runs it in reasonable time, measured
too (``manpp.commands.strategies.measure``; the table then shows the measured figure, and the JSON keeps both).
Then the crossover: sweeping the batch (estimated: the estimate costs the same at any batch), the batch at
which the smallest local strategy's total drops below the smallest exact strategy's, for each model.

Results go to ``results/frontier_<device>.{json,md,png}`` point by point as they finish (a rerun skips the
points already there, so it resumes): a table per (model, batch) with the Pareto-optimal strategies, the
regime table (best exact against best local per batch, the crossover per model) and the plot (total memory
against batch, per model).

    python benchmarks/frontier.py                       # the CPU run committed here (hours: see the .md)
    python benchmarks/frontier.py --device cuda         # benchmarks/gpu.sh runs this on a GPU (measures all)
    python benchmarks/frontier.py --quick --device cpu  # tiny settings, the same code path (frontier_cpu_quick.*)
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import platform
import sys
import time
from pathlib import Path

import torch

from manpp.config import trainconfig as C
from manpp.commands.forecast import estimate, target_device
from manpp.memory.measure import format_bytes
from manpp.config.resolve import backbone_facts, resolve
from manpp.base.safeio import write_text  # atomic: a run cut short never leaves a half-written result
from manpp.commands.strategies import CHECKPOINTING_VARIANTS, Strategy, default_strategies, measure, pareto

HERE = Path(__file__).resolve().parent

# name: (model, dataset shape, image side, K of the local methods)
MODELS = {
    "resnet32_cifar": ("resnet32", "cifar10", 32, (2, 4, 8, 16)),
    "resnet110_cifar": ("resnet110", "cifar10", 32, (2, 4, 8, 16, 55)),
    "resnet101_224": ("resnet101", "imagenet", 224, (2, 4, 8, 16)),
    "vit_small_224": ("vit_small", "imagenet", 224, (2, 4, 8, 16)),
}
# (model, batch) points, and what this 2-core CPU measures of each: "all" (memory and time), "memory" (time
# estimated) or nothing (both estimated). On CUDA every point is measured that its estimate says fits.
# (measuring took too long here, with other work on the machine, for the CIFAR points at batch 1024 and
# ResNet-110's 55 modules (over an hour each), for timing the ImageNet points (2.5 hours each) and for their
# memory beyond batch 8 (an hour each): the 84 strategies measured at ResNet-32, batch 128 check the estimate of
# memory, those at batch 8 of ResNet-101 and ViT-S its memory at ImageNet shapes. Their times are estimated too:
# timed beside the accuracy runs, E2E's median came out 2x MAN++ K=4's, which its FLOPs rule out; step-time
# ratios measured on a quiet machine are benchmarks/cpu_path.py's)
POINTS = [("resnet32_cifar", 128, "memory"), ("resnet32_cifar", 1024, None), ("resnet110_cifar", 128, None),
          ("resnet110_cifar", 1024, None), ("resnet101_224", 8, "memory"), ("resnet101_224", 32, None),
          ("resnet101_224", 128, None), ("vit_small_224", 8, "memory"), ("vit_small_224", 32, None),
          ("vit_small_224", 128, None)]
SWEEP = (2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)  # batches of the crossover search (estimated)
QUICK_MODELS = {"resnet8_quick": ("resnet8", "cifar10", 32, (2,))}
QUICK_POINTS = [("resnet8_quick", 4, "all"), ("resnet8_quick", 16, None)]
QUICK_SWEEP = (2, 4, 16, 64)  # (batch 1: BatchNorm1d in DGL's heads needs two images)
BASELINE = "dgl"  # the local baseline measured beside MAN++
MEASURED_MEMORY_LIMIT = 0.6  # on the CPU: measure only strategies whose estimated total is below this share of RAM


def strategies_for(units: int, device: torch.device, ks) -> list[Strategy]:
    out = default_strategies("manpp", units, ks=ks, offload=device.type == "cuda", early_step=False)
    for k in sorted({k for k in ks if 2 <= k <= units}):
        out += [Strategy(BASELINE, k, c) for c in CHECKPOINTING_VARIANTS]
    return out + [dataclasses.replace(s, early_step=True) for s in out if not s.offload]


def _cfg(model: str, dataset: str, batch: int, size: int, device: str) -> C.TrainConfig:
    return resolve(C.apply(C.TrainConfig(), {"model": model, "dataset": dataset, "batch_size": batch,
                                             "image_size": size, "method": "manpp", "device": device}))


def _ram_bytes() -> int:
    try:
        with open("/proc/meminfo") as f:
            return int(next(line for line in f if line.startswith("MemTotal")).split()[1]) * 1024
    except (OSError, StopIteration, ValueError):
        return 8 * 2**30


def run_point(name: str, batch: int, how: str | None, models: dict, device: torch.device, present: bool,
              rounds: int, jobs: int | None) -> dict:
    model, dataset, size, ks = models[name]
    cfg = _cfg(model, dataset, batch, size, str(device))
    units = backbone_facts(cfg).units
    strategies = strategies_for(units, device, ks)
    started = time.perf_counter()
    print(f"{name} @ batch {batch}: {len(strategies)} strategies, {units} units; estimating", flush=True)
    records, probe = estimate(cfg, strategies, jobs=jobs, probe=present)
    if device.type == "cuda" and present:
        how = "all"
    measured = {}
    if how and present:
        limit = (torch.cuda.get_device_properties(device).total_memory * 0.9 if device.type == "cuda"
                 else _ram_bytes() * MEASURED_MEMORY_LIMIT)
        chosen = [s for s, r in zip(strategies, records) if r["total_bytes"] <= limit]
        left = len(strategies) - len(chosen)
        print(f"  measuring {len(chosen)} ({how}){f'; {left} above {format_bytes(limit)} stay estimated' if left else ''}",
              flush=True)
        if chosen:
            real = measure(cfg, chosen, rounds=rounds if how == "all" else 0, warmup=1 if how == "all" else 0)
            measured = dict(zip(chosen, real))
    out = []
    for s, est in zip(strategies, records):
        real = measured.get(s)
        record = dict(est, estimated={key: est[key] for key in FIGURES}, measured=None)
        if real is not None:
            record["measured"] = {key: real[key] for key in FIGURES}
            for key in ("peak_activation_bytes", "step_peak_bytes", "state_bytes", "total_bytes",
                        "module_peak_bytes", "peak_allocated_bytes", "step_allocated_bytes", "memory_source"):
                record[key] = real[key]
            if real["step_time_s"] is not None:
                record["step_time_s"], record["time_source"], record["times_s"] = (real["step_time_s"],
                                                                                   real["time_source"], real["times_s"])
        out.append(record)
    timed = [r for r in out if r["step_time_s"] is not None]
    for r in out:
        r["pareto"] = False
    for r, best in zip(timed, pareto(timed)):
        r["pareto"] = best
    return {"name": name, "model": model, "dataset_shape": dataset, "batch_size": batch, "image_size": size,
            "units": units, "objective": cfg.objective, "measured": how if present else None, "probe": probe,
            "seconds": time.perf_counter() - started, "records": out, "verdict": verdict(out)}


FIGURES = ("peak_activation_bytes", "step_peak_bytes", "state_bytes", "total_bytes", "step_time_s", "memory_source",
           "time_source")


def _exact(r: dict) -> bool:
    return r["gradients"].startswith("exact")


def verdict(records: list[dict]) -> dict:
    """The smallest exact and local strategies (and MAN++'s), and what each local one on the frontier wins."""
    exact = [r for r in records if _exact(r)]
    local = [r for r in records if not _exact(r)]
    manpp = [r for r in local if r["method"] == "manpp"]
    smallest = {kind: min(group, key=lambda r: r["total_bytes"]) if group else None
                for kind, group in (("exact", exact), ("local", local), ("manpp", manpp))}
    wins = []
    for r in records:
        if not r["pareto"] or _exact(r):
            continue
        fits = [e for e in exact if e["total_bytes"] <= r["total_bytes"] and e["step_time_s"] is not None]
        fastest = min(fits, key=lambda e: e["step_time_s"]) if fits else None
        wins.append({"label": r["label"], "total_bytes": r["total_bytes"], "step_time_s": r["step_time_s"],
                     "exact_in_same_memory": None if fastest is None else fastest["label"],
                     "exact_in_same_memory_time_s": None if fastest is None else fastest["step_time_s"]})
    out = {"local_on_frontier": wins}
    for kind, r in smallest.items():
        out[f"smallest_{kind}"] = None if r is None else r["label"]
        out[f"smallest_{kind}_total_bytes"] = None if r is None else r["total_bytes"]
        out[f"smallest_{kind}_time_s"] = None if r is None else r["step_time_s"]
        out[f"smallest_{kind}_source"] = None if r is None else r["memory_source"]
    if smallest["local"] is not None:
        out["local_over_exact"] = smallest["local"]["total_bytes"] / smallest["exact"]["total_bytes"]
    if smallest["manpp"] is not None:
        out["manpp_over_exact"] = smallest["manpp"]["total_bytes"] / smallest["exact"]["total_bytes"]
    return out


def sweep(name: str, models: dict, device: torch.device, batches, jobs: int | None) -> dict:
    """The smallest exact, local and MAN++ totals at each batch of ``batches`` (estimated), and the crossover."""
    model, dataset, size, ks = models[name]
    rows = []
    for batch in batches:
        cfg = _cfg(model, dataset, batch, size, str(device))
        strategies = strategies_for(backbone_facts(cfg).units, device, ks)
        records, _ = estimate(cfg, [s for s in strategies if not s.offload], jobs=jobs, probe=False, progress=False)
        v = verdict([dict(r, pareto=False) for r in records])
        rows.append({"batch_size": batch, **{key: v[key] for key in v if key.startswith("smallest_")}})
        print(f"  sweep {name} @ {batch}: exact {format_bytes(v['smallest_exact_total_bytes'])}, local "
              f"{format_bytes(v['smallest_local_total_bytes'])}", flush=True)
    return {"rows": rows, "local": crossover(rows, "local"), "manpp": crossover(rows, "manpp")}


def crossover(rows: list[dict], kind: str) -> dict:
    """The first batch of the sweep where the smallest ``kind`` strategy's total is below the smallest exact
    one's, with the crossing interpolated linearly between that batch and the one before (totals are affine
    in the batch between the two, to a good approximation: activations grow with it, the state does not)."""
    gaps = [(r["batch_size"], r[f"smallest_{kind}_total_bytes"] - r["smallest_exact_total_bytes"]) for r in rows
            if r[f"smallest_{kind}_total_bytes"] is not None]
    for i, (batch, gap) in enumerate(gaps):
        if gap < 0:
            if i == 0:
                return {"batch": None, "below_from": batch, "text": f"below already at batch {batch}"}
            b0, g0 = gaps[i - 1]
            at = b0 + (batch - b0) * g0 / (g0 - gap)
            return {"batch": at, "between": [b0, batch], "text": f"about {at:.0f} (between {b0} and {batch})"}
    last = gaps[-1][0] if gaps else None
    return {"batch": None, "text": f"not up to batch {last}"}


def markdown(doc: dict) -> str:
    lines = [f"# The regime map: where local learning pays in memory ({doc['device_name']}, {doc['date']})", "",
             f"torch {doc['torch']}, {doc['machine']}. Command: `{doc['command']}`.", "",
             "Total = the step's peak of activations and gradients + parameters, buffers and SGD momentum of what "
             "trains (backbone and auxiliary networks). Activations and gradients are what autograd holds (the "
             "tracker of `manpp.memory`); an allocator adds its workspace, rounding and fragmentation on top "
             "(docs/memory.md). Each figure is **estimated** (the step on fake tensors; time: FLOPs at the rate "
             "of a real probe step) or **measured** (the step run for real; time: median of interleaved rounds), "
             "as its column says. `early step`: step_in_backward (exact). Gradients: exact (E2E's) or local; "
             "bf16-rounded when saved activations are stored in bf16.", "",
             "## The regime table", "",
             "| model | batch | smallest exact | total | smallest local | total | local / exact | smallest MAN++ | "
             "total | MAN++ / exact | figures |",
             "|---|---:|---|---:|---|---:|---:|---|---:|---:|---|"]
    for p in doc["points"]:
        v = p["verdict"]
        how = {"all": "measured", "memory": "memory measured, time estimated", None: "estimated"}[p["measured"]]
        lines.append(f"| {p['model']} | {p['batch_size']} | {v['smallest_exact']} | "
                     f"{format_bytes(v['smallest_exact_total_bytes'])} | {v['smallest_local']} | "
                     f"{format_bytes(v['smallest_local_total_bytes'])} | {v.get('local_over_exact', 0):.2f}x | "
                     f"{v['smallest_manpp']} | {format_bytes(v['smallest_manpp_total_bytes'])} | "
                     f"{v.get('manpp_over_exact', 0):.2f}x | {how} |")
    if doc.get("sweeps"):
        lines += ["", "**The crossover** (estimated, sweeping the batch over "
                  f"{', '.join(str(b) for b in doc['sweep_batches'])}): the batch from which the smallest local "
                  "strategy's total is below the smallest exact strategy's.", "",
                  "| model | any local strategy | MAN++ |", "|---|---|---|"]
        for name, s in doc["sweeps"].items():
            lines.append(f"| {doc['models'][name][0]} | {s['local']['text']} | {s['manpp']['text']} |")
    for p in doc["points"]:
        lines += _point_lines(p)
    return "\n".join(lines) + "\n"


def _point_lines(p: dict) -> list[str]:
    records = p["records"]
    base = next(r for r in records if r["label"] == "E2E")
    v = p["verdict"]
    keep = {v["smallest_exact"], v["smallest_local"], v["smallest_manpp"], "E2E", "E2E + early step"}
    shown = sorted((r for r in records if r["pareto"] or r["label"] in keep), key=lambda r: r["total_bytes"])
    lines = ["", f"## {p['model']}, {p['image_size']} px, batch {p['batch_size']} ({p['units']} units; MAN++ on "
                 f"{p['objective']}; {len(records)} strategies, {p['seconds']:.0f} s)", "",
             "The Pareto-optimal strategies (**bold**), E2E, and the smallest exact, local and MAN++ ones; every "
             "strategy is in the JSON.", "",
             "| strategy | gradients | activations | act. + gradients | total | vs E2E | step time | vs E2E | memory "
             "| time |", "|---|---|---:|---:|---:|---:|---:|---:|---|---|"]
    for r in shown:
        name = f"**{r['label']}**" if r["pareto"] else r["label"]
        step = "-" if r["step_time_s"] is None else f"{r['step_time_s'] * 1000:.0f} ms"
        ratio = "-" if r["step_time_s"] is None or not base["step_time_s"] else \
            f"{r['step_time_s'] / base['step_time_s']:.2f}x"
        lines.append(f"| {name} | {r['gradients']} | {format_bytes(r['peak_activation_bytes'])} | "
                     f"{format_bytes(r['step_peak_bytes'])} | {format_bytes(r['total_bytes'])} | "
                     f"{r['total_bytes'] / base['total_bytes']:.2f}x | {step} | {ratio} | "
                     f"{_source(r['memory_source'])} | {_source(r['time_source'])} |")
    if p.get("probe"):
        lines.append(f"\nEstimated times: FLOPs at {p['probe']['flops_per_s'] / 1e9:.1f} GFLOP/s, the rate of a real "
                     f"E2E step at batch {p['probe']['batch_size']}.")
    checked = [r for r in records if r["measured"] and r["estimated"]]
    if checked:
        worst = max(abs(r["estimated"]["total_bytes"] / r["measured"]["total_bytes"] - 1) for r in checked)
        lines.append(f"\nEstimate against measurement on the {len(checked)} strategies measured here: the totals "
                     f"agree within {100 * worst:.2f}%.")
    return lines


def _source(text: str | None) -> str:
    if not text:
        return "-"
    return "estimated" if text.startswith("estimated") else "measured"


def plot(doc: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(doc["sweeps"]) or sorted({p["name"] for p in doc["points"]})
    fig, axes = plt.subplots(1, len(names), figsize=(4.6 * len(names), 4.2), squeeze=False)
    styles = {"exact": ("tab:blue", "smallest exact (E2E + ckpt / bf16 / early step)"),
              "local": ("tab:orange", "smallest local (any)"), "manpp": ("tab:green", "smallest MAN++")}
    for ax, name in zip(axes[0], names):
        s = doc["sweeps"].get(name)
        if s:
            for kind, (color, label) in styles.items():
                pts = [(r["batch_size"], r[f"smallest_{kind}_total_bytes"] / 2**20) for r in s["rows"]
                       if r[f"smallest_{kind}_total_bytes"]]
                ax.plot(*zip(*pts), color=color, label=label + " (estimated)", linewidth=1.4)
            if s["local"]["batch"]:
                ax.axvline(s["local"]["batch"], color="tab:orange", linestyle=":", linewidth=1)
            if s["manpp"]["batch"]:
                ax.axvline(s["manpp"]["batch"], color="tab:green", linestyle=":", linewidth=1)
        for p in doc["points"]:
            if p["name"] != name:
                continue
            for r in p["records"]:
                if r["measured"] and r["label"] in (p["verdict"]["smallest_exact"], p["verdict"]["smallest_local"],
                                                    p["verdict"]["smallest_manpp"]):
                    kind = "exact" if _exact(r) else "manpp" if r["label"] == p["verdict"]["smallest_manpp"] \
                        else "local"
                    ax.scatter(p["batch_size"], r["measured"]["total_bytes"] / 2**20, color=styles[kind][0],
                               marker="o", zorder=3, s=28)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("batch size")
        ax.set_ylabel("total memory (MiB)")
        ax.set_title(f"{doc['models'][name][0]}, {doc['models'][name][2]} px", fontsize=9)
    handles = [plt.Line2D([], [], color=c, label=label) for c, label in styles.values()]
    handles.append(plt.Line2D([], [], color="grey", marker="o", linestyle="", label="measured"))
    handles.append(plt.Line2D([], [], color="grey", linestyle=":", label="crossover"))
    fig.legend(handles=handles, loc="lower center", ncol=5, fontsize=8)
    fig.suptitle(f"Total memory against batch size: exact strategies against local learning ({doc['device_name']}; "
                 f"lines estimated)", fontsize=10)
    fig.tight_layout(rect=(0, 0.08, 1, 0.95))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def device_name(device: torch.device, present: bool) -> str:
    if device.type == "cuda" and present:
        return torch.cuda.get_device_name(device)
    return str(device)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--quick", action="store_true", help="tiny settings, the same code path")
    p.add_argument("--points", help="comma-separated NAME@BATCH (default: all of POINTS)")
    p.add_argument("--no-measure", action="store_true", help="estimate every point (minutes)")
    p.add_argument("--no-sweep", action="store_true", help="skip the crossover sweep")
    p.add_argument("--rounds", type=int, help="timed rounds of a measured point (default 3; quick 1)")
    p.add_argument("--jobs", type=int, help="processes estimating side by side (default: one per core)")
    p.add_argument("--redo", action="store_true", help="run again the chosen points (--points, default all) and "
                   "their models' sweeps; the other results are kept")
    p.add_argument("--out", default=str(HERE / "results"))
    p.add_argument("--name", help="results file stem (default frontier_<device>)")
    args = p.parse_args(argv)
    device, present = target_device(args.device)
    models = QUICK_MODELS if args.quick else MODELS
    points = QUICK_POINTS if args.quick else POINTS
    if args.points:
        wanted = {tuple(item.split("@")) for item in args.points.split(",")}
        points = [pt for pt in points if (pt[0], str(pt[1])) in wanted]
        if not points:
            p.error(f"no point among {[f'{n}@{b}' for n, b, _ in (QUICK_POINTS if args.quick else POINTS)]} "
                    f"matches --points {args.points}")
    rounds = args.rounds or (1 if args.quick else 3)
    name = device_name(device, present)
    stem = args.name or "frontier_" + ("cpu" if device.type == "cpu" else
                                       "".join(c if c.isalnum() else "_" for c in name.lower()).strip("_"))
    stem += "_quick" if args.quick and not args.name else ""  # never over the committed results
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{stem}.json"
    doc = json.loads(path.read_text()) if path.exists() else {}
    if doc.get("version") != 2:
        doc = {}  # a result of the earlier frontier (batch 8 only, gradients counted at the peak): made anew
    if args.redo:  # only what is asked for is dropped: every other point and sweep stays
        chosen = {(pt[0], pt[1]) for pt in points}
        doc["points"] = [pt for pt in doc.get("points", []) if (pt["name"], pt["batch_size"]) not in chosen]
        if not args.no_sweep:
            for model_name in {pt[0] for pt in points}:
                doc.get("sweeps", {}).pop(model_name, None)
    command = "python benchmarks/frontier.py " + " ".join(argv if argv is not None else sys.argv[1:])
    doc.update({"version": 2, "command": command, "device": str(device), "device_name": name,
                "date": datetime.date.today().isoformat(), "machine": f"{platform.machine()}, "
                f"{torch.get_num_threads()} threads", "torch": torch.__version__, "python": platform.python_version(),
                "rounds": rounds, "models": models, "sweep_batches": list(QUICK_SWEEP if args.quick else SWEEP)})
    doc.setdefault("points", [])
    doc.setdefault("sweeps", {})

    def save() -> None:
        doc["points"].sort(key=lambda pt: (list(models).index(pt["name"]), pt["batch_size"]))
        write_text(path, json.dumps(doc, indent=1, default=str))
        write_text(out / f"{stem}.md", markdown(doc))
        plot(doc, out / f"{stem}.png")

    done = {(pt["name"], pt["batch_size"]) for pt in doc["points"]}
    for point_name, batch, how in points:
        if (point_name, batch) in done:
            continue
        doc["points"].append(run_point(point_name, batch, None if args.no_measure else how, models, device, present,
                                       rounds, args.jobs))
        save()
    if not args.no_sweep:
        for model_name in dict.fromkeys(pt[0] for pt in points):
            if model_name not in doc["sweeps"]:
                doc["sweeps"][model_name] = sweep(model_name, models, device, doc["sweep_batches"], args.jobs)
                save()
    save()
    print((out / f"{stem}.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
