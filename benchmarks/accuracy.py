"""Accuracy of E2E and the local methods on a real dataset, over seeds: the accuracy protocol.

The default is the protocol whose results the README quotes (``results/accuracy_fashion_mnist_protocol``):
ResNet-32 at K=16 on Fashion-MNIST (offline: Debian's ``dataset-fashion-mnist``), each run 2 epochs of
a random 40,064 training images (313 full batches) drawn from its seed (``subset_order=seeded``: every
method of one seed sees the same images, each seed other ones), so 626 optimizer steps of batch 128
and 80,128 images (the last partial batch of an epoch is dropped, so 40,000 would give 79,872);
SGD lr 0.1 with a 0.1-epoch warm-up and cosine decay. Each run's final model is evaluated on the whole
10,000-image test set. The methods: E2E, DGL, InfoPro, and MAN and MAN++ on each of the two
(``manpp:dgl`` is MAN++ around DGL's heads), 3 seeds. The report gives mean ± std, the gap to E2E, and
for every MAN/MAN++ run the paired difference to its base method seed by seed (the same images, the
same initial backbone), which is what says whether the momentum auxiliary network helps. Every run's
auxiliary networks train at the backbone's lr (``aux_lr_scale=1``, as the protocol was collected):
the default of 2 for InfoPro's heads under every local method, adopted from this protocol's
ablations, is the rows ``infopro@aux_lr_scale=2`` and ``manpp:infopro@aux_lr_scale=2``. Likewise InfoPro's loss
weights go over the modules by each method's own schedule, as the protocol was collected
(``lambda_schedule=auto``: by module under InfoPro, by the stage of the copied unit under MAN/MAN++); the
default of one schedule for every method (``shared``: by module) is the row
``manpp:infopro@heads.lambda_schedule=module`` (MAN on InfoPro's heads by module is not trained yet).

A method is ``NAME[:OBJECTIVE][@KEY=VALUE+KEY=VALUE]``: ``manpp:infopro@ema_momentum=0.99`` is a
variant for ablations (``--variant-ks`` sets its K). One JSON record per run goes to ``--name``.json
as it finishes (re-running skips the runs already there, and continues a run stopped part-way from its last
checkpoint, so the benchmark runs in several sittings);
then a markdown table and a plot. ``--jobs N`` trains N runs at a time, each on ``--threads`` CPU threads
(default 1: on 2 cores, 2 single-thread runs do about 25% more work than one run on two threads; a run
left alone can be continued on more threads to finish sooner); every record keeps its wall time, its
threads and its CPU seconds over all its sittings, and the report sums the CPU hours.

    python benchmarks/accuracy.py                         # the protocol (21 runs, about 5 CPU hours: 2.6 h on 2 cores)
    python benchmarks/accuracy.py --methods manpp:infopro@scale_init=0.5   # an ablation, paired with manpp:infopro
    python benchmarks/accuracy.py --smoke                 # the old tiny budget: 800 images, 3 epochs (a smoke test)
    python benchmarks/accuracy.py --epochs 100 --train-subset 0 --batch-size 128 --jobs 1   # a GPU's budget
"""

from __future__ import annotations

import argparse
import datetime
import fcntl
import json
import multiprocessing
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from devices import cpu_text  # beside this script
from ladder import cpu_seconds  # beside this script
from manpp.config import trainconfig as C
from manpp.train.loop import train
from manpp.base.checkpoint import load as load_checkpoint
from manpp.base.errors import ManppError
from manpp.base.safeio import write_text  # atomic: a run cut short never leaves a half-written result
from manpp.run.rundir import CHECKPOINT, read_summary

HERE = Path(__file__).resolve().parent
DEFAULT_METHODS = "e2e,dgl,infopro,man:dgl,manpp:dgl,man:infopro,manpp:infopro"
# the tiny budget of the earlier table (results/accuracy_fashion_mnist_seeds.*), kept as a smoke test
SMOKE = {"epochs": 3, "train_subset": 800, "monitor_subset": 500, "batch_size": 64, "warmup_epochs": 0.0,
         "ks": "8,16", "fidelities": "ours,release", "subset_order": "random", "name": "accuracy_fashion_mnist_smoke",
         "methods": "e2e,dgl,infopro,predsim,man,manpp,man:dgl,manpp:dgl"}



