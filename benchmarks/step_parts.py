"""Where MAN++'s step loses to E2E's beyond the arithmetic: its step taken apart, part by part.

MAN++ at K=16 does about 4x E2E's arithmetic per step (``manpp.commands.forecast``'s FLOP count), yet
its step takes more than 4x E2E's on a CPU. This script times each part of one MAN++ step on its own
(forward and backward, batch 128, one thread, the module's real input from the example batch) and counts
its FLOPs (``torch.utils.flop_counter``), so each part's rate (GFLOP/s) can be set beside the backbone's:

- ``backbone``: the K modules of the backbone (what E2E runs too), each forward and backward;
- ``learnable copy``: LB_j, the trainable copy of module j+1's first unit, forward and backward;
- ``EMA copy``: EMA_j, forward and input-gradient backward (its weights are frozen), plus the extra
  forward in backward where the module recomputes it (``recompute_ema``, as ``auto`` settles it);
- ``head``: the base method's head on the mixed features (for InfoPro also split into its decoder and
  its classifier), forward and backward;
- ``rest``: the whole MAN++ step minus the parts: the mix ``s LB + (2 - s) EMA`` and its gradient, the
  EMA updates, the engine's bookkeeping, and whatever the parts gain from running alone (a warm cache).

Each part's **excess** is its time minus the time its FLOPs would take at E2E's own rate (E2E's FLOPs
over its step time, measured in the same process): the sum of the excesses is how far MAN++'s step is
from E2E's step times the FLOP ratio. E2E's and MAN++'s whole steps are interleaved (median of
``--steps``); each part is the median of ``--repeats`` calls. Writes ``results/step_parts.{json,md}``.

    python benchmarks/step_parts.py                       # ResNet-32, K=16, InfoPro heads, about 3 minutes
    python benchmarks/step_parts.py --objective dgl       # DGL's heads
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import statistics
import sys
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from devices import cpu_text  # beside this script
from manpp.base.safeio import write_text
from manpp.commands.strategies import (Strategy, build_models, data_info, example_inputs, interleaved_times, settle,
                                       timed)
from manpp.config import trainconfig as C
from manpp.config.resolve import resolve
from manpp.core.engine import LocalContext, primary
from manpp.core.momentum import MomentumAux

HERE = Path(__file__).resolve().parent
CPU = torch.device("cpu")


def median_time(fn, repeats: int) -> float:
    fn()  # warm-up: allocations, oneDNN's primitive cache
    return statistics.median(timed(CPU, fn) for _ in range(repeats))


def flops_of(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def _fresh(t: torch.Tensor) -> torch.Tensor:
    """A leaf copy that asks for its gradient, as a module's detached input does in the step."""
    return t.detach().clone().requires_grad_(True)


def _backward(out) -> None:
    out = primary(out)
    if out.dim() == 0:
        out.backward()
    else:
        out.backward(torch.ones_like(out))


def part_calls(model, x: torch.Tensor, ctx: LocalContext) -> list[tuple[str, str, object]]:
    """(part, sub-part, call) for every piece of one MAN++ step; each call runs forward and backward."""
    inputs, h = [], x
    with torch.no_grad():
        for j in range(model.k):
            inputs.append(h)
            h = model.local_modules[j](h)
    calls = []
    for j in range(model.k):
        module = model.local_modules[j]
        calls.append(("backbone", "", lambda m=module, t=inputs[j], first=j == 0:
                      _backward(m(t if first else _fresh(t)))))
        if j == model.k - 1:
            break
        aux = model.aux[j]
        if not isinstance(aux, MomentumAux):
            raise SystemExit(f"module {j}'s auxiliary network is a {type(aux).__name__}, not MAN/MAN++'s")
        h_j = inputs[j + 1]  # module j's output, the auxiliary network's input

        def copy_input(t=h_j, aux=aux):  # a unit that writes into its input reads a copy, as in the step
            return _fresh(t).clone() if aux.inplace_input else _fresh(t)

        def ema(aux=aux, copy_input=copy_input):
            t = copy_input()
            if aux.recompute_ema is True:
                with torch.no_grad():
                    aux.ema(t)
            _backward(aux.ema(t))

        with torch.no_grad():
            mixed = aux.mix(h_j)
        calls += [("learnable copy", "", lambda aux=aux, copy_input=copy_input: _backward(aux.lb(copy_input()))),
                  ("EMA copy", "", ema),
                  ("head", "", lambda aux=aux, t=mixed: _backward(aux.head(_fresh(t), ctx)))]
        for name in ("decoder", "classifier"):  # InfoPro's two terms, each alone
            part = getattr(aux.head, name, None)
            if part is not None:
                target = ctx.image01 if name == "decoder" else ctx.targets
                calls.append(("head", name, lambda p=part, t=mixed, target=target: _backward(p(_fresh(t), target))))
    return calls


