"""The device check's accuracy part: the accuracy protocol's methods trained on Fashion-MNIST on one GPU.

    python benchmarks/gpu_accuracy.py --prepare            # on a CPU machine: copy the data into data/
    benchmarks/gpu.sh --parts accuracy                     # on the GPU machine (carry the data/ folder)
    python benchmarks/gpu_accuracy.py --device cpu --quick # the same code path in about a minute

ResNet-32 at K=16 (E2E: one module) on the whole Fashion-MNIST training set (60,000 images, 15 epochs,
batch 128, SGD lr 0.1, cosine, bf16 autocast and channels-last), each run evaluated on all 10,000
test images after every epoch. The methods are the protocol's (``benchmarks/accuracy.py``): E2E,
DGL, InfoPro, and MAN and MAN++ on each, each at its defaults (MAN++ on InfoPro's heads at twice the
backbone's lr, where the CPU protocol runs every method at 1), one process per (method, seed),
all at once on the one GPU (ResNet-32 is far too small to fill it; every process has its own CPU
thread to launch kernels).

Time: the whole part must fit one call of at most 8 minutes. Every run gets a deadline
(``--budget-s``, default 420 s from the start of the part): at the deadline every run still training
is sent SIGTERM, finishes its step, writes its checkpoint and ends ``stopped``, and the report says
how many epochs each run completed (a stopped run's accuracy is that of its last evaluated epoch, and
is marked so). Expected on one H200 (an estimate: no GPU run has been made yet): process start-up and
data loading about 30 s; E2E at several thousand images/s, so 15 epochs in 2-4 minutes; the local
methods K=16 about 3-5x slower per image (16 modules, each with its auxiliary network), so they may
reach 6-15 epochs in the budget; the report then 30 s. Seeds: ``--seeds 0`` by default (7 processes);
``--seeds 0,1,2`` runs 21 processes at once where the GPU has room (about 2 GB each).

Data: the four .gz files (30 MB) are read from ``--data-dir`` (default ``data``, as ``manpp train``),
where ``--prepare`` copies them from Debian's ``dataset-fashion-mnist`` (``/usr/share/datasets/
fashion-mnist``). ``data/`` is kept out of git: pass it to the device tool's ``carry``. Nothing is
downloaded.

Writes ``results/gpu_<device>_accuracy.{json,md,png}``: per run the test accuracy of every epoch,
the epochs completed, images/s, the activation peak and the CUDA allocator's peak of a measured step.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
METHODS = "e2e,dgl,infopro,man:dgl,manpp:dgl,man:infopro,manpp:infopro"
SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz",
         "t10k-labels-idx1-ubyte.gz")


def raw_dir(data_dir: str | Path) -> Path:
    return Path(data_dir) / "FashionMNIST" / "raw"  # where manpp's Fashion-MNIST loader looks in a data folder


def prepare(data_dir: str | Path) -> Path:
    """Copy the four files from Debian's package into ``data_dir`` (kept out of git) for the GPU machine."""
    target = raw_dir(data_dir)
    missing = [f for f in FILES if not (SYSTEM_DIR / f).is_file()]
    if missing:
        raise SystemExit(f"gpu_accuracy: {SYSTEM_DIR} lacks {', '.join(missing)}: install Debian's "
                         "dataset-fashion-mnist, or copy the four .gz files into " + str(target))
    target.mkdir(parents=True, exist_ok=True)
    for f in FILES:
        if not (target / f).is_file() or (target / f).stat().st_size != (SYSTEM_DIR / f).stat().st_size:
            shutil.copyfile(SYSTEM_DIR / f, target / f)
    return target


def find_data(data_dir: str | Path) -> None:
    """Fail at once, in one line, when the data is neither in ``data_dir`` nor installed."""
    if all((raw_dir(data_dir) / f).is_file() for f in FILES) or all((SYSTEM_DIR / f).is_file() for f in FILES):
        return
    raise SystemExit(f"gpu_accuracy: Fashion-MNIST is not in {raw_dir(data_dir)} nor {SYSTEM_DIR}: run "
                     "`python benchmarks/gpu_accuracy.py --prepare` on a machine that has it, and carry data/")