def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"'{text}' is not a whole number of 1 or more")
    return value


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="fashion-mnist")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--model", default="resnet32")
    p.add_argument("--methods", default=DEFAULT_METHODS,
                   help="methods; METHOD:OBJECTIVE picks the local objective of man/manpp (e.g. manpp:dgl), "
                        "METHOD@KEY=VALUE+KEY=VALUE is a variant with config overrides")
    p.add_argument("--ks", default="16", help="K values for the local methods")
    p.add_argument("--variant-ks", default="16", help="K values for the @variants")
    p.add_argument("--fidelities", default="ours")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--warmup-epochs", type=float, default=0.1)
    p.add_argument("--train-subset", type=int, default=40064, help="training images used (0: all); the default is "
                   "313 full batches of 128, so 2 epochs are 626 steps and 80,128 images")
    p.add_argument("--subset-order", default="seeded", help="which training images: seeded (a random choice per "
                   "seed), random (the same for every seed) or first")
    p.add_argument("--monitor-subset", type=int, default=1000, help="test images evaluated each epoch (0: all)")
    p.add_argument("--test-subset", type=int, default=0, help="test images of the final evaluation (0: all)")
    p.add_argument("--device", default="auto")
    p.add_argument("--jobs", type=_positive, default=2, help="runs trained at a time (default 2)")
    p.add_argument("--threads", type=_positive, default=1, help="CPU threads of each run (default 1)")
    p.add_argument("--name", default="accuracy_fashion_mnist_protocol")
    p.add_argument("--smoke", action="store_true", help="the old tiny budget (800 images, 3 epochs, K=8 and 16, "
                   "both fidelities) as a smoke test, into accuracy_fashion_mnist_smoke")
    p.add_argument("--out", default=str(HERE / "results"))
    p.add_argument("--report-only", action="store_true", help="only rewrite the table and plot from the JSON")
    p.add_argument("set", nargs="*", metavar="key=value", help="extra config overrides for every run")
    args = p.parse_args(argv)
    if args.smoke:
        for key, value in SMOKE.items():
            setattr(args, key, value)
    return args


def _dates(old: str | None, today: datetime.date) -> str:
    """The dates of the runs in the file: the earlier ones, then today's if new."""
    dates = [d for d in (old or "").split(", ") if d]
    return ", ".join(dates + ([today.isoformat()] if today.isoformat() not in dates else []))


def _commands(old: str | None, command: str) -> str:
    """The commands that wrote the file, each once: resuming with the same command adds nothing."""
    commands = [c.strip() for c in [*(old or "").split(";"), command] if c.strip()]
    return "; ".join(dict.fromkeys(commands))


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


def _set_threads(threads: int) -> None:
    torch.set_num_threads(threads)


def as_collected(cfg: C.TrainConfig) -> C.TrainConfig:
    """``cfg`` with InfoPro's heads weighted over the modules as the protocol was collected: by each method's
    own schedule (``lambda_schedule=auto``), where neither the @variant nor ``--set`` chooses one."""
    from manpp.config.resolve import resolve

    if "lambda_schedule" in cfg.objective_settings or resolve(cfg).objective_settings.get("lambda_schedule") is None:
        return cfg  # chosen by the run, or heads without the setting (DGL's, end-to-end)
    return C.apply(cfg, {"heads.lambda_schedule": "auto"})


def run_one(job: tuple) -> dict:
    """Train one run and evaluate its final model on the test set (in a worker process); a run that
    fails or does not finish comes back as ``{"failed": why}`` and is not recorded."""
    try:
        return _run_one(job)
    except Exception as exc:  # noqa: BLE001 - one failed run must not stop the others
        return {"failed": f"{job[1]}: {type(exc).__name__}: {' '.join(str(exc).split())[:300]}"}


