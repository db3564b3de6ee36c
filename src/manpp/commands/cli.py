"""The ``manpp`` command: train, compare, bench, describe, plan, export.

One error boundary for every command: bad input and I/O failures (a full disk, a folder that cannot
be written, a corrupt file) end with one line on stderr (``manpp: error: ...``) and exit status 2;
warnings raised while the input is checked are shown only if the checks pass; a closed stdout (``|
head``) never stops a run; a run stopped by a signal exits with 128 + its number. An unexpected
exception keeps its traceback: that is a bug to report.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import sys
import typing
import warnings

from ..base.console import guard_streams, held_warnings
from ..base.distributed import is_main, rank
from ..base.errors import ManppError
from ..base.registry import method_names
from ..base.safeio import reason_of
from ..base.settings import OneOf, flag_of, help_of, rule_of
from ..config import trainconfig as C
from ..config.validate import check_config
from ..objectives import methods as _methods  # noqa: F401  (registers every method and objective)

# the config fields the command line sets with an option of their own (each field declares its flag)
FLAGGED = [f for f in dataclasses.fields(C.TrainConfig) if flag_of(f)]


def _help(field: dataclasses.Field) -> str:
    text = help_of(field)
    default = field.default if field.default is not dataclasses.MISSING else None
    if default is None or default is False or "default" in text:
        return text
    shown = str(default).lower() if isinstance(default, bool) else default
    return f"default {shown}; {text}" if text else f"default {shown}"


def _add_field_option(p: argparse.ArgumentParser, field: dataclasses.Field) -> None:
    """The option of one config field, from its declaration: type, choices, help, default."""
    hint = typing.get_type_hints(C.TrainConfig)[field.name]
    kind = next((t for t in (bool, int, float) if hint in (t, t | None)), str)
    kwargs: dict = {"dest": field.name, "help": _help(field)}
    if field.metadata.get("const") is not None:
        kwargs.update(nargs="?", const=field.metadata["const"])
    elif kind is bool:
        kwargs.update(action="store_true", default=None)
    else:
        kwargs["type"] = kind
    rule = rule_of(field)
    if isinstance(rule, OneOf) and kind is not bool:
        kwargs["choices"] = [v for v in rule.values if v is not None]
    elif field.metadata.get("metavar"):
        kwargs["metavar"] = field.metadata["metavar"]
    p.add_argument(flag_of(field), **kwargs)


def _add_common(p: argparse.ArgumentParser, *, method: bool = True) -> dict[str, argparse._ArgumentGroup]:
    """The options every command that builds a run takes, in the groups of ``manpp settings``; returns
    the groups (a command adds its own options to them)."""
    from ..config.presets import preset_names
    from .settingslist import GROUPS, group_of

    groups = {name: p.add_argument_group(name) for name in GROUPS}
    config = groups["model and data"]
    config.add_argument("-c", "--config", metavar="FILE",
                        help="YAML config file, or a preset's bare name (see --preset)")
    config.add_argument("--preset", metavar="NAME",
                        help=f"a paper config shipped with manpp: {', '.join(preset_names())}")
    for field in FLAGGED:
        if field.name != "method" or method:
            _add_field_option(groups[group_of(field.name)], field)
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="any other setting, e.g. ema_momentum=0.99 log_every=100 step_in_backward=true, or an "
                   "objective's, e.g. objective_settings.ixx_1=5: manpp settings lists every one with its default "
                   "and meaning")
    return groups


TRAIN_EXAMPLES = """examples:
  manpp train                                        # MAN++ (K=16) on ResNet-32 and the bundled digits
  manpp train --method e2e --epochs 4 --out runs/e2e # end-to-end, into its own run folder
  manpp train --dataset cifar10 --model resnet110 --k 55 --objective dgl
  manpp train --preset cifar10_resnet32_k16_infopro_manpp   # a paper setting
  manpp train --max-steps 100 --out runs/a && manpp train --resume runs/a   # stop, then continue
  manpp train --out runs/a --overwrite               # replace the run in runs/a
  manpp train fidelity=release objective_settings.ixx_1=5 logger=tensorboard
  torchrun --nproc_per_node 2 -m manpp train --batch-size 128   # data parallel
  manpp train --dataset folder --data-dir my_images --image-size 64   # your own images, one folder per class
every other setting (key=value): manpp settings
"""


COMPARE_EXAMPLES = """examples:
  manpp compare                                        # E2E and MAN++ on the bundled digits (the demo)
  manpp compare --methods e2e,dgl,manpp --dataset fashion-mnist --epochs 2 --out runs/cmp --json runs/cmp.json
  manpp compare --methods dgl,manpp --dataset folder --data-dir my_images --image-size 64
