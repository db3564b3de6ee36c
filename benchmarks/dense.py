"""Dense tasks on the generated shapes data: memory of K = 4 against E2E, and a short training run.

For detection (RetinaNet) and segmentation (DeepLabV3), measures with ``manpp bench`` the activation
peak and step time of MAN++ K = 4 against E2E (one process, interleaved steps), then trains both
methods for a few epochs on the shapes data and reports COCO AP / mIoU next to chance (AP 0; for
mIoU, predicting background everywhere). Writes ``results/dense_shapes.json``, ``.md`` and ``.png``.

    python benchmarks/dense.py [--epochs 3] [--batch-size 16] [--device cpu]
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
from manpp.train.loop import train
from manpp.base.safeio import write_text  # atomic: a run cut short never leaves a half-written result

HERE = Path(__file__).resolve().parent

TASKS = [  # name, model, metric
    ("detection", "retinanet_resnet50", "map"),
    ("segmentation", "deeplabv3_resnet50", "miou"),
]


def background_miou(test_set) -> float:
    """mIoU of predicting background (class 0) everywhere: the chance level of the segmentation score."""
    from manpp.tasks import confusion_matrix, segmentation_metrics

    confusion = sum(confusion_matrix(torch.zeros_like(mask), mask, test_set.num_classes)
                    for _, mask in (test_set[i] for i in range(len(test_set))))
    return segmentation_metrics(confusion)["miou"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--train-subset", type=int, default=1024)
    p.add_argument("--test-subset", type=int, default=256)
    p.add_argument("--lr", type=float, default=0.02)
    p.add_argument("--bench-steps", type=int, default=3)
    p.add_argument("--tasks", default="detection,segmentation")
    p.add_argument("--detection-model", default="retinanet_resnet50")
    p.add_argument("--segmentation-model", default="deeplabv3_resnet50")
    p.add_argument("--grad-clip", type=float, default=1.0, help="0: no clipping")
    p.add_argument("--name", default="dense_shapes", help="stem of the result files")
    p.add_argument("--out", default=str(HERE / "results"))
    args = p.parse_args(argv)
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "cpu"
    doc = {"command": "python benchmarks/dense.py " + " ".join(argv if argv is not None else sys.argv[1:]),
           "machine": f"{platform.machine()} {device_name}, {torch.get_num_threads()} threads",
           "torch": torch.__version__, "date": datetime.date.today().isoformat(), "settings": vars(args), "tasks": []}
    out = Path(args.out)
    models = {"detection": args.detection_model, "segmentation": args.segmentation_model}
    for task, _, metric in [t for t in TASKS if t[0] in args.tasks.split(",")]:
        model = models[task]
        base = C.apply(C.TrainConfig(), {
            "model": model, "dataset": "shapes", "image_size": args.image_size, "k": 4, "split": "paper",
            "objective": "dgl", "batch_size": args.batch_size, "device": args.device, "epochs": args.epochs,
            "lr": args.lr, "warmup_epochs": 0.25, "warmup_lr": args.lr / 10, "nesterov": False, "grad_clip": args.grad_clip or None,
            "train_subset": args.train_subset, "test_subset": args.test_subset, "eval_batch_size": 64, "seed": 0})
        print(f"== {task}: {model}, memory and step time", flush=True)
        records = bench(base, ["e2e", "manpp"], steps=args.bench_steps, warmup=1)
        entry = {"task": task, "model": model, "metric": metric, "bench": records, "runs": []}
        for method in ("e2e", "manpp"):
            print(f"== {task}: training {method}", flush=True)
            cfg = C.apply(base, {"method": method, "k": 1 if method == "e2e" else 4,
                                 "out": str(out / "runs" / f"{args.name}_{task}_{method}")})
            result = train(cfg, verbose=True, overwrite=True)  # a rerun replaces its scratch runs
            s = result.summary
            entry["runs"].append({"method": method, "modules": s["modules"], "test_score": s["test_score"],
                                  "best_test_score": s["best_test_score"], "test_metrics": s["test_metrics"],
                                  "history": [{"epoch": h["epoch"], "test_score": h["test_score"]} for h in s["history"]],
                                  "step_time_s": s["step_time_s"], "peak_activation_bytes": s["peak_activation_bytes"]})
        if task == "segmentation":
            from manpp.train.build import load_data

            entry["chance"] = background_miou(load_data(base)[1])
        else:
            entry["chance"] = 0.0
        doc["tasks"].append(entry)
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / f"{args.name}.json", json.dumps(doc, indent=2))
    table = to_markdown(doc)
    write_text(out / f"{args.name}.md", table)
    plot(doc, out / f"{args.name}.png")
    print(table)
    return 0


def to_markdown(doc: dict) -> str:
    s = doc["settings"]
    lines = [f"{doc['machine']}; torch {doc['torch']}; {doc['date']}; shapes data at {s['image_size']} px, "
             f"{s['train_subset']} training / {s['test_subset']} test images, {s['epochs']} epochs, batch "
             f"{s['batch_size']}, SGD lr {s['lr']}, gradient clipping {s['grad_clip'] or 'none'}; memory at batch "
             f"{s['batch_size']}.", "",
             f"Command: `{doc['command']}`", "",
             "| task | model | method | modules | activation peak | vs E2E | step time | vs E2E | test score | chance |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for t in doc["tasks"]:
        for rec, run in zip(t["bench"], t["runs"]):
            name = {"map": "AP", "miou": "mIoU"}[t["metric"]]
            lines.append(f"| {t['task']} | {t['model']} | {rec['method']} | {rec['modules']} "
                         f"| {format_bytes(rec['peak_activation_bytes'])} | {rec['activation_ratio']:.2f} "
                         f"| {rec['step_time_s'] * 1000:.0f} ms | {rec['step_time_ratio']:.2f} "
                         f"| {name} {100 * run['test_score']:.1f} | {100 * t['chance']:.1f} |")
    return "\n".join(lines) + "\n"


def plot(doc: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(doc["tasks"]), figsize=(5 * len(doc["tasks"]), 3.6), squeeze=False)
    for ax, t in zip(axes[0], doc["tasks"]):
        for run in t["runs"]:
            ax.plot([h["epoch"] for h in run["history"]], [100 * h["test_score"] for h in run["history"]],
                    marker="o", label=f"{run['method']} (K={run['modules']})")
        ax.axhline(100 * t["chance"], color="grey", linestyle=":", label="chance")
        ax.set_title(f"{t['task']}: {t['model']} on shapes")
        ax.set_xlabel("epoch")
        ax.set_ylabel({"map": "COCO box AP (%)", "miou": "mIoU (%)"}[t["metric"]])
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