def _run_one(job: tuple) -> dict:
    from manpp.train.build import load_data
    from manpp.tasks import task_of

    base, (fidelity, method, k, seed), out, test_subset = job
    name = method_overrides(method)["method"]
    cfg = as_collected(C.apply(base, {**method_overrides(method), "fidelity": fidelity,
                                      "k": None if name == "e2e" else k, "seed": seed, "out": out}))
    started = time.perf_counter()
    threads = torch.get_num_threads()
    earlier = earlier_sitting(Path(out))
    earlier_cpu = earlier_cpu_s(Path(out), earlier)
    result = None
    if earlier is not None:  # an earlier sitting was stopped: continue it from its checkpoint (exact)
        note_sitting(Path(out), earlier[1], earlier_cpu, threads)
        try:
            result = train(cfg, resume=out, verbose=False)
        except ManppError as exc:
            print(f"== {fidelity} {method} K={k} seed {seed}: cannot continue '{out}' ({exc}); training it afresh",
                  flush=True)
            earlier, earlier_cpu = None, 0.0
    if result is None:
        note_sitting(Path(out), 0.0, 0.0, threads)
        result = train(cfg, verbose=False, overwrite=True)  # each job's scratch folder, made again on a rerun
    s = result.summary
    _, test_set, _ = load_data(C.apply(cfg, {"test_subset": test_subset}))  # the final evaluation's test set
    loader = torch.utils.data.DataLoader(test_set, batch_size=cfg.eval_batch_size)
    final = task_of(result.model.backbone).evaluate(result.model, loader, next(result.model.parameters()).device)
    if s["status"] != "finished":  # a diverged or stopped run is never recorded as a result
        return {"failed": f"{fidelity} {method} K={k} seed {seed} ended {s['status']}: not recorded"}
    elapsed = time.perf_counter() - started  # this sitting's wall time
    return {"fidelity": fidelity, "method": method, "objective": result.model.objective, "k": k, "seed": seed,
            "modules": s["modules"], "steps": s["history"][-1]["step"], "images": s["history"][-1]["step"] * cfg.batch_size,
            "wall_s": elapsed + (earlier[1] if earlier else 0.0), "threads": threads,
            "cpu_s": elapsed * threads + earlier_cpu,
            **({"continued_at_step": earlier[0]} if earlier else {}),
            "test_accuracy": final["accuracy"], "test_images": len(test_set),
            "monitor_accuracy": s["test_accuracy"], "epoch_time_s": s["epoch_time_s"],
            "peak_activation_bytes": s["peak_activation_bytes"], "history": s["history"]}


def earlier_sitting(folder: Path) -> tuple[int, float] | None:
    """``(step, seconds of training)`` that an earlier sitting left in a run's scratch folder when it was
    stopped after a checkpoint (a benchmark stopped with its session), else None: such a run continues from
    its checkpoint instead of starting again, and its record's wall time adds the earlier sitting's."""
    summary = read_summary(folder)
    if summary is None or not (folder / CHECKPOINT).exists() or summary.get("status") == "finished":
        return None
    try:
        ckpt = load_checkpoint(folder / CHECKPOINT, purpose="resume")
    except ManppError:
        return None  # unreadable: trained afresh
    partial = ckpt.get("partial") or {}  # the epoch a stop signal cut short: its seconds so far
    history = ckpt.get("history") or []
    return int(ckpt["step"]), sum(row.get("epoch_time_s") or 0.0 for row in history) + float(partial.get("seconds", 0.0))


SITTING = ".sitting.json"  # beside a run's scratch folder (which its training run owns)