def run_command(method: str, seed: int, out: Path, args) -> list[str]:
    name, _, objective = method.partition(":")
    settings = [f"method={name}", f"seed={seed}", f"epochs={args.epochs}", f"batch_size={args.batch_size}",
                f"lr={args.lr}", "warmup_epochs=0.1", f"device={args.device}", "log_every=0",
                f"model={args.model}", "dataset=fashion-mnist", "eval_batch_size=1000"]
    if Path(args.data_dir).is_dir():  # else manpp finds Debian's copy itself
        settings.append(f"data_dir={Path(args.data_dir).resolve()}")
    if name != "e2e":
        settings.append(f"k={args.k}")
    if objective:
        settings.append(f"objective={objective}")
    if args.device.startswith("cuda"):
        settings += ["amp=bf16", "channels_last=true"]
    if args.train_subset:
        settings += [f"train_subset={args.train_subset}", "subset_order=seeded"]
    if args.test_subset:
        settings.append(f"test_subset={args.test_subset}")
    return [sys.executable, "-m", "manpp", "train", "--out", str(out), "--overwrite", "--quiet", *settings]


def read_run(folder: Path) -> dict:
    path = folder / "summary.json"
    if not path.is_file():
        return {"status": "no summary (the process failed before its first step)"}
    s = json.loads(path.read_text())
    history = s.get("history") or []
    return {"status": s.get("status"), "epochs_done": len(history), "epochs_planned": s.get("epochs_planned"),
            "test_accuracy": s.get("test_accuracy"), "best_test_accuracy": s.get("best_test_accuracy"),
            "accuracy_per_epoch": [h.get("test_accuracy") for h in history if h.get("complete", True)],
            "images_per_s": s["batch_size"] / s["step_time_s"] if s.get("step_time_s") else None,
            "peak_activation_bytes": s.get("peak_activation_bytes"), "peak_allocated_bytes": s.get("peak_allocated_bytes"),
            "modules": s.get("modules")}


