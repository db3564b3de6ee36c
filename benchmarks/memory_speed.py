"""Memory and step time of the local methods against E2E, measured with ``manpp bench``.

Each setup runs its methods in one process with interleaved steps, so the ratios to E2E are
measured under the same conditions. Writes ``results/memory_speed_<device>.json`` and ``.md``
(suite ``cifar``) or ``results/memory_imagenet_<device>.json`` and ``.md`` (suite ``imagenet``:
ResNet-101 K=4 and ViT-S K=4 at 224 px, batch 8 by default).

    python benchmarks/memory_speed.py [--suite cifar|imagenet] [--device cpu|cuda] [--steps 10]
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
from pathlib import Path

import torch

from manpp.config import trainconfig as C
from manpp.commands.bench import bench
from manpp.memory.measure import format_bytes
from manpp.base.safeio import write_text  # atomic: a run cut short never leaves a half-written result

HERE = Path(__file__).resolve().parent


def plain_decoders(model) -> None:
    """The InfoPro decoders as first written: resize to the image size, then the 3x3 conv."""
    for m in model.modules():
        if hasattr(m, "factored"):
            m.factored = False


CIFAR = [
    # name, config overrides, methods, steps factor[, prepare]
    ("ResNet-32, K=16", {"model": "resnet32", "k": 16},
     ["e2e", "manpp:infopro", "manpp:dgl", "man:infopro", "infopro", "dgl"], 1.0),
    ("ResNet-32, K=16, EMA branch recomputed everywhere (recompute_ema=true)",
     {"model": "resnet32", "k": 16, "recompute_ema": True}, ["e2e", "manpp:infopro", "manpp:dgl"], 1.0),
    ("ResNet-32, K=16, EMA branch kept (recompute_ema=false)", {"model": "resnet32", "k": 16, "recompute_ema": False},
     ["e2e", "manpp:infopro", "manpp:dgl"], 1.0),
    ("ResNet-32, K=16, decoders resize then convolve (before the factored decoder)", {"model": "resnet32", "k": 16},
     ["e2e", "manpp:infopro", "infopro"], 1.0, plain_decoders),
    ("ResNet-32, K=8", {"model": "resnet32", "k": 8}, ["e2e", "manpp:infopro", "manpp:dgl"], 1.0),
    ("ResNet-110, K=55", {"model": "resnet110", "k": 55}, ["e2e", "manpp:infopro", "manpp:dgl"], 0.3),
]
# the paper's ImageNet settings (manpp/configs/imagenet_*): InfoPro+MAN++ on ResNet-101, MAN++ (DGL-style
# class-token head) on ViT-S; 1000 classes
IMAGENET = [
    ("ResNet-101, K=4 (paper split)", {"model": "resnet101", "k": 4, "split": "paper", "lambda_schedule": "constant",
                                       "ixx_1": 5.0, "ixy_1": 0.75},
     ["e2e", "infopro", "manpp:infopro"], 0.3),
    ("ViT-S/16, K=4 (paper split)", {"model": "vit_small", "k": 4, "split": "paper"}, ["e2e", "dgl", "manpp:dgl"], 0.3),
]
SUITES = {"cifar": (CIFAR, "cifar10", 128, "memory_speed", "3x32x32 (CIFAR-10 shape), random data"),
          "imagenet": (IMAGENET, "imagenet", 8, "memory_imagenet", "3x224x224 (ImageNet shape, 1000 classes), "
                                                                  "random data")}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--suite", choices=sorted(SUITES), default="cifar")
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch-size", type=int, help="default 128 (cifar) or 8 (imagenet)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--out", default=str(HERE / "results"))
    args = p.parse_args(argv)
    setups, dataset, batch_size, name, shape = SUITES[args.suite]
    args.batch_size = args.batch_size or batch_size
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "cpu"
    doc = {
        "command": "python benchmarks/memory_speed.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": f"{platform.machine()} {device_name}, {torch.get_num_threads()} threads",
        "python": platform.python_version(), "torch": torch.__version__, "date": datetime.date.today().isoformat(),
        "batch_size": args.batch_size, "input": shape, "setups": [],
    }
    for setup, overrides, methods, factor, *prepare in setups:
        cfg = C.apply(C.TrainConfig(), {"dataset": dataset, "batch_size": args.batch_size, "device": args.device,
                                        **overrides})
        steps = max(2, round(args.steps * factor))
        print(f"== {setup} ({steps} steps)", flush=True)
        records = bench(cfg, methods, steps=steps, warmup=2 if factor == 1.0 else 1,
                        prepare=prepare[0] if prepare else None)
        doc["setups"].append({"name": setup, "overrides": overrides, "steps": steps, "records": records})
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{name}_{'cuda' if args.device.startswith('cuda') else 'cpu'}"
    write_text(out / f"{stem}.json", json.dumps(doc, indent=2))
    table = to_markdown(doc)
    write_text(out / f"{stem}.md", table)
    print(table)
    return 0


def _modules_text(modules: list[int] | None) -> str:
    """[0, 1, 2, 5] -> '0-2, 5'; None (no EMA branch) -> '-'."""
    if modules is None:
        return "-"
    if not modules:
        return "none"
    runs, start = [], modules[0]
    for prev, cur in zip(modules, modules[1:] + [None]):
        if cur != prev + 1:
            runs.append(str(start) if start == prev else f"{start}-{prev}")
            start = cur
    return ", ".join(runs)


def to_markdown(doc: dict) -> str:
    lines = [f"{doc['machine']}; torch {doc['torch']}; {doc['date']}; batch {doc['batch_size']}, {doc['input']}; "
             f"median step time over the timed steps; ratios to E2E measured in the same process.", "",
             f"Command: `{doc['command']}`", "",
             "| setup | method | objective | modules | EMA recomputed in | activation peak | vs E2E | step time "
             "| vs E2E | images/s | allocator peak |",
             "|---|---|---|---:|---|---:|---:|---:|---:|---:|---:|"]
    for setup in doc["setups"]:
        for r in setup["records"]:
            lines.append(f"| {setup['name']} | {r['method']} | {r['objective'] or '-'} | {r['modules']} "
                         f"| {_modules_text(r.get('ema_recomputed_in_modules'))} "
                         f"| {format_bytes(r['peak_activation_bytes'])} | {r['activation_ratio']:.2f} "
                         f"| {r['step_time_s'] * 1000:.0f} ms | {r['step_time_ratio']:.2f} | {r['images_per_s']:.0f} "
                         f"| {format_bytes(r['peak_allocated_bytes'])} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
