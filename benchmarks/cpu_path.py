"""The CPU path of the accuracy protocol's step: what makes E2E and MAN++ K=16 faster on this CPU.

ResNet-32 at batch 128, CIFAR shape (the protocol's step on Fashion-MNIST has the same shapes after its
grey-to-3-channel-free 32 px input: one channel instead of three, which changes only the stem), E2E and
MAN++ on InfoPro's heads at K=16, measured with ``manpp bench`` (every variant of one thread count built in
one process, steps interleaved, so ratios come from the same machine conditions), at 1 and 2 threads:

- the protocol's settings (``channels_last=true``, fp32, ``recompute_ema=auto``);
- bf16 autocast (``amp=bf16``), NCHW (``channels_last=false``);
- ``recompute_ema=false`` (keep the EMA branch's activations: one EMA forward less per module) and ``true``;
- ``compile=true`` (``torch.compile`` of every module and head; measured only with ``--compile``: compiling
  31 graphs on 2 cores took over 20 minutes before).

Each variant: median step time over ``--steps`` interleaved steps, its spread (max - min of the steps), and
the MAN++/E2E ratio at the same settings. The FLOP floor of that ratio (the arithmetic alone, from
``manpp.commands.forecast``'s FLOP count of both steps) says how much of MAN++'s step is beyond its arithmetic.
Writes ``results/cpu_path.{json,md}``.

    python benchmarks/cpu_path.py               # about 15 minutes on 2 quiet cores
    python benchmarks/cpu_path.py --steps 5     # quicker, noisier
"""

from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing
import sys
from pathlib import Path

import torch

from devices import cpu_text  # beside this script
from manpp.config import trainconfig as C
from manpp.base.safeio import write_text

HERE = Path(__file__).resolve().parent
BASE = {"model": "resnet32", "dataset": "cifar10", "batch_size": 128, "k": 16, "channels_last": True,
        "objective": "infopro", "device": "cpu"}
VARIANTS = [("protocol (channels-last, fp32)", {}), ("bf16 autocast", {"amp": "bf16"}),
            ("NCHW", {"channels_last": False}), ("recompute_ema=false", {"recompute_ema": False}),
            ("recompute_ema=true", {"recompute_ema": True})]
COMPILED = ("compile", {"compile": True})


def _variant_label(method: str, overrides: dict) -> str:
    return method + ("@" + "+".join(f"{k}={str(v).lower()}" for k, v in overrides.items()) if overrides else "")


def run_threads(job: tuple) -> list[dict]:
    """Every variant at ``threads`` threads, in one process (``manpp bench``), interleaved."""
    threads, steps, variants = job
    torch.set_num_threads(threads)
    from manpp.commands.bench import bench

    labels = []
    for _, overrides in variants:
        labels += [_variant_label("e2e", overrides), _variant_label("manpp", overrides)]
    records = bench(C.apply(C.TrainConfig(), BASE), labels, steps=steps, warmup=2)
    out = []
    for (name, overrides), (e2e, manpp) in zip(variants, zip(records[::2], records[1::2])):
        out.append({"variant": name, "overrides": overrides, "threads": threads,
                    "e2e_s": e2e["step_time_s"], "e2e_spread_s": max(e2e["times_s"]) - min(e2e["times_s"]),
                    "manpp_s": manpp["step_time_s"], "manpp_spread_s": max(manpp["times_s"]) - min(manpp["times_s"]),
                    "ratio": manpp["step_time_s"] / e2e["step_time_s"]})
    return out


def flop_floor() -> dict:
    """MAN++/E2E in FLOPs (the arithmetic alone), from the forecast's count of both steps."""
    from manpp.commands.forecast import estimate
    from manpp.config.resolve import resolve
    from manpp.commands.strategies import Strategy

    cfg = resolve(C.apply(C.TrainConfig(), {**BASE, "method": "manpp"}))
    (e2e, manpp), _ = estimate(cfg, [Strategy("e2e"), Strategy("manpp", 16)], probe=False, progress=False, jobs=1)
    return {"e2e_flops": e2e["flops"], "manpp_flops": manpp["flops"], "ratio": manpp["flops"] / e2e["flops"]}


def markdown(doc: dict) -> str:
    floor = doc["flop_floor"]
    lines = [f"# The CPU path: E2E and MAN++ K=16 step times ({doc['date']})", "",
             f"ResNet-32, batch 128, CIFAR shape; {doc['machine']}; torch {doc['torch']}. Median of {doc['steps']} "
             f"interleaved steps per variant (all variants of one thread count in one process); spread = max - min "
             f"of those steps. Command: `{doc['command']}`.", "",
             f"The arithmetic floor of MAN++/E2E: {floor['ratio']:.2f}x ({floor['manpp_flops'] / 1e9:.1f} against "
             f"{floor['e2e_flops'] / 1e9:.1f} GFLOP per step, counted by `manpp.commands.forecast`).", "",
             "| threads | variant | E2E | spread | MAN++ K=16 | spread | MAN++ / E2E |",
             "|---:|---|---:|---:|---:|---:|---:|"]
    for r in doc["rows"]:
        lines.append(f"| {r['threads']} | {r['variant']} | {1000 * r['e2e_s']:.0f} ms | {1000 * r['e2e_spread_s']:.0f} | "
                     f"{1000 * r['manpp_s']:.0f} ms | {1000 * r['manpp_spread_s']:.0f} | {r['ratio']:.2f}x |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--threads", default="1,2")
    p.add_argument("--compile", action="store_true", help="also torch.compile (slow to compile on a CPU)")
    p.add_argument("--out", default=str(HERE / "results"))
    args = p.parse_args(argv)
    variants = VARIANTS + ([COMPILED] if args.compile else [])
    rows = []
    ctx = multiprocessing.get_context("spawn")
    for threads in [int(t) for t in args.threads.split(",")]:
        with ctx.Pool(1) as pool:  # a fresh process per thread count: the thread pool is set before any work
            rows += pool.apply(run_threads, ((threads, args.steps, variants),))
            pool.close()  # the worker exits on its own rather than being terminated
            pool.join()
        print(f"{threads} thread(s) done", flush=True)
    doc = {"command": "python benchmarks/cpu_path.py " + " ".join(argv if argv is not None else sys.argv[1:]),
           "date": datetime.date.today().isoformat(), "torch": torch.__version__, "steps": args.steps,
           "machine": cpu_text(),
           "flop_floor": flop_floor(), "rows": rows}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / "cpu_path.json", json.dumps(doc, indent=1))
    text = markdown(doc)
    write_text(out / "cpu_path.md", text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
