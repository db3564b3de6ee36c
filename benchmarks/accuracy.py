"""Accuracy of E2E, DGL, InfoPro, PredSim, MAN and MAN++ on a real dataset, over seeds, in both fidelities.

Trains ResNet-32 with every method at each K (E2E once per seed and fidelity), with our defaults
(``fidelity=ours``) and with the authors' release (``fidelity=release``). Each run trains on
``--train-subset`` images of the training set and, while it trains, evaluates every epoch on
``--monitor-subset`` test images; its final model is then evaluated on ``--test-subset`` images
(0: the whole test set), and that is the accuracy reported. One JSON record per run goes to
``--name``.json (re-running skips the runs already there, so an interrupted benchmark continues);
then a markdown table of mean ± std over seeds with the gap to E2E per fidelity, and a plot.

A method is ``NAME[:OBJECTIVE][@KEY=VALUE+KEY=VALUE]``: ``manpp:dgl`` is MAN++ on DGL and
``manpp@ema_momentum=0.99`` a variant of MAN++ (for ablations; ``--variant-ks`` sets its K).

``--jobs N`` trains N runs at a time, each on one CPU thread (on 2 cores, 2 single-thread runs do
about 25% more work than one run on two threads).

The full-budget run (a GPU):
    python benchmarks/accuracy.py --epochs 100 --train-subset 0 --batch-size 128 --jobs 1
The reduced CPU budget committed in benchmarks/results/ is the default of this script.
"""

from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing
import platform
import statistics
import sys
from pathlib import Path

import torch

from manpp import config as C
from manpp.train import train

HERE = Path(__file__).resolve().parent
DEFAULT_METHODS = "e2e,dgl,infopro,predsim,man,manpp,man:dgl,manpp:dgl"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="fashion-mnist")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--model", default="resnet32")
    p.add_argument("--methods", default=DEFAULT_METHODS,
                   help="methods; METHOD:OBJECTIVE picks the local objective of man/manpp (e.g. manpp:dgl), "
                        "METHOD@KEY=VALUE+KEY=VALUE is a variant with config overrides")
    p.add_argument("--ks", default="8,16", help="K values for the local methods")
    p.add_argument("--variant-ks", default="16", help="K values for the @variants")
    p.add_argument("--fidelities", default="ours,release")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--warmup-epochs", type=float, default=0.0)
    p.add_argument("--train-subset", type=int, default=800, help="training images used (0: all)")
    p.add_argument("--monitor-subset", type=int, default=500, help="test images evaluated each epoch (0: all)")
    p.add_argument("--test-subset", type=int, default=0, help="test images of the final evaluation (0: all)")
    p.add_argument("--device", default="auto")
    p.add_argument("--jobs", type=int, default=2, help="runs trained at a time, one CPU thread each")
    p.add_argument("--name", default="accuracy_fashion_mnist_seeds")
    p.add_argument("--out", default=str(HERE / "results"))
    p.add_argument("--report-only", action="store_true", help="only rewrite the table and plot from the JSON")
    p.add_argument("set", nargs="*", metavar="key=value", help="extra config overrides for every run")
    return p.parse_args(argv)


def _dates(old: str | None, today: datetime.date) -> str:
    """The dates of the runs in the file: the earlier ones, then today's if new."""
    dates = [d for d in (old or "").split(", ") if d]
    return ", ".join(dates + ([today.isoformat()] if today.isoformat() not in dates else []))


def run_key(r: dict) -> tuple:
    return r.get("fidelity", "ours"), r["method"], r["k"], r["seed"]


def method_overrides(method: str) -> dict:
    """The config of a method spec ``NAME[:OBJECTIVE][@KEY=VALUE+...]`` (without K and seed)."""
    spec, _, variant = method.partition("@")
    name, _, objective = spec.partition(":")
    values = {"method": name, **({"objective": objective} if objective else {})}
    if variant:
        values.update(C.parse_overrides(variant.split("+")))
    return values


def planned(args) -> list[tuple]:
    """(fidelity, method, k, seed) of every run, seed by seed (so a cut-short benchmark has whole seeds)."""
    ks = [int(k) for k in args.ks.split(",")]
    variant_ks = [int(k) for k in args.variant_ks.split(",")]
    runs = []
    for seed in [int(s) for s in args.seeds.split(",")]:
        for fidelity in args.fidelities.split(","):
            for method in args.methods.split(","):
                name = method.partition("@")[0].partition(":")[0]
                if "@" in method and fidelity != args.fidelities.split(",")[0]:
                    continue  # variants (ablations of our defaults) run in the first fidelity only
                for k in [1] if name == "e2e" else variant_ks if "@" in method else ks:
                    runs.append((fidelity, method, k, seed))
    return runs


