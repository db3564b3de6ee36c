"""Pipelined (update-unlocked) module training against sequential local training and E2E.

Throughput: ResNet-32, DGL-based MAN++ at K = 4, global batch 64, random CIFAR-shaped data; E2E and
sequential local training in one process (all threads), the pipeline with S = 2 and 4 stages as
torchrun CPU processes (gloo) sharing the same cores (threads split between them). Accuracy:
Fashion-MNIST (reduced budget) for sequential training and the 2-stage pipeline with the EMA
source sent every step (exactly sequential training) and every 4th step. Writes
``results/pipeline.json`` and ``.md``.

    python benchmarks/pipeline.py [--steps 24] [--skip-accuracy]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import socket
import subprocess
import sys
from pathlib import Path

import torch

from manpp.base.safeio import write_text  # atomic: a run cut short never leaves a half-written result

HERE = Path(__file__).resolve().parent
CORES = os.cpu_count() or 1


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(out: Path, args: list[str], stages: int | None = None) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(max(1, CORES // (stages or 1))))
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    launcher = [sys.executable, "-m", "manpp"] if stages is None else [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(stages), "--master_addr",
        "127.0.0.1", "--master_port", str(_port()), "-m", "manpp"]
    cmd = [*launcher, "train", "--quiet", "--out", str(out), "device=cpu", *args]
    if stages is not None:
        cmd.append("parallel=modules")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{proc.stderr[-3000:]}")
    return json.loads((out / "summary.json").read_text())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=24)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--skip-accuracy", action="store_true")
    p.add_argument("--out", default=str(HERE / "results"))
    args = p.parse_args(argv)
    runs = Path(args.out) / "runs" / "pipeline"
    common = ["model=resnet32", "dataset=synthetic", f"batch_size={args.batch_size}", "epochs=100",
              f"max_steps={args.steps}", "objective=dgl", "warmup_epochs=0", "eval_batch_size=256", "test_subset=256"]
    throughput = []
    for label, extra, stages in [("e2e", ["method=e2e"], None),
                                 ("sequential manpp (dgl), K=4", ["method=manpp", "k=4"], None),
                                 ("pipeline, 2 stages", ["method=manpp", "k=4"], 2),
                                 ("pipeline, 4 stages", ["method=manpp", "k=4"], 4)]:
        print(f"== {label}", flush=True)
        s = run(runs / label.split(",")[0].replace(" ", "_") / str(stages or 1), common + extra, stages)
        throughput.append({"setup": label, "stages": stages or 1, "step_time_s": s["step_time_s"],
                           "images_per_s": args.batch_size / s["step_time_s"]})
    accuracy = []
    if not args.skip_accuracy:
        acc = ["model=resnet32", "dataset=fashion-mnist", "train_subset=5000", "test_subset=2000", "batch_size=64",
               "epochs=2", "lr=0.1", "warmup_epochs=0", "method=manpp", "objective=dgl", "k=4", "seed=0"]
        for label, extra, stages in [("sequential", [], None), ("pipeline, EMA sync every step", [], 2),
                                     ("pipeline, EMA sync every 4 steps", ["ema_sync_every=4"], 2)]:
            print(f"== accuracy: {label}", flush=True)
            s = run(runs / ("acc_" + label.split(",")[0] + (extra[0] if extra else "")), acc + extra, stages)
            accuracy.append({"setup": label, "test_accuracy": s["test_accuracy"]})
    doc = {"command": "python benchmarks/pipeline.py " + " ".join(argv if argv is not None else sys.argv[1:]),
           "machine": f"{platform.machine()} {platform.processor() or 'cpu'}, {CORES} cores", "torch": torch.__version__,
           "date": datetime.date.today().isoformat(), "throughput": throughput, "accuracy": accuracy}
    out = Path(args.out)
    write_text(out / "pipeline.json", json.dumps(doc, indent=2))
    base = throughput[1]["images_per_s"]
    lines = [f"{doc['machine']}; torch {doc['torch']}; {doc['date']}. ResNet-32, DGL-based MAN++ K=4, global batch "
             f"{args.batch_size}, {args.steps} steps on random CIFAR-shaped data; the stages share the machine's "
             f"{CORES} cores.", "", f"Command: `{doc['command']}`", "",
             "| setup | processes | step time | images/s | vs sequential |", "|---|---:|---:|---:|---:|"]
    for r in throughput:
        lines.append(f"| {r['setup']} | {r['stages']} | {r['step_time_s'] * 1000:.0f} ms | {r['images_per_s']:.0f} "
                     f"| {r['images_per_s'] / base:.2f} |")
    if accuracy:
        lines += ["", "Fashion-MNIST, 5,000 training / 2,000 test images, 2 epochs, batch 64, lr 0.1, seed 0, "
                  "ResNet-32, DGL-based MAN++ K=4:", "", "| setup | test accuracy |", "|---|---:|"]
        lines += [f"| {r['setup']} | {100 * r['test_accuracy']:.2f} |" for r in accuracy]
    table = "\n".join(lines) + "\n"
    write_text(out / "pipeline.md", table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