def train_all(args, work: Path) -> list[dict]:
    """Start every (method, seed) at once, stop what still runs at the deadline, read what each left."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT / "src") + os.pathsep
               + os.environ.get("PYTHONPATH", ""))
    jobs = []
    started = time.monotonic()
    for seed in [int(s) for s in args.seeds.split(",")]:
        for method in args.methods.split(","):
            folder = work / f"{method.replace(':', '-')}-s{seed}"
            log = open(work / f"{folder.name}.log", "w")
            proc = subprocess.Popen(run_command(method, seed, folder, args), stdout=log, stderr=subprocess.STDOUT,
                                    env=env, cwd=ROOT)
            jobs.append({"method": method, "seed": seed, "folder": folder, "proc": proc, "log": log})
    print(f"{len(jobs)} runs started; deadline {args.budget_s} s", flush=True)
    deadline = started + args.budget_s
    stopped_at = None
    while any(j["proc"].poll() is None for j in jobs):
        if stopped_at is None and time.monotonic() > deadline:
            stopped_at = time.monotonic() - started
            for j in jobs:
                if j["proc"].poll() is None:
                    j["proc"].send_signal(signal.SIGTERM)  # finishes the step, writes the checkpoint, ends 'stopped'
        if stopped_at is not None and time.monotonic() > deadline + args.grace_s:
            for j in jobs:
                if j["proc"].poll() is None:
                    j["proc"].kill()
        time.sleep(1)
    records = []
    for j in jobs:
        j["log"].close()
        record = {"method": j["method"], "seed": j["seed"], "exit_code": j["proc"].returncode, **read_run(j["folder"])}
        if record["exit_code"] not in (0, 143):
            tail = (work / f"{j['folder'].name}.log").read_text()[-600:]
            record["log_tail"] = tail
        records.append(record)
        print(f"{j['method']} seed {j['seed']}: {record['status']}, {record.get('epochs_done')} epoch(s), "
              f"test accuracy {record.get('test_accuracy')}", flush=True)
    return records


def _pct(v) -> str:
    return "–" if v is None else f"{100 * v:.2f}%"


def markdown(doc: dict) -> str:
    from manpp.memory.measure import format_bytes

    fmt = (lambda v: "–" if v is None else format_bytes(v))
    lines = [f"# Fashion-MNIST on {doc['device_name']}, {doc['date']}", "",
             f"{doc['model']} K={doc['k']} (E2E: one module), {doc['train_images']} training images x {doc['epochs']} "
             f"epochs planned, batch {doc['batch_size']}, lr {doc['lr']}; test accuracy on {doc['test_images']} "
             f"images after every epoch. {len(doc['runs'])} processes at once on the one device, deadline "
             f"{doc['budget_s']} s (runs still training then were stopped: their accuracy is that of their last "
             f"epoch, marked *stopped*). Part wall time {doc['seconds']:.0f} s. torch {doc['torch']}.", "",
             "| method | seed | status | epochs | test acc (last epoch) | best | images/s | activation peak | "
             "allocator peak (a step) |", "|---|---:|---|---:|---:|---:|---:|---:|---:|"]
    for r in doc["runs"]:
        status = r["status"] if r["status"] == "finished" else f"*{r['status']}*"
        speed = "–" if r.get("images_per_s") is None else f"{r['images_per_s']:.0f}"
        lines.append(f"| {r['method']} | {r['seed']} | {status} | {r.get('epochs_done', 0)} | {_pct(r.get('test_accuracy'))} "
                     f"| {_pct(r.get('best_test_accuracy'))} | {speed} | {fmt(r.get('peak_activation_bytes'))} | "
                     f"{fmt(r.get('peak_allocated_bytes'))} |")
    lines += ["", "Test accuracy per epoch:", "", "| method | seed | " + " | ".join(
        str(e + 1) for e in range(doc["epochs"])) + " |", "|---|---:|" + "---:|" * doc["epochs"]]
    for r in doc["runs"]:
        accs = r.get("accuracy_per_epoch") or []
        lines.append(f"| {r['method']} | {r['seed']} | " + " | ".join(
            _pct(accs[e]) if e < len(accs) else "" for e in range(doc["epochs"])) + " |")
    return "\n".join(lines) + "\n"


def plot(doc: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for r in doc["runs"]:
        accs = [a for a in (r.get("accuracy_per_epoch") or []) if a is not None]
        if accs:
            ax.plot(range(1, len(accs) + 1), [100 * a for a in accs], marker=".",
                    label=f"{r['method']} s{r['seed']}", linestyle="-" if r["seed"] == 0 else ":")
    ax.set_xlabel("epoch")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"{doc['model']} on Fashion-MNIST, {doc['device_name']}", fontsize=9)
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prepare", action="store_true", help="copy Debian's Fashion-MNIST files into --data-dir, and stop")
    p.add_argument("--device", default="cuda")
    p.add_argument("--quick", action="store_true", help="tiny settings, the same code path (a test runs it)")
    p.add_argument("--methods", default=METHODS)
    p.add_argument("--seeds", default="0")
    p.add_argument("--model", default="resnet32")
    p.add_argument("--k", type=int, default=16)
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--train-subset", type=int, default=0, help="training images (0: all 60,000)")
    p.add_argument("--test-subset", type=int, default=0, help="test images (0: all 10,000)")
    p.add_argument("--budget-s", type=float, default=420, help="seconds before still-running runs are stopped")
    p.add_argument("--grace-s", type=float, default=45, help="seconds a stopped run has to write its checkpoint")
    p.add_argument("--data-dir", default="data")
    p.add_argument("--out", default=str(HERE / "results"))
    args = p.parse_args(argv)
    if args.prepare:
        print(f"copied into {prepare(args.data_dir)}")
        return 0
    if args.quick:
        args.model, args.k, args.epochs, args.batch_size = "resnet8", 2, 2, 32
        args.train_subset, args.test_subset = args.train_subset or 256, args.test_subset or 200
        args.methods = "e2e,manpp:dgl" if args.methods == METHODS else args.methods
    find_data(args.data_dir)
    sys.path.insert(0, str(ROOT / "src"))
    import torch

    from devices import device_name, slug  # benchmarks/devices.py: one naming of devices and result files
    from manpp.base.safeio import write_text  # atomic: a part cut short never leaves a half-written result

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gpu_accuracy_") as tmp:
        runs = train_all(args, Path(tmp))
    doc = {"date": datetime.date.today().isoformat(), "device": args.device, "device_name": device_name(torch.device(args.device)),
           "torch": torch.__version__, "python": platform.python_version(), "model": args.model, "k": args.k,
           "epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr,
           "train_images": args.train_subset or 60000, "test_images": args.test_subset or 10000,
           "budget_s": args.budget_s, "quick": args.quick, "seconds": time.perf_counter() - started, "runs": runs}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"gpu_{slug(doc['device_name'])}_accuracy" + ("_quick" if args.quick else "")
    write_text(out / f"{stem}.json", json.dumps(doc, indent=2))
    write_text(out / f"{stem}.md", markdown(doc))
    plot(doc, out / f"{stem}.png")
    print(f"wrote {out / stem}.json, .md and .png in {doc['seconds']:.0f} s")
    failed = [f"{r['method']} s{r['seed']}" for r in runs if r["status"] not in ("finished", "stopped")]
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
