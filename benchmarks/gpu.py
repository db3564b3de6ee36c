"""The device check: the accuracy protocol's methods trained on Fashion-MNIST, the memory/time frontier
against activation checkpointing, and memory and speed of E2E, DGL, InfoPro and MAN++, on one GPU.

    benchmarks/gpu.sh                        # call 1 on a GPU: accuracy, then frontier (about 9 minutes)
    benchmarks/gpu.sh --parts speed,sanity   # call 2, where device time remains (about 4 minutes)
    benchmarks/gpu.sh --device cpu --quick --parts accuracy,frontier,speed,sanity   # every part, tiny, on a CPU

Before the first call, on the CPU machine: ``python benchmarks/gpu_accuracy.py --prepare`` (copies
Fashion-MNIST's four files, 30 MB, into ``data/``, which git ignores), and give ``data`` to the device
tool's ``carry``.

Expected wall time per part on one H200 (estimates: no run on a GPU has been made yet), chosen so that
call 1 fits one 10-minute command with a margin:

- accuracy (``gpu_accuracy.py``): 7 runs at once, stopped at a deadline of 330 s, then the report:
  about 6.5 minutes whatever the speed;
- frontier (``frontier.py --device cuda``): about 130 strategies on three settings, 5 steps each of a
  few milliseconds to 0.3 s, plus building 24 models: about 2 minutes;
- speed: 3 settings x 3 modes x 4 methods, each built, warmed up and timed alone, the fast path
  compiled with CUDA graphs: about 4 minutes, mostly compilation;
- sanity: MAN++ on digits for 12 epochs: under a minute.

Each part writes its results as soon as it ends, so a part that runs out of time loses only itself.

Accuracy part: see ``benchmarks/gpu_accuracy.py``; results in
``benchmarks/results/gpu_<device>_accuracy.{json,md,png}``.

Speed part:
For each setting (ResNet-32 K=16 batch 128 at 32 px; ResNet-101 K=4 batch 64 at 224 px; ViT-S K=4
batch 64 at 224 px) and each mode (eager; the fast path, torch.compile per module and head with
mode 'reduce-overhead', i.e. CUDA graphs, on CUDA; bf16 autocast) every method is built alone,
warmed up and timed (InfoPro, a decoder of convolutional maps, is left out on the ViT),
so the CUDA allocator's peaks (``max_memory_allocated``, ``max_memory_reserved``) are its own. The
activation peak (bytes autograd holds, device-independent) and images/s are recorded beside them.
Results go to ``benchmarks/results/gpu_<device>.{json,md}``.

Frontier part: ``benchmarks/frontier.py --device cuda`` (E2E, checkpointing, bf16 and offloaded saved
activations, MAN++ and DGL at K = 2-16), which on CUDA adds the allocator's step peak and its ratio to
the activation tracker; results in ``benchmarks/results/frontier_<device>.{json,md,png}``.

Sanity part: a short accuracy run (MAN++ on the bundled digits). Data is generated or bundled:
nothing is read from the network.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import statistics
import sys
import tempfile
import time
import traceback
from datetime import date
from pathlib import Path

import torch

from manpp.config import trainconfig as C
from manpp.train.build import build_model, data_info, resolve_device
from manpp.memory.measure import format_bytes, measure_step
from manpp.tasks import task_of
from manpp.base.safeio import write_text  # atomic: a run cut short never leaves a half-written result

from devices import device_name, slug  # benchmarks/devices.py, beside this script

HERE = Path(__file__).resolve().parent

# (name, model, K, batch, image side); the quick list runs the same code on tiny ones
SETTINGS = [("resnet32_k16", "resnet32", 16, 128, 32), ("resnet101_k4", "resnet101", 4, 64, 224),
            ("vit_small_k4", "vit_small", 4, 64, 224)]
QUICK_SETTINGS = [("resnet8_k2", "resnet8", 2, 4, 32), ("vit_tiny_k2", "vit_tiny", 2, 2, 32)]
METHODS = ("e2e", "dgl", "infopro", "manpp")
MODES = ("eager", "fast", "bf16")
PARTS = ("accuracy", "frontier", "speed", "sanity")
DEFAULT_PARTS = "accuracy,frontier"  # call 1; the rest where device time remains


def mode_settings(mode: str) -> dict:
    return {"amp": "bf16"} if mode == "bf16" else {}


def compile_options(device: torch.device, quick: bool) -> dict:
    """The fast path's ``torch.compile`` options: CUDA graphs on CUDA; inductor on a CPU; the quick
    check compiles through the same ``compile_parts`` with the cheap 'eager' backend (tracing only)."""
    if device.type == "cuda":
        return {"mode": "reduce-overhead"}
    return {"backend": "eager"} if quick else {}


def supported(model: str, method: str) -> str | None:
    """Why a method does not apply to a backbone (None: it does)."""
    if method == "infopro" and model.startswith("vit_"):
        return "InfoPro's decoder reads convolutional feature maps; ViTs use the class-token head (dgl)"
    return None


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(cfg: C.TrainConfig, method: str, device: torch.device, steps: int, warmup: int,
            compile_with: dict | None = None) -> dict:
    """One method alone: build, warm up, time ``steps`` steps, read the allocator's peaks.
    ``compile_with``: the fast path, ``model.compile_parts(**compile_with)``."""
    run_cfg = dataclasses.replace(cfg, method=method, k=None if method == "e2e" else cfg.k)
    info = data_info(run_cfg)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    model = build_model(run_cfg, info, device)
    x, y = task_of(model.backbone).example_batch(cfg.batch_size, info, device)
    agreement = None
    if compile_with is not None:
        agreement = compare_with_eager(model, compile_with, x, y)
    opt = torch.optim.SGD(model.parameters_to_optimize(), lr=1e-3, momentum=0.9, nesterov=True)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        model.train_step(x, y)
        opt.step()

    started = time.perf_counter()
    for _ in range(warmup):
        step()
    sync(device)
    warmup_s = time.perf_counter() - started
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - start)
    record = {"method": method, "modules": model.k, "fast_vs_eager": agreement, "objective": model.objective, "step_time_s": statistics.median(times),
              "images_per_s": cfg.batch_size / statistics.median(times), "warmup_s": warmup_s,
              "max_memory_allocated": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
              "max_memory_reserved": torch.cuda.max_memory_reserved(device) if device.type == "cuda" else None}
    with model.uncompiled() if compile_with is not None else contextlib.nullcontext():
        record["peak_activation_bytes"] = measure_step(model, x, y).peak_activation_bytes
    del model, opt
    return record


def compare_with_eager(model, options: dict, x, y) -> dict:
    """Compile ``model`` in place, after one step of an eager twin from the same state: the fast
    path's first step must give the same losses and gradients (up to kernel rounding)."""
    import copy

    twin = copy.deepcopy(model)
    eager = twin.train_step(x, y)
    model.compile_parts(**options)
    fast = model.train_step(x, y)
    loss_diff = max(abs(float(a) - float(b)) / max(abs(float(a)), 1e-12) for a, b in zip(eager.losses, fast.losses))
    grads = [(p.grad, q.grad) for p, q in zip(twin.parameters(), model.parameters()) if p.grad is not None]
    num = sum(float((a - b.to(a.dtype)).norm() ** 2) for a, b in grads if b is not None) ** 0.5
    den = sum(float(a.norm() ** 2) for a, _ in grads) ** 0.5
    for p in model.parameters():
        p.grad = None
    del twin
    return {"max_loss_rel_diff": loss_diff, "grad_rel_diff": num / max(den, 1e-12)}