def _one_thread() -> None:
    torch.set_num_threads(1)


def run_one(job: tuple) -> dict:
    """Train one run and evaluate its final model on the test set (in a worker process)."""
    from manpp.build import load_data
    from manpp.tasks import task_of

    base, (fidelity, method, k, seed), out, test_subset = job
    name = method_overrides(method)["method"]
    cfg = C.apply(base, {**method_overrides(method), "fidelity": fidelity, "k": None if name == "e2e" else k,
                         "seed": seed, "out": out})
    result = train(cfg, verbose=False, overwrite=True)  # each job's scratch folder, made again on a rerun
    s = result.summary
    _, test_set, _ = load_data(C.apply(cfg, {"test_subset": test_subset}))  # the final evaluation's test set
    loader = torch.utils.data.DataLoader(test_set, batch_size=cfg.eval_batch_size)
    final = task_of(result.model.backbone).evaluate(result.model, loader, next(result.model.parameters()).device)
    return {"fidelity": fidelity, "method": method, "k": k, "seed": seed, "modules": s["modules"],
            "test_accuracy": final["accuracy"], "test_images": len(test_set),
            "monitor_accuracy": s["test_accuracy"], "epoch_time_s": s["epoch_time_s"],
            "peak_activation_bytes": s["peak_activation_bytes"], "history": s["history"]}