def note_sitting(folder: Path, seconds: float, cpu_s: float, threads: int) -> None:
    """Note, beside a run's scratch folder, the seconds of training and the CPU seconds its earlier sittings
    took and the threads this sitting trains on, so that a run continued on other threads counts its CPU time."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    write_text(folder.with_name(folder.name + SITTING),
               json.dumps({"seconds": seconds, "cpu_s": cpu_s, "threads": threads}))


def earlier_cpu_s(folder: Path, earlier: tuple[int, float] | None) -> float:
    """CPU seconds of a run's earlier sittings (0 for a run trained afresh): the seconds noted when the last
    sitting began, plus the seconds it trained times its threads (1 where no note was left: before the note
    existed, every run trained on one thread)."""
    if earlier is None:
        return 0.0
    try:
        last = json.loads(folder.with_name(folder.name + SITTING).read_text())
        return float(last["cpu_s"]) + max(earlier[1] - float(last["seconds"]), 0.0) * int(last["threads"])
    except (OSError, ValueError, KeyError, TypeError):
        return earlier[1]


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
        "command": _commands(old.get("command"), command),
        "dataset": args.dataset, "model": args.model, "epochs": args.epochs, "batch_size": args.batch_size,
        "lr": args.lr, "warmup_epochs": args.warmup_epochs, "train_subset": args.train_subset or "all",
        "subset_order": args.subset_order, "images_per_run": args.epochs * args.train_subset if args.train_subset else None,
        "monitor_subset": args.monitor_subset or "all", "test_subset": args.test_subset or "all",
        "aux_lr_scale": "1 unless the method's @variant sets it",
        "lambda_schedule": "auto (each method's own) unless the method's @variant sets it",
        "seeds": sorted(set(old.get("seeds", [])) | {r[3] for r in planned(args)}),
        "ks": sorted(set(old.get("ks", [])) | {int(k) for k in args.ks.split(",")}),
        "fidelities": old.get("fidelities", []) + [f for f in args.fidelities.split(",")
                                                   if f not in old.get("fidelities", [])],
        "methods": old.get("methods", []) + [m for m in methods if m not in old.get("methods", [])],
        "jobs": args.jobs,
        "machine": cpu_text() + "; "
                   f"{args.jobs} run(s) at a time, {args.threads} thread(s) each (each record keeps its threads)",
        "python": platform.python_version(), "torch": torch.__version__,
        "date": _dates(old.get("date"), datetime.date.today()),
    }
    base = C.apply(C.TrainConfig(), {
        "model": args.model, "dataset": args.dataset, "data_dir": args.data_dir, "epochs": args.epochs,
        "batch_size": args.batch_size, "lr": args.lr, "warmup_epochs": args.warmup_epochs, "device": args.device,
        "train_subset": args.train_subset or None, "test_subset": args.monitor_subset or None,
        "subset_order": args.subset_order,
        "eval_batch_size": 1000, "channels_last": True,
        # every method at the auxiliary lr the protocol was collected with: the default of 2 for InfoPro's
        # heads (adopted from this protocol's ablations) is the rows <method>@aux_lr_scale=2
        "aux_lr_scale": 1.0,
    })
    base = C.apply(base, C.parse_overrides(args.set))
    runs_dir = out / "runs" / args.name
    jobs = [(base, r, str(runs_dir / "-".join([r[0], r[1].replace(":", "-").replace("@", "-").replace("=", "")
                                                .replace("+", "-"), f"k{r[2]}", f"s{r[3]}"])), args.test_subset or None)
            for r in todo]
    print(f"{len(todo)} runs to train ({len(done)} already in {json_path}), {args.jobs} at a time", flush=True)
    with multiprocessing.get_context("spawn").Pool(args.jobs, initializer=_set_threads,
                                                   initargs=(args.threads,)) as pool:
        for record in pool.imap_unordered(run_one, jobs):
            if "failed" in record:
                print(f"== {record['failed']}", flush=True)
                continue
            doc = _add_record(json_path, doc, record)
            report(doc, out, args.name, quiet=True)  # the table and plot as each run lands
            print(f"== {record['fidelity']} {record['method']} K={record['k']} seed {record['seed']}: test accuracy "
                  f"{record['test_accuracy']:.2%} ({record['epoch_time_s']:.0f} s/epoch)", flush=True)
        pool.close()  # let the workers exit on their own: leaving the block terminates them, which can leak a
        pool.join()   # semaphore (a resource_tracker warning at shutdown)
    doc = _add_record(json_path, doc)
    return report(doc, out, args.name)


def _add_record(json_path: Path, doc: dict, record: dict | None = None) -> dict:
    """Add one run's record to the results file, merged with what other writers added since this one
    started (under a lock, reading the file again), so two benchmarks training disjoint runs may share
    one results name; a run already recorded keeps its first record."""
    with open(json_path.with_name(json_path.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        on_disk = json.loads(json_path.read_text())["runs"] if json_path.exists() else []
        runs = list(on_disk)
        keys = {run_key(r) for r in runs}
        for r in doc["runs"] + ([record] if record else []):
            if run_key(r) not in keys:
                runs.append(r)
                keys.add(run_key(r))
        doc = {**doc, "runs": runs}
        write_text(json_path, json.dumps(doc, indent=2))
    return doc


def report(doc: dict, out: Path, name: str, quiet: bool = False) -> int:
    if not doc["runs"]:  # every run of this sitting stopped or failed: nothing to tabulate or plot yet
        table = f"No run of {name} has finished yet (runs stopped part-way continue from their checkpoints).\n"
        write_text(out / f"{name}.md", table)
    else:
        table = summarize(doc)
        write_text(out / f"{name}.md", table)
        plot(doc, out / f"{name}.png")
    if not quiet:
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


def cpu_hours(doc: dict) -> float | None:
    """CPU hours of the recorded runs (None when a record predates the timing)."""
    if not doc["runs"] or any("wall_s" not in r for r in doc["runs"]):
        return None
    return sum(cpu_seconds(r) for r in doc["runs"]) / 3600


def base_methods(method: str, methods: list[str]) -> list[str]:
    """What a run is compared with seed by seed: MAN/MAN++ with the method whose heads they wrap (and
    MAN++ with MAN on the same heads); a variant ``M@...`` with ``M``."""
    if "@" in method:
        return [method.partition("@")[0]]
    name, _, objective = method.partition(":")
    if name not in ("man", "manpp") or not objective:
        return []
    bases = [objective] + ([f"man:{objective}"] if name == "manpp" else [])
    return [b for b in bases if b in methods]


def paired(doc: dict) -> list[dict]:
    """Per (fidelity, method, K, base): the differences method - base of the seeds both ran."""
    g = groups(doc)
    out = []
    for (fidelity, method, k), runs in g.items():
        for base in base_methods(method, doc["setup"]["methods"]):
            other = {r["seed"]: r["test_accuracy"] for r in g.get((fidelity, base, k), [])}
            diffs = {r["seed"]: 100 * (r["test_accuracy"] - other[r["seed"]]) for r in runs if r["seed"] in other}
            if diffs:
                out.append({"fidelity": fidelity, "method": method, "base": base, "k": k,
                            "diffs": dict(sorted(diffs.items()))})
    return sorted(out, key=lambda p: ("@" in p["method"], p["fidelity"], p["k"], p["method"], p["base"]))


def summarize(doc: dict) -> str:
    setup = doc["setup"]
    g = groups(doc)
    fidelities = setup.get("fidelities", ["ours"])
    hours = cpu_hours(doc)
    budget = (f"{setup['epochs']} epochs of {setup['train_subset']} training images "
              f"({setup.get('subset_order', 'random')} subset)")
    lines = [f"Test accuracy (%) on {setup['dataset']} ({setup['test_subset']} test images), {setup['model']}, "
             f"mean ± std over seeds {setup['seeds']}; {budget}, batch {setup['batch_size']}, SGD lr {setup['lr']}, "
             f"warm-up {setup.get('warmup_epochs', 0)} epochs, cosine"
             + (f", aux_lr_scale {setup['aux_lr_scale']}" if "aux_lr_scale" in setup else "")
             + (f", InfoPro's weights by lambda_schedule {setup['lambda_schedule']}" if "lambda_schedule" in setup else "")
             + f"; {setup['machine']}; python {setup['python']}, "
             f"torch {setup['torch']}; {setup['date']}."
             + (f" {len(doc['runs'])} runs, {hours:.1f} CPU hours." if hours is not None else ""),
             "", f"Command: `{setup['command']}`", "",
             "| method | K | modules (" + " / ".join(fidelities) + ") | steps | "
             + " | ".join(f"{f}: test acc | {f}: Δ to E2E" for f in fidelities) + " | s/epoch (ours) |",
             "|---|---:|---:|---:|" + "---:|---:|" * len(fidelities) + "---:|"]
    for method, k in rows(doc):
        cells, modules = [], []
        for f in fidelities:
            runs = g.get((f, method, k))
            cells += [_cell(runs), "" if method == "e2e" else _delta(runs, g.get((f, "e2e", 1)))]
            modules.append(str(runs[0]["modules"]) if runs else "–")
        ours = g.get((fidelities[0], method, k)) or []
        secs = f"{statistics.fmean(r['epoch_time_s'] for r in ours):.0f}" if ours else ""
        steps = str(ours[0]["steps"]) if ours and "steps" in ours[0] else ""
        lines.append(f"| {method} | {k} | {' / '.join(modules)} | {steps} | {' | '.join(cells)} | {secs} |")
    pairs = paired(doc)
    if pairs:
        lines += ["", "Paired differences (points, the same seed: the same training images and initial backbone): "
                  "each MAN/MAN++ run minus its base method's run, and each variant minus its method's.", "",
                  "| method | minus | K | fidelity | per seed | mean ± std | seeds where it helps |",
                  "|---|---|---:|---|---|---:|---:|"]
        for p in pairs:
            values = list(p["diffs"].values())
            mean, sd = _stats(values)
            per_seed = ", ".join(f"{seed}: {d:+.2f}" for seed, d in p["diffs"].items())
            lines.append(f"| {p['method']} | {p['base']} | {p['k']} | {p['fidelity']} | {per_seed} | {mean:+.2f} ± "
                         f"{sd:.2f} | {sum(d > 0 for d in values)} of {len(values)} |")
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