def sanity_run(device: torch.device, quick: bool, out: Path) -> dict:
    """MAN++ (K=16, ResNet-32) on the bundled digits for a short budget: the loss must fall."""
    from manpp.train.loop import train

    settings = {"model": "resnet32", "dataset": "digits", "method": "manpp", "k": 16, "device": str(device),
                "epochs": 1 if quick else 12, "batch_size": 64, "log_every": 0}
    if quick:
        settings.update(model="resnet8", k=2, max_steps=3, train_subset=64, test_subset=64)
    started = time.perf_counter()
    result = train(C.apply(C.TrainConfig(), {**settings, "out": str(out)}), verbose=False, overwrite=True)
    s = result.summary
    return {"settings": settings, "seconds": time.perf_counter() - started, "status": s["status"],
            "test_accuracy": s["test_accuracy"], "best_test_accuracy": s["best_test_accuracy"],
            "first_train_loss": s["history"][0]["train_loss"], "last_train_loss": s["history"][-1]["train_loss"]}


def markdown(doc: dict) -> str:
    lines = [f"# Device check: {doc['device_name']}, {doc['date']}", "",
             f"torch {doc['torch']}; {doc['steps']} timed steps after {doc['warmup']} warm-up steps, each method "
             f"built and run alone; fast = torch.compile per module and head ({doc['fast_path']}). Memory: the "
             f"CUDA allocator's peaks (none on a CPU) and the activation peak (bytes autograd holds).", ""]
    for setting in doc["settings"]:
        lines += [f"## {setting['name']}: {setting['model']}, K={setting['k']}, batch {setting['batch_size']}, "
                  f"{setting['image_size']} px", "",
                  "| mode | method | modules | images/s | vs e2e | max allocated | max reserved | activations | vs e2e "
                  "| fast vs eager (loss, grads) |",
                  "|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
        for mode, records in setting["modes"].items():
            base = next((r for r in records if r.get("method") == "e2e" and "images_per_s" in r), None)
            for r in records:
                if "skipped" in r:
                    continue
                if "error" in r:
                    lines.append(f"| {mode} | {r['method']} | | failed: {r['error'][:80]} | | | | | | |")
                    continue
                speed = f"{r['images_per_s'] / base['images_per_s']:.2f}x" if base else ""
                mem = f"{r['peak_activation_bytes'] / base['peak_activation_bytes']:.2f}x" if base else ""
                fmt = (lambda v: "-" if v is None else format_bytes(v))
                a = r.get("fast_vs_eager")
                agree = "" if a is None else f"{a['max_loss_rel_diff']:.1e}, {a['grad_rel_diff']:.1e}"
                lines.append(f"| {mode} | {r['method']} | {r['modules']} | {r['images_per_s']:.0f} | {speed} | "
                             f"{fmt(r['max_memory_allocated'])} | {fmt(r['max_memory_reserved'])} | "
                             f"{format_bytes(r['peak_activation_bytes'])} | {mem} | {agree} |")
        lines.append("")
    if "accuracy" in doc:
        a = doc["accuracy"]
        lines += ["## Accuracy", "", f"benchmarks/gpu_accuracy.py ran in {a['seconds']:.0f} s (exit code "
                  f"{a['exit_code']}): see gpu_*_accuracy.md beside this file.", ""]
    if "frontier" in doc:
        f = doc["frontier"]
        lines += ["## Frontier", "", f"failed: {f['error']}" if "error" in f else
                  f"benchmarks/frontier.py ran in {f['seconds']:.0f} s: see frontier_*.md beside this file.", ""]
    if "sanity" not in doc:
        return "\n".join(lines)
    s = doc["sanity"]
    lines += ["## Accuracy sanity run", "",
              f"{s['settings']['model']} MAN++ K={s['settings']['k']} on digits, {s['settings']['epochs']} epoch(s), "
              f"{s['seconds']:.0f} s: {s['status']}, test accuracy {s['test_accuracy']:.2%} (best "
              f"{s['best_test_accuracy']:.2%}), train loss {s['first_train_loss']:.3f} -> {s['last_train_loss']:.3f}.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--quick", action="store_true", help="tiny settings, the same code path (under a minute on a CPU)")
    p.add_argument("--steps", type=int, help="timed steps per method and mode (default 10; quick 2)")
    p.add_argument("--warmup", type=int, help="untimed steps first (default 3; quick 1)")
    p.add_argument("--out", default=str(HERE / "results"), help="folder for gpu_<device>.json and .md")
    p.add_argument("--parts", default=DEFAULT_PARTS,
                   help=f"comma-separated parts of {', '.join(PARTS)} (default {DEFAULT_PARTS})")
    p.add_argument("--accuracy-budget-s", type=float, default=330, help="the accuracy part's deadline (seconds)")
    args = p.parse_args(argv)
    parts = [v for v in args.parts.split(",") if v]
    if not parts or set(parts) - set(PARTS):
        p.error(f"unknown part in --parts {args.parts!r}: accepted are {', '.join(PARTS)}")
    device = resolve_device(args.device)
    steps = args.steps or (2 if args.quick else 10)
    warmup = args.warmup or (1 if args.quick else 3)
    started = time.perf_counter()
    doc = {"date": date.today().isoformat(), "device": str(device), "device_name": device_name(device),
           "torch": torch.__version__, "python": sys.version.split()[0], "quick": args.quick, "steps": steps,
           "warmup": warmup, "fast_path": compile_options(device, args.quick), "settings": []}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"gpu_{slug(doc['device_name'])}" + ("_quick" if args.quick else "")
    failed: list[str] = []

    earlier = json.loads((out / f"{stem}.json").read_text()) if (out / f"{stem}.json").exists() else {}
    if earlier.get("device_name") == doc["device_name"]:  # a later call adds its parts to the earlier ones
        kept = {"settings": "speed", "accuracy": "accuracy", "frontier": "frontier", "sanity": "sanity"}
        for key, part in kept.items():
            if part not in parts and key in earlier:
                doc[key] = earlier[key]
    recorded = [p for p in PARTS if p in parts or (earlier.get("device_name") == doc["device_name"]
                                                   and p in earlier.get("parts", []))]

    def write() -> None:  # after every part, so that a part cut short loses only itself
        doc["seconds"] = time.perf_counter() - started
        doc["parts"] = recorded
        write_text(out / f"{stem}.json", json.dumps(doc, indent=2))
        write_text(out / f"{stem}.md", markdown(doc))
        print(f"wrote {out / stem}.json and .md ({doc['seconds']:.0f} s so far)", flush=True)

    if "accuracy" in parts:
        from gpu_accuracy import main as accuracy_main  # benchmarks/gpu_accuracy.py, beside this script

        part_start = time.perf_counter()
        try:
            code = accuracy_main(["--device", str(device), "--out", str(out), "--budget-s",
                                  str(args.accuracy_budget_s)] + (["--quick"] if args.quick else []))
        except SystemExit as exc:  # no data: said in one line; the other parts still run
            print(exc, file=sys.stderr)
            code = 2
        doc["accuracy"] = {"seconds": time.perf_counter() - part_start, "exit_code": code}
        if code:
            failed.append("accuracy")
        write()
    if "speed" in parts:
        for name, model, k, batch, size in (QUICK_SETTINGS if args.quick else SETTINGS):
            doc["settings"].append(speed_setting(name, model, k, batch, size, device, args.quick, steps, warmup))
        failed += [f"{s['name']} {m} {r['method']}" for s in doc["settings"] for m, rs in s["modes"].items()
                   for r in rs if "error" in r]
        write()
    if "frontier" in parts:
        from frontier import main as frontier_main  # benchmarks/frontier.py, beside this script

        part_start = time.perf_counter()
        try:
            frontier_main(["--device", str(device), "--out", str(out)] + (["--quick"] if args.quick else []))
            doc["frontier"] = {"seconds": time.perf_counter() - part_start}
        except Exception as exc:  # noqa: BLE001 - the other parts' results stay
            traceback.print_exc(limit=3)
            doc["frontier"] = {"error": f"{type(exc).__name__}: {exc}"}
            failed.append("frontier")
        write()
    if "sanity" in parts:
        with tempfile.TemporaryDirectory() as tmp:
            doc["sanity"] = sanity_run(device, args.quick, Path(tmp) / "sanity")
        write()
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


def speed_setting(name: str, model: str, k: int, batch: int, size: int, device: torch.device, quick: bool,
                  steps: int, warmup: int) -> dict:
    """Every method alone in every mode on one setting."""
    cfg = C.apply(C.TrainConfig(), {"model": model, "dataset": "synthetic", "image_size": size, "k": k,
                                    "batch_size": batch, "device": str(device)})
    setting = {"name": name, "model": model, "k": k, "batch_size": batch, "image_size": size, "modes": {}}
    for mode in MODES:
        mode_cfg = C.apply(cfg, mode_settings(mode))
        fast = compile_options(device, quick) if mode == "fast" else None
        records = []
        for method in METHODS:
            if supported(model, method) is not None:
                records.append({"method": method, "skipped": supported(model, method)})
                continue
            try:
                records.append(measure(mode_cfg, method, device, steps, warmup, fast))
            except Exception as exc:  # noqa: BLE001 - one failure must not lose the other rows
                records.append({"method": method, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0]}"
                                if str(exc) else type(exc).__name__})
                traceback.print_exc(limit=2)
            r = records[-1]
            print(f"{name} {mode} {method}: " + (r["error"] if "error" in r else f"{r['images_per_s']:.0f} img/s, "
                  f"warm-up {r['warmup_s']:.1f} s"), flush=True)
        setting["modes"][mode] = records
    return setting

if __name__ == "__main__":
    sys.exit(main())