def main(argv=None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / f"{args.name}.json"
    doc = json.loads(json_path.read_text()) if json_path.exists() else {"runs": []}
    done = {run_key(r) for r in doc["runs"]}
    if args.report_only:
        return report(doc, out, args.name)
    todo = [r for r in planned(args) if r not in done]
    old = doc.get("setup", {})
    command = "python benchmarks/accuracy.py " + " ".join(argv if argv is not None else sys.argv[1:])
    methods = args.methods.split(",")
    doc["setup"] = {
        "command": command if not old else f"{old['command']}; {command}",
        "dataset": args.dataset, "model": args.model, "epochs": args.epochs, "batch_size": args.batch_size,
        "lr": args.lr, "warmup_epochs": args.warmup_epochs, "train_subset": args.train_subset or "all",
        "monitor_subset": args.monitor_subset or "all", "test_subset": args.test_subset or "all",
        "seeds": sorted(set(old.get("seeds", [])) | {r[3] for r in planned(args)}),
        "ks": sorted(set(old.get("ks", [])) | {int(k) for k in args.ks.split(",")}),
        "fidelities": old.get("fidelities", []) + [f for f in args.fidelities.split(",")
                                                   if f not in old.get("fidelities", [])],
        "methods": old.get("methods", []) + [m for m in methods if m not in old.get("methods", [])],
        "jobs": args.jobs,
        "machine": f"{platform.machine()}, {multiprocessing.cpu_count()} cores, {platform.processor() or 'cpu'}; "
                   f"{args.jobs} run(s) at a time, 1 thread each",
        "python": platform.python_version(), "torch": torch.__version__,
        "date": _dates(old.get("date"), datetime.date.today()),
    }
    base = C.apply(C.TrainConfig(), {
        "model": args.model, "dataset": args.dataset, "data_dir": args.data_dir, "epochs": args.epochs,
        "batch_size": args.batch_size, "lr": args.lr, "warmup_epochs": args.warmup_epochs, "device": args.device,
        "train_subset": args.train_subset or None, "test_subset": args.monitor_subset or None,
        "eval_batch_size": 1000, "channels_last": True,
    })
    base = C.apply(base, C.parse_overrides(args.set))
    runs_dir = out / "runs" / args.name
    jobs = [(base, r, str(runs_dir / "-".join([r[0], r[1].replace(":", "-").replace("@", "-").replace("=", "")
                                                .replace("+", "-"), f"k{r[2]}", f"s{r[3]}"])), args.test_subset or None)
            for r in todo]
    print(f"{len(todo)} runs to train ({len(done)} already in {json_path}), {args.jobs} at a time", flush=True)
    with multiprocessing.get_context("spawn").Pool(args.jobs, initializer=_one_thread) as pool:
        for record in pool.imap_unordered(run_one, jobs):
            doc["runs"].append(record)
            json_path.write_text(json.dumps(doc, indent=2))
            print(f"== {record['fidelity']} {record['method']} K={record['k']} seed {record['seed']}: test accuracy "
                  f"{record['test_accuracy']:.2%} ({record['epoch_time_s']:.0f} s/epoch)", flush=True)
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
    """(fidelity, method, K) -> its runs (one per seed)."""
    out: dict[tuple, list[dict]] = {}
    for r in doc["runs"]:
        out.setdefault((r.get("fidelity", "ours"), r["method"], r["k"]), []).append(r)
    return out


def _cell(runs: list[dict] | None) -> str:
    if not runs:
        return "–"
    mean, sd = _stats([100 * r["test_accuracy"] for r in runs])
    return f"{mean:.2f} ± {sd:.2f}" if len(runs) > 1 else f"{mean:.2f} (1 seed)"


def _delta(runs: list[dict] | None, e2e: list[dict] | None) -> str:
    if not runs or not e2e:
        return ""
    return f"{_stats([100 * r['test_accuracy'] for r in runs])[0] - _stats([100 * r['test_accuracy'] for r in e2e])[0]:+.2f}"


def rows(doc: dict) -> list[tuple[str, int]]:
    """(method, K) in table order: E2E, then by K, then in the order of the setup's methods."""
    order = {m: i for i, m in enumerate(doc["setup"]["methods"])}
    keys = {(m, k) for (_, m, k) in groups(doc)}
    return sorted(keys, key=lambda mk: (mk[1] > 1, "@" in mk[0], mk[1], order.get(mk[0], 99)))


def summarize(doc: dict) -> str:
    setup = doc["setup"]
    g = groups(doc)
    fidelities = setup.get("fidelities", ["ours"])
    lines = [f"Test accuracy (%) on {setup['dataset']} ({setup['test_subset']} test images), {setup['model']}, "
             f"mean ± std over seeds {setup['seeds']}; {setup['epochs']} epochs of {setup['train_subset']} training "
             f"images, batch {setup['batch_size']}, SGD lr {setup['lr']}, warm-up {setup.get('warmup_epochs', 0)} "
             f"epochs; {setup['machine']}; python {setup['python']}, torch {setup['torch']}; {setup['date']}.",
             "", f"Command: `{setup['command']}`", "",
             "| method | K | modules (" + " / ".join(fidelities) + ") | "
             + " | ".join(f"{f}: test acc | {f}: Δ to E2E" for f in fidelities) + " | s/epoch (ours) |",
             "|---|---:|---:|" + "---:|---:|" * len(fidelities) + "---:|"]
    for method, k in rows(doc):
        cells, modules = [], []
        for f in fidelities:
            runs = g.get((f, method, k))
            cells += [_cell(runs), "" if method == "e2e" else _delta(runs, g.get((f, "e2e", 1)))]
            modules.append(str(runs[0]["modules"]) if runs else "–")
        ours = g.get((fidelities[0], method, k)) or []
        secs = f"{statistics.fmean(r['epoch_time_s'] for r in ours):.0f}" if ours else ""
        lines.append(f"| {method} | {k} | {' / '.join(modules)} | {' | '.join(cells)} | {secs} |")
    return "\n".join(lines) + "\n"


def plot(doc: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    g = groups(doc)
    setup = doc["setup"]
    fidelities = setup.get("fidelities", ["ours"])
    local = [m for m in setup["methods"] if m != "e2e" and "@" not in m]
    fig, axes = plt.subplots(1, len(fidelities), figsize=(6.5 * len(fidelities), 4.2), sharey=True, squeeze=False)
    width = 0.8 / max(1, len(setup["ks"]))
    accs = [100 * r["test_accuracy"] for r in doc["runs"]]
    for ax, fidelity in zip(axes[0], fidelities):
        for i, k in enumerate(setup["ks"]):
            xs, means, sds = [], [], []
            for j, m in enumerate(local):
                if (fidelity, m, k) in g:
                    mean, sd = _stats([100 * r["test_accuracy"] for r in g[(fidelity, m, k)]])
                    xs.append(j + (i - (len(setup["ks"]) - 1) / 2) * width)
                    means.append(mean)
                    sds.append(sd)
            ax.bar(xs, means, width, yerr=sds, capsize=3, label=f"K={k}")
        if (fidelity, "e2e", 1) in g:
            mean, sd = _stats([100 * r["test_accuracy"] for r in g[(fidelity, "e2e", 1)]])
            ax.axhline(mean, color="black", linestyle="--", label=f"E2E {mean:.1f} ± {sd:.1f}")
        ax.set_xticks(range(len(local)), local, rotation=30, ha="right")
        ax.set_title(f"fidelity={fidelity}")
        ax.legend(fontsize=8)
    axes[0][0].set_ylabel("test accuracy (%), mean ± std")
    axes[0][0].set_ylim(max(0, min(accs) - 5), min(100, max(accs) + 3))
    fig.suptitle(f"{setup['model']} on {setup['dataset']}: {setup['epochs']} epochs of {setup['train_subset']} "
                 f"images, {len(setup['seeds'])} seeds")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