def measure(args) -> dict:
    torch.set_num_threads(args.threads)
    load = os.getloadavg()[0]  # other work on the machine: the parts and the steps share it alike
    base = {"model": args.model, "dataset": args.dataset, "batch_size": args.batch_size, "k": args.k,
            "objective": args.objective, "device": "cpu", "channels_last": True, "method": "manpp"}
    cfg = resolve(C.apply(C.TrainConfig(), base))
    info = data_info(cfg)
    strategies = [Strategy("e2e"), Strategy("manpp", args.k)]
    models = build_models(cfg, strategies, info, "cpu")
    e2e, manpp = (models[(s.method, s.k)]["model"] for s in strategies)
    x, y = example_inputs(cfg, manpp, info, CPU)
    recompute = settle(manpp, strategies[1], x, y, True)
    e2e.train()
    manpp.train()

    def step(run) -> float:
        model, compiled = run
        model.zero_grad(set_to_none=True)
        with contextlib.nullcontext() if compiled else model.uncompiled():
            return timed(CPU, lambda: model.train_step(x, y))

    runs = [(e2e, False), (manpp, False)]
    compiled = {}
    if args.compile:  # torch.compile of every module and auxiliary network (the engine's compile_parts)
        for name, model in (("e2e", e2e), ("manpp", manpp)):
            model.compile_parts()
            compiled[name] = {"compile_s": step((model, True))}  # the first call compiles
            runs.append((model, True))
    times = interleaved_times(runs, step, rounds=args.steps, warmup=2)
    e2e_times, manpp_times = times[0], times[1]
    e2e_s, manpp_s = statistics.median(e2e_times), statistics.median(manpp_times)
    for name, t in zip(compiled, times[2:]):
        compiled[name].update(seconds=statistics.median(t), times_s=t)
    ctx = LocalContext(x, y, manpp.denormalize)
    parts: dict[tuple[str, str], dict] = {}
    with e2e.uncompiled(), manpp.uncompiled():  # the parts are the eager step's
        e2e_flops = flops_of(lambda: e2e.train_step(x, y))
        for part, sub, call in part_calls(manpp, x, ctx):
            entry = parts.setdefault((part, sub), {"part": part, "sub": sub, "seconds": 0.0, "flops": 0, "calls": 0})
            entry["seconds"] += median_time(call, args.repeats)
            entry["flops"] += flops_of(call)
            entry["calls"] += 1
            manpp.zero_grad(set_to_none=True)
    rows = [parts[k] for k in parts]
    whole = [r for r in rows if not r["sub"]]
    manpp_flops = sum(r["flops"] for r in whole)
    flop_ratio = manpp_flops / e2e_flops
    backbone = parts[("backbone", "")]
    rate = backbone["flops"] / backbone["seconds"]  # the backbone's FLOP/s, timed alone as every part is
    e2e_rest = e2e_s - backbone["seconds"]  # what E2E's whole step costs beyond its parts run alone
    rows.append({"part": "rest", "sub": "", "seconds": manpp_s - sum(r["seconds"] for r in whole), "flops": 0,
                 "calls": None})
    for r in rows:
        r["gflop_per_s"] = r["flops"] / r["seconds"] / 1e9 if r["flops"] and r["seconds"] > 0 else None
        # beyond its share of E2E's step: a part's FLOPs at the backbone's rate; the rest, E2E's rest x the FLOP ratio
        r["excess_s"] = r["seconds"] - (e2e_rest * flop_ratio if r["part"] == "rest" else r["flops"] / rate)
    return {"command": "python benchmarks/step_parts.py " + " ".join(args.argv),
            "date": datetime.date.today().isoformat(), "torch": torch.__version__, "machine": cpu_text(),
            "setup": {**base, "threads": args.threads, "steps": args.steps, "repeats": args.repeats,
                      "recompute_ema": recompute}, "load_average": load, "note": args.note,
            "e2e": {"seconds": e2e_s, "flops": e2e_flops, "times_s": e2e_times},
            "manpp": {"seconds": manpp_s, "flops": manpp_flops, "times_s": manpp_times},
            "time_ratio": manpp_s / e2e_s, "flop_ratio": flop_ratio, "excess_s": manpp_s - flop_ratio * e2e_s,
            "compiled": compiled, "backbone_gflop_per_s": rate / 1e9, "e2e_rest_s": e2e_rest, "rows": rows}


