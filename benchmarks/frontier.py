"""The memory/time frontier: local learning against, and combined with, activation checkpointing.

For each setting (ResNet-32 at CIFAR shape, batch 128; ResNet-101 at 224 px, batch 8; ViT-S/16 at
224 px, batch 8) it measures, in one run and with one set of weights per (method, K):

- E2E, plain, with activation checkpointing (each unit a segment, or sqrt(n) segments), with bf16
  saved activations, and with both;
- MAN++ (the paper's objective: InfoPro on ResNets, the class-token head on ViTs) at K = 2, 4, 8, 16
  (at most the units), the same six ways, on the memory-balanced split;
- DGL at the same K, plain and checkpointed;
- on CUDA also offloaded saved activations (E2E, E2E checkpointed, and each local K checkpointed).

Each strategy: the activation peak (bytes autograd holds; on CUDA also the allocator's peak), the total
footprint (activation peak + parameters, buffers, gradients and SGD momentum of the backbone and the
auxiliary networks), the median step time over interleaved rounds, and whether its gradients are exact
(E2E's) or local. ``manpp.strategies`` does the measuring; this script writes
``results/frontier_<device>.{json,md,png}``: a table per setting with the Pareto-optimal strategies
marked, what local learning wins (or does not) against the best exact strategy, and a memory-against-time
plot.

    python benchmarks/frontier.py                       # the CPU run committed here (about 40 minutes)
    python benchmarks/frontier.py --device cuda         # benchmarks/gpu.sh runs this on a GPU
    python benchmarks/frontier.py --quick --device cpu  # tiny settings, the same code path (frontier_cpu_quick.*)
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import platform
import sys
from pathlib import Path

import torch

from manpp import config as C
from manpp.build import resolve_device
from manpp.memory import format_bytes
from manpp.resolve import backbone_facts, resolve
from manpp.strategies import CHECKPOINTING_VARIANTS, Strategy, default_strategies, measure, pareto
from manpp.safeio import write_text  # atomic: a run cut short never leaves a half-written result

HERE = Path(__file__).resolve().parent

# (name, model, dataset shape, batch, image side)
SETTINGS = [("resnet32_cifar", "resnet32", "cifar10", 128, 32), ("resnet101_224", "resnet101", "imagenet", 8, 224),
            ("vit_small_224", "vit_small", "imagenet", 8, 224)]
QUICK_SETTINGS = [("resnet8_quick", "resnet8", "cifar10", 4, 32)]
BASELINE = "dgl"  # the local baseline measured beside MAN++


def strategies_for(units: int, device: torch.device, ks) -> list[Strategy]:
    out = default_strategies("manpp", units, ks=ks, offload=device.type == "cuda")
    for k in sorted({k for k in ks if 2 <= k <= units}):
        out += [Strategy(BASELINE, k, c) for c in CHECKPOINTING_VARIANTS]
    return out


def run_setting(name: str, model: str, dataset: str, batch: int, size: int, device: torch.device, rounds: int,
                ks) -> dict:
    cfg = resolve(C.apply(C.TrainConfig(), {"model": model, "dataset": dataset, "batch_size": batch,
                                            "image_size": size, "method": "manpp", "device": str(device)}))
    units = backbone_facts(cfg).units
    strategies = strategies_for(units, device, ks)
    print(f"{name}: {len(strategies)} strategies, {units} units", flush=True)
    records = measure(cfg, strategies, rounds=rounds)
    for r, best in zip(records, pareto(records)):
        r["pareto"] = best
    return {"name": name, "model": model, "dataset_shape": dataset, "batch_size": batch, "image_size": size,
            "units": units, "objective": cfg.objective, "records": records, "verdict": verdict(records)}


def verdict(records: list[dict]) -> dict:
    """What local learning wins against the exact strategies: for each local strategy on the frontier,
    the fastest exact strategy that fits in its memory, and the smallest exact strategy as fast as it."""
    exact = [r for r in records if r["gradients"].startswith("exact")]
    wins = []
    for r in records:
        if not r["pareto"] or not r["local"]:
            continue
        fits = [e for e in exact if e["total_bytes"] <= r["total_bytes"]]
        as_fast = [e for e in exact if e["step_time_s"] <= r["step_time_s"]]
        fastest = min(fits, key=lambda e: e["step_time_s"]) if fits else None
        smallest = min(as_fast, key=lambda e: e["total_bytes"]) if as_fast else None
        wins.append({"label": r["label"], "total_bytes": r["total_bytes"], "step_time_s": r["step_time_s"],
                     "exact_in_same_memory": None if fastest is None else fastest["label"],
                     "exact_in_same_memory_time_s": None if fastest is None else fastest["step_time_s"],
                     "exact_as_fast": None if smallest is None else smallest["label"],
                     "exact_as_fast_total_bytes": None if smallest is None else smallest["total_bytes"]})
    smallest_exact = min(exact, key=lambda e: e["total_bytes"])
    local = [r for r in records if r["local"]]
    smallest_local = min(local, key=lambda e: e["total_bytes"]) if local else None
    return {"local_on_frontier": wins, "smallest_exact": smallest_exact["label"],
            "smallest_exact_total_bytes": smallest_exact["total_bytes"],
            "smallest_exact_time_s": smallest_exact["step_time_s"],
            "smallest_local": None if smallest_local is None else smallest_local["label"],
            "smallest_local_total_bytes": None if smallest_local is None else smallest_local["total_bytes"],
            "smallest_local_time_s": None if smallest_local is None else smallest_local["step_time_s"]}


def verdict_lines(v: dict) -> list[str]:
    mib = format_bytes
    lines = [f"Smallest exact strategy: **{v['smallest_exact']}**, {mib(v['smallest_exact_total_bytes'])} at "
             f"{v['smallest_exact_time_s'] * 1000:.0f} ms/step."]
    if v["smallest_local"]:
        ratio = v["smallest_local_total_bytes"] / v["smallest_exact_total_bytes"]
        lines.append(f"Smallest local strategy: **{v['smallest_local']}**, {mib(v['smallest_local_total_bytes'])} "
                     f"({ratio:.2f}x of it) at {v['smallest_local_time_s'] * 1000:.0f} ms/step.")
    if not v["local_on_frontier"]:
        lines.append("**Local learning is never better here**: every local strategy is matched or beaten in "
                     "both memory and time by an exact one (E2E with checkpointing and/or bf16).")
        return lines
    lines.append("Local strategies on the frontier (no exact strategy is as small and as fast):")
    for w in v["local_on_frontier"]:
        same = ("no exact strategy fits in that memory" if w["exact_in_same_memory"] is None else
                f"the fastest exact one that fits, {w['exact_in_same_memory']}, takes "
                f"{w['exact_in_same_memory_time_s'] * 1000:.0f} ms")
        fast = ("no exact strategy is as fast" if w["exact_as_fast"] is None else
                f"the smallest exact one as fast, {w['exact_as_fast']}, needs {mib(w['exact_as_fast_total_bytes'])}")
        lines.append(f"- {w['label']}: {mib(w['total_bytes'])}, {w['step_time_s'] * 1000:.0f} ms; {same}; {fast}.")
    return lines


def markdown(doc: dict) -> str:
    lines = [f"# The memory/time frontier: {doc['device_name']}, {doc['date']}", "",
             f"torch {doc['torch']}, {doc['machine']}. Command: `{doc['command']}`. Step time: median of "
             f"{doc['rounds']} interleaved rounds (every strategy of a setting timed in turn, in one process). "
             "Activations: the peak bytes autograd holds in one training step; total: that plus every parameter and "
             "buffer, the gradients and SGD momentum (backbone and auxiliary networks). Gradients: exact (E2E's), "
             "or local (each module's own loss); bf16-rounded when saved activations are stored in bf16. "
             "**Bold**: Pareto-optimal in total memory and time.", ""]
    cuda = doc["device"].startswith("cuda")
    for s in doc["settings"]:
        records = s["records"]
        base = next(r for r in records if r["label"] == "E2E")
        lines += [f"## {s['model']}, {s['image_size']} px, batch {s['batch_size']} ({s['units']} units; MAN++ on "
                  f"{s['objective']})", ""]
        head = "| strategy | gradients | activations | vs E2E | total | vs E2E | step time | vs E2E |"
        rule = "|---|---|---:|---:|---:|---:|---:|---:|"
        if cuda:
            head += " allocator step peak | tracker / allocator |"
            rule += "---:|---:|"
        lines += [head, rule]
        for r in sorted(records, key=lambda r: r["total_bytes"]):
            name = f"**{r['label']}**" if r["pareto"] else r["label"]
            row = (f"| {name} | {r['gradients']} | {format_bytes(r['peak_activation_bytes'])} | "
                   f"{r['peak_activation_bytes'] / base['peak_activation_bytes']:.2f}x | {format_bytes(r['total_bytes'])} "
                   f"| {r['total_bytes'] / base['total_bytes']:.2f}x | {r['step_time_s'] * 1000:.0f} ms | "
                   f"{r['step_time_s'] / base['step_time_s']:.2f}x |")
            if cuda:
                step = r["step_allocated_bytes"]
                row += (f" {format_bytes(step)} | {r['peak_activation_bytes'] / step:.2f} |" if step else " - | - |")
            lines.append(row)
        lines += [""] + verdict_lines(s["verdict"]) + [""]
    return "\n".join(lines)


def plot(doc: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = doc["settings"]
    fig, axes = plt.subplots(1, len(settings), figsize=(5.2 * len(settings), 4.4), squeeze=False)
    for ax, s in zip(axes[0], settings):
        styles = {"exact": ("tab:blue", "o"), "local": ("tab:orange", "^")}
        for r in s["records"]:
            color, marker = styles["local" if r["local"] else "exact"]
            face = "none" if r["saved"] else color
            ax.scatter(r["step_time_s"] * 1000, r["total_bytes"] / 2**20, marker=marker, edgecolors=color,
                       facecolors=face, s=60 if r["pareto"] else 22, zorder=3 if r["pareto"] else 2)
        front = sorted((r for r in s["records"] if r["pareto"]), key=lambda r: r["step_time_s"])
        ax.step([r["step_time_s"] * 1000 for r in front], [r["total_bytes"] / 2**20 for r in front], where="post",
                color="grey", linewidth=1, zorder=1)
        for r in front:
            ax.annotate(r["label"], (r["step_time_s"] * 1000, r["total_bytes"] / 2**20), fontsize=6,
                        xytext=(4, 3), textcoords="offset points")
        ax.set_xlabel("step time (ms)")
        ax.set_ylabel("total memory (MiB)")
        ax.set_title(f"{s['model']}, {s['image_size']} px, batch {s['batch_size']}", fontsize=9)
    handles = [plt.Line2D([], [], color="tab:blue", marker="o", linestyle="", label="exact (E2E)"),
               plt.Line2D([], [], color="tab:orange", marker="^", linestyle="", label="local"),
               plt.Line2D([], [], color="grey", marker="o", markerfacecolor="none", linestyle="",
                          label="hollow: bf16 saved"),
               plt.Line2D([], [], color="grey", label="Pareto frontier (large markers)")]
    fig.legend(handles=handles, loc="lower center", ncol=4, fontsize=8)
    fig.suptitle(f"Memory against time, {doc['device_name']}", fontsize=10)
    fig.tight_layout(rect=(0, 0.07, 1, 0.95))
    fig.savefig(path, dpi=120)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return "cpu"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--quick", action="store_true", help="tiny settings, the same code path")
    p.add_argument("--settings", help="comma-separated setting names (default: all)")
    p.add_argument("--rounds", type=int, help="timed rounds (default 3; quick 1)")
    p.add_argument("--ks", default="2,4,8,16", help="K of the local methods (default 2,4,8,16)")
    p.add_argument("--out", default=str(HERE / "results"))
    p.add_argument("--name", help="results file stem (default frontier_<device>)")
    args = p.parse_args(argv)
    device = resolve_device(args.device)
    table = QUICK_SETTINGS if args.quick else SETTINGS
    chosen = [s for s in table if not args.settings or s[0] in args.settings.split(",")]
    if not chosen:
        p.error(f"no setting among {[s[0] for s in table]} matches --settings {args.settings}")
    ks = [int(v) for v in args.ks.split(",")] if not args.quick else [2]
    rounds = args.rounds or (1 if args.quick else 3)
    settings = [run_setting(*s, device, rounds, ks) for s in chosen]
    name = device_name(device)
    doc = {"command": "python benchmarks/frontier.py " + " ".join(argv if argv is not None else sys.argv[1:]),
           "device": str(device), "device_name": name, "date": datetime.date.today().isoformat(),
           "machine": f"{platform.machine()}, {torch.get_num_threads()} threads", "torch": torch.__version__,
           "python": platform.python_version(), "rounds": rounds, "settings": settings}
    stem = args.name or "frontier_" + ("cpu" if device.type == "cpu" else
                                       "".join(c if c.isalnum() else "_" for c in name.lower()).strip("_"))
    stem += "_quick" if args.quick and not args.name else ""  # never over the committed results
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / f"{stem}.json", json.dumps(doc, indent=1, default=str))
    text = markdown(doc)
    write_text(out / f"{stem}.md", text)
    plot(doc, out / f"{stem}.png")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
