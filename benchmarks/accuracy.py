"""Accuracy of E2E, DGL, InfoPro, PredSim, MAN and MAN++ on a real dataset, over several seeds.

Trains ResNet-32 with every method at each K (E2E once per seed), writes one JSON record per run
to ``--json`` (re-running skips the runs already there, so an interrupted benchmark continues),
then a markdown table of mean and spread over seeds and a plot.

The full-budget run (a GPU):
    python benchmarks/accuracy.py --epochs 100 --train-subset 0 --batch-size 128 --lr 0.1
The reduced CPU budget committed in benchmarks/results/ is the default of this script.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
from pathlib import Path

import torch

from manpp import config as C
from manpp.train import train

HERE = Path(__file__).resolve().parent


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="fashion-mnist")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--model", default="resnet32")
    p.add_argument("--methods", default="e2e,dgl,infopro,predsim,man,manpp",
                   help="methods; METHOD:OBJECTIVE picks the local objective of man/manpp (e.g. manpp:dgl)")
    p.add_argument("--ks", default="8,16", help="K values for the local methods (even splits)")
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--train-subset", type=int, default=5000, help="training images used (0: all)")
    p.add_argument("--test-subset", type=int, default=2000, help="test images used (0: all)")
    p.add_argument("--device", default="auto")
    p.add_argument("--name", default="accuracy_fashion_mnist")
    p.add_argument("--out", default=str(HERE / "results"))
    p.add_argument("--report-only", action="store_true", help="only rewrite the table and plot from the JSON")
    p.add_argument("set", nargs="*", metavar="key=value", help="extra config overrides for every run")
    return p.parse_args(argv)


def _dates(old: str | None, today: datetime.date) -> str:
    """The dates of the runs in the file: the earlier ones, then today's if new."""
    dates = [d for d in (old or "").split(", ") if d]
    return ", ".join(dates + ([today.isoformat()] if today.isoformat() not in dates else []))


def run_key(r: dict) -> tuple:
    return r["method"], r["k"], r["seed"]


def main(argv=None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / f"{args.name}.json"
    doc = json.loads(json_path.read_text()) if json_path.exists() else {"runs": []}
    done = {run_key(r) for r in doc["runs"]}
    if args.report_only:
        return report(doc, out, args.name)
    methods = args.methods.split(",")
    ks = [int(k) for k in args.ks.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    old = doc.get("setup", {})
    command = "python benchmarks/accuracy.py " + " ".join(argv if argv is not None else sys.argv[1:])
    doc["setup"] = {
        "command": command if not old else f"{old['command']}; {command}",
        "dataset": args.dataset, "model": args.model, "epochs": args.epochs, "batch_size": args.batch_size,
        "lr": args.lr, "train_subset": args.train_subset or "all", "test_subset": args.test_subset or "all",
        "seeds": sorted(set(old.get("seeds", [])) | set(seeds)), "ks": sorted(set(old.get("ks", [])) | set(ks)),
        "methods": old.get("methods", []) + [m for m in methods if m not in old.get("methods", [])],
        "split": "even",
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, {platform.processor() or 'cpu'}",
        "python": platform.python_version(), "torch": torch.__version__,
        "date": _dates(old.get("date"), datetime.date.today()),
    }
    base = C.apply(C.TrainConfig(), {
        "model": args.model, "dataset": args.dataset, "data_dir": args.data_dir, "epochs": args.epochs,
        "batch_size": args.batch_size, "lr": args.lr, "device": args.device,
        "train_subset": args.train_subset or None, "test_subset": args.test_subset or None,
    })
    base = C.apply(base, C.parse_overrides(args.set))
    for seed in seeds:
        for method in methods:
            for k in ([1] if method == "e2e" else ks):
                if (method, k, seed) in done:
                    continue
                name, _, objective = method.partition(":")
                cfg = C.apply(base, {"method": name, "k": None if name == "e2e" else k, "seed": seed,
                                     **({"objective": objective} if objective else {}),
                                     "out": str(out / "runs" / args.name / f"{method.replace(':', '-')}-k{k}-s{seed}")})
                print(f"== {method} K={k} seed {seed}", flush=True)
                s = train(cfg, verbose=False).summary
                doc["runs"].append({"method": method, "k": k, "seed": seed, "modules": s["modules"],
                                    "test_accuracy": s["test_accuracy"], "best_test_accuracy": s["best_test_accuracy"],
                                    "peak_activation_bytes": s["peak_activation_bytes"],
                                    "epoch_time_s": s["epoch_time_s"], "history": s["history"]})
                print(f"   test accuracy {s['test_accuracy']:.2%} ({s['epoch_time_s']:.0f} s/epoch)", flush=True)
                json_path.write_text(json.dumps(doc, indent=2))
    json_path.write_text(json.dumps(doc, indent=2))
    return report(doc, out, args.name)


def report(doc: dict, out: Path, name: str) -> int:
    table = summarize(doc)
    (out / f"{name}.md").write_text(table)
    plot(doc, out / f"{name}.png")
    print(table)
    return 0


def _stats(values: list[float]) -> tuple[float, float]:
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) if len(values) > 1 else 0.0)


