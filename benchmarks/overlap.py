"""Overlapped gradient all-reduce (overlap_comm) against one all-reduce at the end, under torchrun.

    torchrun --nproc_per_node 2 benchmarks/overlap.py            # 2 gloo processes on the CPU
    torchrun --nproc_per_node 2 benchmarks/overlap.py --device cuda   # NCCL, one GPU each

Both modes run in the same processes, interleaved round by round on the same batch, so the ratio
compares like with like. Each step is the trainer's: ``model.train_step`` with or without the
per-module ``after_module`` hook, the reduction, the optimizer step. Writes
``benchmarks/results/overlap_<device>_b<batch>.{json,md}`` from rank 0.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from datetime import date
from pathlib import Path

import torch

from manpp.config import trainconfig as C
from manpp.base import distributed as D
from manpp.train.build import build_model, data_info
from manpp.core.optim import build_optimizer, parameter_groups
from manpp.base.safeio import write_text  # atomic: a run cut short never leaves a half-written result

HERE = Path(__file__).resolve().parent


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet32")
    p.add_argument("--method", default="manpp")
    p.add_argument("--k", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=64, help="global batch")
    p.add_argument("--steps", type=int, default=8, help="timed steps per mode and round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process on the CPU")
    p.add_argument("--out", default=str(HERE / "results"))
    p.add_argument("--name", help="results file name (default overlap_<device>[_b<batch>])")
    args = p.parse_args()

    torch.set_num_threads(args.threads)
    device = D.process_device(args.device, D.launch_env())
    D.setup(device)
    world = D.world_size()
    cfg = C.apply(C.TrainConfig(), {"model": args.model, "dataset": "synthetic", "method": args.method, "k": args.k,
                                    "batch_size": args.batch_size, "device": str(device)})
    info = data_info(cfg)
    model = build_model(cfg, info, device)
    D.broadcast_state(model)
    params = model.parameters_to_optimize()
    optimizer = build_optimizer(cfg, parameter_groups(model, cfg, params))
    reducer = D.OverlappedReducer([model.module_parameters(j) for j in range(model.k)], params)
    local = D.check_batch_size(args.batch_size, world)
    g = torch.Generator().manual_seed(D.rank())
    x = torch.randn(local, info.in_channels, info.image_size, info.image_size, generator=g).to(device)
    y = torch.randint(0, info.num_classes, (local,), generator=g).to(device)

    def step(overlap: bool) -> None:
        optimizer.zero_grad(set_to_none=True)
        model.train_step(x, y, after_module=reducer.start if overlap else None)
        if overlap:
            reducer.wait()
        else:
            D.all_reduce_gradients(params)
        optimizer.step()

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        D.barrier()

    for overlap in (False, True):  # warm-up (and the first-step hooks)
        step(overlap)
        step(overlap)
    times: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(args.rounds):
        for overlap in (False, True):
            sync()
            started = time.perf_counter()
            for _ in range(args.steps):
                step(overlap)
            sync()
            times[overlap].append((time.perf_counter() - started) / args.steps)
    if not D.is_main():
        D.shutdown()
        return
    at_end, overlapped = statistics.median(times[False]), statistics.median(times[True])
    grad_bytes = sum(p.numel() * p.element_size() for p in params)
    record = {
        "date": date.today().isoformat(), "machine": f"{platform.machine()}, {torch.get_num_threads()} thread(s) "
        f"per process", "device": str(device), "backend": torch.distributed.get_backend(), "world_size": world,
        "torch": torch.__version__, "model": args.model, "method": args.method, "modules": model.k,
        "global_batch": args.batch_size, "gradient_bytes": grad_bytes, "steps": args.steps, "rounds": args.rounds,
        "step_s_all_reduce_at_end": at_end, "step_s_overlapped": overlapped, "ratio_overlapped_to_end": overlapped / at_end,
        "rounds_s": {"at_end": times[False], "overlapped": times[True]},
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = args.name or f"overlap_{device.type}_b{args.batch_size}"
    write_text(out / f"{name}.json", json.dumps(record, indent=2))
    write_text(out / f"{name}.md",
        f"# Overlapped gradient all-reduce, {record['date']}\n\n"
        f"{world} processes ({record['backend']}, {record['machine']}), torch {record['torch']}; {args.model} "
        f"{args.method} K={model.k}, global batch {args.batch_size}, {grad_bytes / 2**20:.1f} MiB of gradients per "
        f"step; median over {args.rounds} rounds of {args.steps} steps, the two modes interleaved.\n\n"
        f"| all-reduce | step time | vs at the end |\n|---|---:|---:|\n"
        f"| once, after all K backward passes | {at_end * 1e3:.1f} ms | 1.00x |\n"
        f"| per module, started when its backward ends (overlap_comm) | {overlapped * 1e3:.1f} ms | "
        f"{overlapped / at_end:.2f}x |\n")
    print(json.dumps({k: record[k] for k in ("step_s_all_reduce_at_end", "step_s_overlapped",
                                             "ratio_overlapped_to_end")}, indent=2))
    D.shutdown()


if __name__ == "__main__":
    main()