def markdown(doc: dict) -> str:
    s, e, m = doc["setup"], doc["e2e"], doc["manpp"]
    ms = lambda sec: f"{1000 * sec:.0f} ms"  # noqa: E731
    lines = [f"# Where MAN++'s step loses to E2E's ({doc['date']})", "",
             f"{s['model']}, {s['dataset']} shape, batch {s['batch_size']}, MAN++ K={s['k']} on {s['objective']}'s "
             f"heads, channels-last fp32, {s['threads']} thread(s); {doc['machine']}; torch {doc['torch']}. "
             f"Measured: whole steps are the median of {s['steps']} interleaved steps, each part the median of "
             f"{s['repeats']} calls, FLOPs counted by `torch.utils.flop_counter`. Modules that recompute the EMA "
             f"branch (`recompute_ema=auto`): {s['recompute_ema']}. Load average when it started: {doc['load_average']:.2f}"
             f"{'; ' + doc['note'] if doc['note'] else ''}. Command: `{doc['command']}`.", "",
             f"**E2E {ms(e['seconds'])} ({e['flops'] / 1e9:.1f} GFLOP, {e['flops'] / e['seconds'] / 1e9:.0f} GFLOP/s); "
             f"MAN++ {ms(m['seconds'])} ({m['flops'] / 1e9:.1f} GFLOP): {doc['time_ratio']:.2f}x the time for "
             f"{doc['flop_ratio']:.2f}x the FLOPs.** E2E's step times the FLOP ratio is "
             f"{ms(doc['flop_ratio'] * e['seconds'])}, so MAN++ spends {ms(doc['excess_s'])} beyond its arithmetic. "
             f"The excess column splits that: a part's time minus its FLOPs at the backbone's rate (the backbone "
             f"timed the same way, alone: {doc['backbone_gflop_per_s']:.0f} GFLOP/s), and for the rest (the whole step "
             f"minus its parts) its time minus E2E's rest ({ms(doc['e2e_rest_s'])}: E2E's step minus its backbone "
             f"alone) times the FLOP ratio. The excesses add up to the total.",
             "", "| part | time | GFLOP | GFLOP/s | excess over its arithmetic |", "|---|---:|---:|---:|---:|"]
    for r in doc["rows"]:
        name = f"&nbsp;&nbsp;of which {r['sub']}" if r["sub"] else r["part"]
        rate = f"{r['gflop_per_s']:.0f}" if r["gflop_per_s"] else "–"
        gflop = f"{r['flops'] / 1e9:.1f}" if r["flops"] else "–"
        lines.append(f"| {name} | {ms(r['seconds'])} | {gflop} | {rate} | {ms(r['excess_s'])} |")
    if doc["compiled"]:
        c = doc["compiled"]
        lines += ["", f"**`torch.compile`** (every module and auxiliary network, interleaved with the eager steps): "
                  f"E2E {ms(c['e2e']['seconds'])} against {ms(e['seconds'])} eager, MAN++ {ms(c['manpp']['seconds'])} "
                  f"against {ms(m['seconds'])} eager ({c['manpp']['seconds'] / c['e2e']['seconds']:.2f}x E2E compiled); "
                  f"compiling took {c['e2e']['compile_s']:.0f} s and {c['manpp']['compile_s']:.0f} s (the first step's time; "
                  f"less where torch's compile cache already holds the graphs from an earlier run)."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="resnet32")
    p.add_argument("--dataset", default="cifar10")
    p.add_argument("--objective", default="infopro")
    p.add_argument("--k", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--steps", type=int, default=7, help="interleaved whole steps of each method")
    p.add_argument("--repeats", type=int, default=5, help="timed calls of each part")
    p.add_argument("--compile", action="store_true", help="also time both steps under torch.compile (the engine's "
                   "compile_parts), interleaved with the eager ones")
    p.add_argument("--note", default="", help="what else ran on the machine, for the report")
    p.add_argument("--name", default="step_parts")
    p.add_argument("--out", default=str(HERE / "results"))
    args = p.parse_args(argv)
    args.argv = list(argv if argv is not None else sys.argv[1:])
    for flag in ("k", "batch_size", "threads", "steps", "repeats"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be at least 1, got {getattr(args, flag)}")
    doc = measure(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / f"{args.name}.json", json.dumps(doc, indent=1))
    text = markdown(doc)
    write_text(out / f"{args.name}.md", text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