"""

BENCH_EXAMPLES = """examples:
  manpp bench --model resnet32 --methods e2e,manpp --batch-size 128        # step time and memory, interleaved
  manpp bench --methods manpp,manpp@saved_activations=bf16 --steps 10      # a setting against the default
"""

DESCRIBE_EXAMPLES = """examples:
  manpp describe --model resnet110 --k 55               # the module table, before any data is read
  manpp describe --model timm/resnet18 --method dgl --k 4 --json
"""

EXPORT_EXAMPLES = """examples:
  manpp export runs/mine --out exported/               # backbone.pt, backbone.safetensors, classes.json
  manpp export runs/mine --out best.pt --best --format pt
"""

SETTINGS_EXAMPLES = """examples:
  manpp settings                     # every setting, by group
  manpp settings lr ema              # the settings whose key holds 'lr' or 'ema'
"""

PREDICT_EXAMPLES = """examples:
  manpp predict runs/mine photos/cat.jpg photos/dogs/      # files and folders, from a run
  manpp predict exported/backbone.safetensors new/ --top 1 # from an export (classes.json beside it)
"""

PLAN_EXAMPLES = """examples:
  manpp plan --model resnet101 --dataset imagenet --batch-size 128 --budget 16GB   # estimated, under a minute
  manpp plan --model resnet101 --dataset imagenet --device cuda --budget 80GB      # for a GPU, from a laptop
  manpp plan --model resnet32 --dataset cifar10 --budget 100MB --measure           # every strategy run for real
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="manpp", description="Supervised local learning with MAN++.")
    parser.add_argument("--version", action="version", version=f"manpp {__import__('manpp').__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="train one method", epilog=TRAIN_EXAMPLES,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    folder = _add_common(p)["run folder and logging"]
    folder.add_argument("--resume", metavar="PATH", help="run folder (or its checkpoint) to continue, in that folder")
    folder.add_argument("--overwrite", action="store_true",
                        help="replace the run already in the run folder (without it, such a folder is refused)")
    folder.add_argument("--quiet", action="store_true", help="no per-epoch lines or progress bar")
    p = sub.add_parser("settings", help="every setting a run takes (key=value), by group: default, accepted "
                       "values, meaning", epilog=SETTINGS_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("names", nargs="*", metavar="NAME", help="only settings whose key contains one of these")
    p.add_argument("--json", action="store_true", help="print them as JSON")
    p = sub.add_parser("compare", help="train several methods with the same recipe and compare them",
                       epilog=COMPARE_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_common(p, method=False)
    p.add_argument("--methods", default="e2e,manpp",
                   help=f"comma-separated methods from {', '.join(method_names())} (default e2e,manpp)")
    p.add_argument("--json", metavar="PATH", help="also write the records to this file")
    p.add_argument("--overwrite", action="store_true", help="replace runs already in OUT/<method>")
    p.add_argument("--quiet", action="store_true", help="no per-epoch lines or progress bars")
    p = sub.add_parser("bench", help="time training steps and measure memory on synthetic data",
                       epilog=BENCH_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_common(p)
    p.add_argument("--methods", help="several methods, interleaved in one process; ratios are to the first; "
                   "method:objective picks the objective of man/manpp (e.g. manpp:dgl)")
    p.add_argument("--steps", type=int, default=20, help="timed steps per method (default 20)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (default 3)")
    p.add_argument("--json", action="store_true", help="write one JSON object to stdout")
    p = sub.add_parser("describe", help="module table: units, parameters, measured activation memory",
                       epilog=DESCRIBE_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_common(p)
    p.add_argument("--json", action="store_true", help="print the table as JSON")
    p = sub.add_parser("plan", help="every way to fit a memory budget (E2E, checkpointing, bf16, local K), "
                       "estimated in seconds (or measured) and ranked fastest first", epilog=PLAN_EXAMPLES,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_common(p)
    p.add_argument("--budget", help="memory per GPU, e.g. 8GB (binary units: 1 GB = 2**30 bytes); default: the "
                   "memory of the GPU --device names, where this machine has it")
    p.add_argument("--max-k", type=int, help="try the local method at K = 2, 4, 8, 16 (and --k) up to this "
                   "(default: the number of units)")
    p.add_argument("--measure", action="store_true", help="run and time every strategy for real on --device "
                   "instead of estimating (minutes to hours at ImageNet sizes)")
    p.add_argument("--rounds", type=int, default=2, help="with --measure: timed steps per strategy, interleaved "
                   "(default 2)")
    p.add_argument("--jobs", type=int, help="processes estimating side by side (default: one per core)")
    p.add_argument("--accuracy", metavar="FILE", help="accuracy result of benchmarks/accuracy.py for the local "
                   "strategies' accuracy cost (default: benchmarks/results/accuracy_fashion_mnist_protocol.json "
                   "where this checkout has it)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p = sub.add_parser("predict", help="the top classes of new images, by name, from a run or an export",
                       epilog=PREDICT_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", metavar="RUN", help="run folder, checkpoint, or exported .pt/.safetensors (with the "
                   "classes.json manpp export writes beside it)")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files, or folders searched for images")
    p.add_argument("--top", type=int, default=3, help="classes shown per image (default 3)")
    p.add_argument("--best", action="store_true", help="the run's best weights (best.pt), not the last")
    p.add_argument("--json", action="store_true", help="one JSON list of {image, top: [{class, label, probability}]}")
    p = sub.add_parser("export", help="write a trained backbone without its auxiliary networks",
                       epilog=EXPORT_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", metavar="RUN", help="run folder or checkpoint file")
    p.add_argument("--out", metavar="PATH", required=True,
                   help="NAME.pt (NAME.safetensors is written beside it) or a folder (backbone.pt, backbone.safetensors)")
    p.add_argument("--best", action="store_true", help="the weights of the best evaluation (best.pt), not the last")
    p.add_argument("--allow-unfinished", action="store_true",
                   help="export a run that did not finish (stopped, diverged, failed or running), with a warning")
    p.add_argument("--allow-nonfinite", action="store_true", help="export weights holding NaN or infinity (a warning)")
    p.add_argument("--force", action="store_true", help="replace files that already exist (never a run's own files)")
    p.add_argument("--format", default=None, help="pt, safetensors or both (pt,safetensors); default: both when "
                   "safetensors is installed, else pt")
    return parser


def resolve_config(args: argparse.Namespace, base: C.TrainConfig | None = None) -> C.TrainConfig:
    cfg = base or C.TrainConfig()
    if getattr(args, "config", None) and getattr(args, "preset", None):
        raise ManppError("give -c FILE or --preset NAME, not both")
    source = getattr(args, "config", None) or getattr(args, "preset", None)
    if source:
        if getattr(args, "preset", None):
            from ..config.presets import preset_text

            preset_text(source)  # a preset name, never a file path: unknown ones are refused here
        cfg = C.apply(cfg, C.load_yaml(source), source=f"config '{source}'")
    given = {f.name: getattr(args, f.name) for f in FLAGGED if getattr(args, f.name, None) is not None}
    cfg = C.apply(cfg, given, source="command line")
    cfg = C.apply(cfg, C.parse_overrides(args.overrides or []), source="overrides")
    check_config(cfg)  # every field, before any work
    return cfg


def cmd_train(args) -> int:
    from ..run.rundir import resume_source
    from ..run.stopsignals import exit_code
    from ..tasks import metric_title
    from ..train.loop import train

    base = None
    if args.resume:  # the run's own config (its checkpoint's, or config.yaml when it never checkpointed)
        base = C.saved_config(resume_source(args.resume)[1], source=f"the run to resume, '{args.resume}'")
        base = dataclasses.replace(base, **{name: None for name in C.SESSION_FIELDS})  # this call's, not the run's
    cfg = resolve_config(args, base)
    result = train(cfg, resume=args.resume, overwrite=args.overwrite, verbose=not args.quiet)
    s = result.summary
    code = exit_code(result.signal) if result.signal else 0
    if not is_main():  # under torchrun only rank 0 reports
        return code
    name = metric_title(s["metric"])
    score = "-" if s["test_score"] is None else f"{s['test_score']:.2%} (best {s['best_test_score']:.2%})"
    export = f"manpp export {shlex.quote(str(result.out))} --out {shlex.quote(str(result.out) + '-export/')}"
    if s["status"] == "finished":
        print(f"done: test {name} {score} after {s['epochs']} epoch(s); results in {result.out}; the trained network "
              f"alone: {export}")
    else:
        print(f"{s['status']}: {s['reason']}; test {name} {score} after {s['epochs']} complete epoch(s) of "
              f"{s['epochs_planned']}; results in {result.out}"
              + (f"; the network as it is: {export}" if max_steps_end(s) else ""))
    return code


def max_steps_end(summary: dict) -> bool:
    """Whether a run stopped where its --max-steps asked (an end the user chose, not a failure)."""
    return summary.get("status") == "stopped" and str(summary.get("reason") or "").startswith("max_steps")


def cmd_compare(args) -> int:
    from .compare import parse_methods, run_compare

    from ..run.stopsignals import exit_code

    methods = parse_methods(args.methods)
    cfg = resolve_config(args)
    records = run_compare(cfg, methods, json_path=args.json, verbose=not args.quiet, overwrite=args.overwrite)
    stopped = next((r.get("signal") for r in records if r.get("signal")), 0)
    return exit_code(stopped) if stopped else 0


def cmd_bench(args) -> int:
    from .bench import bench, format_bench
    from .compare import parse_methods

    cfg = resolve_config(args)
    methods = parse_methods(args.methods, objectives=True) if args.methods else [cfg.method]
    if args.steps < 1 or args.warmup < 0:
        raise ManppError(f"--steps must be at least 1 and --warmup at least 0, got {args.steps} and {args.warmup}")
    records = bench(cfg, methods, steps=args.steps, warmup=args.warmup)
    if args.json:
        print(json.dumps(records[0] if len(records) == 1 else {"results": records}, indent=2))
    else:
        print(format_bench(records))
    return 0


def cmd_describe(args) -> int:
    from .describe import describe

    cfg = resolve_config(args)
    text, data = describe(cfg)
    print(json.dumps(data, indent=2) if args.json else text)
    return 0


def cmd_plan(args) -> int:
    from .plan import format_plan, parse_bytes, plan

    budget = parse_bytes(args.budget) if args.budget is not None else None
    cfg = resolve_config(args)
    result = plan(cfg, budget, max_k=args.max_k, rounds=args.rounds, accuracy=args.accuracy, verbose=not args.json,
                  measured=args.measure, jobs=args.jobs)
    print(json.dumps(result, indent=2) if args.json else format_plan(result))
    return 0 if result["chosen"] is not None else 1


def cmd_settings(args) -> int:
    from .settingslist import all_settings, format_settings

    groups = all_settings()
    if args.names:
        groups = {g: [i for i in items if any(n.lower() in i["key"].lower() for n in args.names)]
                  for g, items in groups.items()}
        groups = {g: items for g, items in groups.items() if items}
        if not groups:
            raise ManppError(f"no setting's key contains {', '.join(repr(n) for n in args.names)}: manpp settings "
                             f"lists them all")
    print(json.dumps(groups, indent=2) if args.json else format_settings(groups), end="" if not args.json else "\n")
    return 0


def cmd_predict(args) -> int:
    from .predict import format_predictions, predict

    rows = predict(args.source, args.images, top=args.top, best=args.best)
    print(json.dumps(rows, indent=2) if args.json else format_predictions(rows))
    return 0


def cmd_export(args) -> int:
    from .export import export_backbone

    formats = tuple(f.strip() for f in args.format.split(",")) if args.format is not None else None
    info = export_backbone(args.checkpoint, args.out, best=args.best, allow_unfinished=args.allow_unfinished,
                           allow_nonfinite=args.allow_nonfinite, force=args.force, formats=formats)
    which = ("best" if info["best"] else "last") + " weights" + ("; the run stopped at its max_steps"
                                                                  if info.get("stopped_by") == "max_steps" else "")
    print(f"wrote {' and '.join(info['paths'])} ({which}): {info['model']} backbone, {info['params']:,} parameters, "
          f"{info['num_classes']} classes; loads with strict=True into {info['loads_into']}; manpp predict "
          f"{info['path']} IMAGES names their classes")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # key=value overrides may come in several places among the options (argparse takes one block)
    stray = [a for a in extra if a.startswith("-") or "=" not in a or not hasattr(args, "overrides")]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        args.overrides = [*(args.overrides or []), *extra]
    guard_streams()  # a reader that goes away (| head) does not stop the command
    warnings.filterwarnings("once", category=UserWarning, module="manpp")
    warnings.formatwarning = lambda message, *_args, **_kw: f"manpp: warning: {message}\n"
    command = {"train": cmd_train, "compare": cmd_compare, "bench": cmd_bench,
               "describe": cmd_describe, "plan": cmd_plan, "predict": cmd_predict, "export": cmd_export,
               "settings": cmd_settings}[args.command]
    try:
        with held_warnings():  # shown once the checks pass (a run's start), dropped if one fails
            return command(args)
    except ManppError as exc:
        return _fail(str(exc), exc.exit_code)
    except OSError as exc:  # an I/O failure not named where it happened: still one line
        return _fail(f"'{exc.filename}': {reason_of(exc)}" if exc.filename else reason_of(exc), 2)
    except KeyboardInterrupt:
        print("manpp: interrupted", file=sys.stderr)
        return 130


def _fail(message: str, code: int) -> int:
    where = "" if is_main() else f"[rank {rank()}] "  # under torchrun every process reports its own error
    print(f"manpp: error: {where}{' '.join(message.split())}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
