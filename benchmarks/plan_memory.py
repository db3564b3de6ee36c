"""How the training-step memory of ResNet-101 at 224 px falls with K, against E2E and gradient checkpointing.

For K = 1 (E2E) and K = 2, 4, 8, 16 (MAN++ with memory-balanced splits, as ``manpp plan`` builds
them), measures one training step's activation peak (device-independent measure) and adds the
parameters, gradients and SGD momentum of the backbone and auxiliary networks. Gradient
checkpointing is E2E with ``torch.utils.checkpoint`` over sqrt(n) segments of units (it keeps only
the segment inputs and recomputes each segment in backward, whose activations then count too). Writes ``results/plan_memory.json``,
``.md`` and ``.png``.

    python benchmarks/plan_memory.py [--batch-size 8] [--method manpp] [--objective dgl]
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import platform
import sys
from pathlib import Path

import torch
from torch.utils.checkpoint import checkpoint

from manpp import config as C
from manpp.memory import ActivationTracker, format_bytes, measure_step
from manpp.partition import balanced_ends, unit_activation_bytes
from manpp.tasks import task_of
from manpp.build import build_model, data_info

HERE = Path(__file__).resolve().parent


def checkpointed_peak(model, x, y) -> int:
    """Activation peak of an E2E step with the units checkpointed in sqrt(n) segments."""
    units = list(model.backbone.units)
    segments = max(1, round(math.sqrt(len(units))))
    bounds = [round(i * len(units) / segments) for i in range(segments + 1)]
    tracker = ActivationTracker(list(model.parameters()) + list(model.buffers()))

    def run(a, b):
        def segment(h):
            for u in units[a:b]:
                h = u(h)
            return h
        return segment

    model.train()
    # the reentrant form recomputes each segment with an ordinary forward during backward, so the
    # tracker's hooks see what the recomputation keeps (the non-reentrant form stores it out of sight)
    with tracker:
        h = x.detach().requires_grad_(True)
        for a, b in zip(bounds, bounds[1:]):
            h = checkpoint(run(a, b), h, use_reentrant=True)
        loss = torch.nn.functional.cross_entropy(model.backbone.head(h), y)
        loss.backward()
    model.zero_grad(set_to_none=True)
    return tracker.peak


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="resnet101")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--method", default="manpp")
    p.add_argument("--objective", default="dgl")
    p.add_argument("--ks", default="1,2,4,8,16")
    p.add_argument("--out", default=str(HERE / "results"))
    args = p.parse_args(argv)
    cfg = C.apply(C.TrainConfig(), {"model": args.model, "dataset": "imagenet", "image_size": args.image_size,
                                    "batch_size": args.batch_size, "method": args.method,
                                    "objective": args.objective, "device": "cpu", "lambda_schedule": "constant"})
    info = data_info(cfg)
    torch.manual_seed(0)
    e2e = build_model(dataclasses.replace(cfg, method="e2e", k=1), info)
    x, y = task_of(e2e.backbone).example_batch(args.batch_size, info, torch.device("cpu"))
    per_unit = unit_activation_bytes(e2e.backbone, args.batch_size, info.in_channels, info.image_size)
    rows = []

    def state_bytes(model) -> int:
        return 3 * sum(p.numel() * p.element_size() for p in model.parameters_to_optimize())

    for k in [int(v) for v in args.ks.split(",")]:
        if k == 1:
            model, label = e2e, "e2e"
        else:
            ends = balanced_ends(per_unit, k)
            model = build_model(dataclasses.replace(cfg, k=k, split=[e2e.backbone.unit_names[e] for e in ends]), info)
            label = f"{args.method} ({args.objective})"
        peak = measure_step(model, x, y).peak_activation_bytes
        rows.append({"setup": label, "k": k, "peak_activation_bytes": peak, "state_bytes": state_bytes(model),
                     "split": model.partition.describe(model.backbone.unit_names)})
        print(f"K={k}: {format_bytes(peak)} activations", flush=True)
    peak = checkpointed_peak(e2e, x, y)
    rows.append({"setup": "e2e + gradient checkpointing", "k": 1, "peak_activation_bytes": peak,
                 "state_bytes": state_bytes(e2e), "split": []})
    print(f"checkpointing: {format_bytes(peak)} activations", flush=True)
    doc = {"command": "python benchmarks/plan_memory.py " + " ".join(argv if argv is not None else sys.argv[1:]),
           "machine": f"{platform.machine()} {platform.processor() or 'cpu'}, {torch.get_num_threads()} threads",
           "torch": torch.__version__, "date": datetime.date.today().isoformat(), "model": args.model,
           "batch_size": args.batch_size, "image_size": args.image_size, "unit_activation_bytes": per_unit,
           "rows": rows}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "plan_memory.json").write_text(json.dumps(doc, indent=2))
    base = rows[0]["peak_activation_bytes"]
    lines = [f"{doc['model']} at {doc['image_size']} px, batch {doc['batch_size']}, random data; {doc['machine']}; "
             f"torch {doc['torch']}; {doc['date']}. Activations: bytes autograd holds (device-independent); "
             f"state: parameters + gradients + SGD momentum (backbone and auxiliary networks).", "",
             f"Command: `{doc['command']}`", "",
             "| setup | K | activation peak | vs E2E | state | total |", "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['setup']} | {r['k']} | {format_bytes(r['peak_activation_bytes'])} "
                     f"| {r['peak_activation_bytes'] / base:.2f} | {format_bytes(r['state_bytes'])} "
                     f"| {format_bytes(r['peak_activation_bytes'] + r['state_bytes'])} |")
    table = "\n".join(lines) + "\n"
    (out / "plan_memory.md").write_text(table)
    print(table)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    local = [r for r in rows if r["setup"] not in ("e2e", "e2e + gradient checkpointing")]
    fig, ax = plt.subplots(figsize=(6, 3.8))
    ax.plot([r["k"] for r in local], [r["peak_activation_bytes"] / 2**20 for r in local], marker="o",
            label=f"{args.method} ({args.objective}), memory-balanced split")
    ax.axhline(base / 2**20, color="black", linestyle="--", label="E2E")
    ax.axhline(rows[-1]["peak_activation_bytes"] / 2**20, color="grey", linestyle=":", label="E2E + checkpointing")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("K (modules)")
    ax.set_ylabel(f"activation peak (MiB, batch {args.batch_size})")
    ax.set_title(f"{args.model}, {args.image_size} px")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "plan_memory.png", dpi=120)
    return 0


if __name__ == "__main__":
    sys.exit(main())