def groups(doc: dict) -> dict[tuple, list[dict]]:
    out: dict[tuple, list[dict]] = {}
    for r in doc["runs"]:
        out.setdefault((r["method"], r["k"]), []).append(r)
    return out


def summarize(doc: dict) -> str:
    setup = doc["setup"]
    lines = [f"Test accuracy (%) on {setup['dataset']}, {setup['model']}, mean ± std over seeds {setup['seeds']}; "
             f"{setup['epochs']} epochs, batch {setup['batch_size']}, lr {setup['lr']}, train subset "
             f"{setup['train_subset']}, test subset {setup['test_subset']}; {setup['machine']}, torch "
             f"{setup['torch']}, {setup['date']}.", "", f"Command: `{setup['command']}`", "",
             "| method | K | modules | final test acc | best test acc | Δ to E2E (final) |",
             "|---|---:|---:|---:|---:|---:|"]
    g = groups(doc)
    e2e = _stats([r["test_accuracy"] for r in g.get(("e2e", 1), [])])[0] if ("e2e", 1) in g else None
    order = {m: i for i, m in enumerate(setup["methods"])}
    for (method, k), runs in sorted(g.items(), key=lambda kv: (kv[0][1] > 1, kv[0][1], order.get(kv[0][0], 99))):
        acc, acc_sd = _stats([100 * r["test_accuracy"] for r in runs])
        best, best_sd = _stats([100 * r["best_test_accuracy"] for r in runs])
        delta = "" if e2e is None or method == "e2e" else f"{acc - 100 * e2e:+.2f}"
        spread = (lambda m, sd: f"{m:.2f} ± {sd:.2f}") if len(runs) > 1 else (lambda m, sd: f"{m:.2f} (1 seed)")
        lines.append(f"| {method} | {k} | {runs[0]['modules']} | {spread(acc, acc_sd)} | {spread(best, best_sd)} "
                     f"| {delta} |")
    return "\n".join(lines) + "\n"


def plot(doc: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    g = groups(doc)
    setup = doc["setup"]
    local = [m for m in setup["methods"] if m != "e2e"]
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.8 / max(1, len(setup["ks"]))
    for i, k in enumerate(setup["ks"]):
        xs, means, sds = [], [], []
        for j, m in enumerate(local):
            if (m, k) in g:
                mean, sd = _stats([100 * r["test_accuracy"] for r in g[(m, k)]])
                xs.append(j + (i - (len(setup["ks"]) - 1) / 2) * width)
                means.append(mean)
                sds.append(sd)
        ax.bar(xs, means, width, yerr=sds, capsize=3, label=f"K={k}")
    if ("e2e", 1) in g:
        mean, _ = _stats([100 * r["test_accuracy"] for r in g[("e2e", 1)]])
        ax.axhline(mean, color="black", linestyle="--", label=f"E2E {mean:.2f}")
    lows = [100 * r["test_accuracy"] for r in doc["runs"]]
    ax.set_ylim(max(0, min(lows) - 5), min(100, max(lows) + 3))
    ax.set_xticks(range(len(local)), local)
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"{setup['model']} on {setup['dataset']} ({setup['epochs']} epochs, "
                 f"{len(setup['seeds'])} seeds)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
