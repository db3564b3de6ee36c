"""Typed run configuration: a dataclass, loadable from YAML, overridable by ``key=value``.

Precedence: defaults < ``-c FILE`` < command-line options < ``key=value`` overrides. The
resolved config is written next to the results (``config.yaml``).

The local objective's own settings live in the nested ``objective_settings`` mapping (each
objective declares them, :mod:`manpp.base.registry`): ``objective_settings.ixx_1=5`` on the command line,
or ``objective_settings: {ixx_1: 5}`` in YAML. The name of earlier versions, ``heads`` (``heads.ixx_1=5``,
``heads: {...}``), and their flat keys (``ixx_1=5``, ``aux_config=1c2f``, ...) keep working and go there.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ..base.distributed import BACKENDS, DEFAULT_TIMEOUT_S, OVERLAP_CHOICES, PARALLEL_MODES
from ..base.errors import ManppError
from ..base.safeio import write_text
from ..base.settings import Number, OneOf, coerce, field_types, positive_int, setting
from ..core.engine import AMP_DTYPES, COMPILE_MODES
from ..core.optim import (AUX_LR_SCALE_RULE, AUX_WARMUP_RULE, LR_RULE, LR_SCHEDULES, LR_UPDATES, OPTIMIZERS,
                          SGD_MOMENTUM_RULE, WEIGHT_DECAY_RULE)
from ..data.options import AUGMENTS, NORMALIZES, SUBSET_ORDERS
from ..memory.recompute import CHECKPOINTING_RULE
from ..memory.saved import SAVED_DTYPES
from ..objectives.methods import LocalSettings
from .fidelity import FIDELITIES

# the flat head settings of earlier versions; each now lives in ``objective_settings`` (and in its objective)
LEGACY_HEAD_KEYS = ("aux_config", "aux_loss", "feature_dim", "widen", "ixx_1", "ixy_1", "ixx_2", "ixy_2",
                    "lambda_schedule")


LOGGERS = ("tensorboard",)  # logger= choices (log.csv is always written; run/runlog.py writes both)

def _model_help() -> str:
    from ..models import model_names

    return (f"backbone (default resnet32): {', '.join(model_names())}; resnet<6n+2> is a CIFAR ResNet of that "
            f"depth; <library>/<name> (timm/<name>, torchvision/<name>) builds any classifier of those libraries "
            f"and cuts it as manpp.wrap does")


def _dataset_help() -> str:
    from ..data import DATASETS

    return (f"default digits: {', '.join(DATASETS.names())} (folder: your own images, one subfolder per class, "
            f"given by --data-dir; imagenet, coco and cityscapes read a folder given by --data-dir; shapes and "
            f"synthetic are generated)")


@dataclass
class TrainConfig(LocalSettings):
    """A run's config: the local settings (:class:`~manpp.objectives.methods.LocalSettings`, inherited, not repeated)
    and everything else, each field declared once with its type, default, rule and help
    (:func:`manpp.base.settings.setting`); validation and the command line read these declarations."""

    # what to train
    model: str = setting("resnet32", help=_model_help, flag="--model", metavar="MODEL")
    dataset: str = setting("digits", help=_dataset_help, flag="--dataset", metavar="DATASET")
    data_dir: str | None = setting(None, flag="--data-dir",
                                   help="where the dataset lives or is downloaded to (default ./data)")
    download: bool = setting(True, help="let torchvision download a missing dataset")
    val_fraction: float = setting(0.1, rule=Number(low=0, high=1, low_open=True, high_open=True,
                                                   meaning="the share of each class held out"),
                                  help="dataset folder with one subfolder per class: the share of each class held "
                                  "out for evaluation (drawn from the seed)")
    classes: Any = setting(None, help="the class names in label order: recorded from the data when a run starts "
                           "(given, the data must have exactly these)")
    image_size: int | None = setting(None, rule=positive_int(True, "the input side in pixels"), flag="--image-size",
                                     help="input side in pixels for the resizable datasets (default: the dataset's "
                                     "own, 224 for imagenet, 32 for synthetic)")
    train_subset: int | None = setting(None, rule=positive_int(True, "training images to use"),
                                       help="use only this many training images (see subset_order)")
    test_subset: int | None = setting(None, rule=positive_int(True, "test images to use"))
    # ours or the authors' release, wherever they differ (manpp.config.fidelity); each switch below left at
    # None follows it
    fidelity: str = setting("ours", rule=OneOf(FIDELITIES), help="ours, or the authors' release wherever they differ")
    subset_order: str | None = setting(None, rule=OneOf(SUBSET_ORDERS, optional=True),
                                       help="'random' (ours: a fixed random subset), 'first' (the first N images) or "
                                       "'seeded' (a random subset drawn from the run's seed: each seed its own)")
    gray_to_rgb: bool | None = setting(None, help="replicate grayscale images to 3 channels (the release; library "
                                       "models)")
    augment: str | None = setting(None, rule=OneOf(AUGMENTS, optional=True),
                                  help="'dataset' (its own), 'release' (the release's recipe for it) or 'off'")
    normalize: str | None = setting(None, rule=OneOf(NORMALIZES, optional=True),
                                    help="'dataset' (its own statistics) or 'release' (the release's for it)")
    drop_last: bool | None = setting(None, help="drop the last partial training batch of each epoch (ours) or train "
                                     "it (the release)")
    # recipe (docs/method.md has the paper's values; the presets, manpp/configs, set them)
    epochs: int = setting(8, rule=positive_int(meaning="training epochs"), flag="--epochs", help="training epochs")
    batch_size: int = setting(64, rule=positive_int(meaning="images per training step"), flag="--batch-size",
                              help="global batch")
    eval_batch_size: int = setting(512, rule=positive_int(meaning="images per evaluation batch"))
    lr: float = setting(0.1, rule=LR_RULE, flag="--lr",
                        help="peak learning rate (warm-up from warmup_lr over warmup_epochs, then cosine)")
    sgd_momentum: float = setting(0.9, rule=SGD_MOMENTUM_RULE)
    nesterov: bool = setting(True, help="SGD's Nesterov momentum")
    weight_decay: float = setting(1e-4, rule=WEIGHT_DECAY_RULE, help="L2 weight decay of every trained parameter")
    warmup_epochs: float = setting(1.0, rule=Number(low=0, meaning="epochs of linear warm-up"))
    warmup_lr: float = setting(0.01, rule=Number(low=0, meaning="the learning rate the warm-up starts from"))
    lr_update: str | None = setting(None, rule=OneOf(LR_UPDATES, optional=True),
                                    help="'step' (ours: the lr is set every step) or 'epoch' (once per epoch, the "
                                    "release)")
    lr_schedule: str = setting("cosine", rule=OneOf(LR_SCHEDULES),
                               help="'cosine', or 'step': lr x0.1 at each fraction of the run in lr_milestones")
    lr_milestones: Any = setting((2 / 3, 8 / 9), help="'step' schedule (the detection recipe: 60k and 80k of 90k "
                                 "iterations)")
    aux_lr_scale: float | None = setting(None, rule=AUX_LR_SCALE_RULE, help="the auxiliary networks' lr over the "
                                         "backbone's (default under fidelity=ours: 2 for infopro's heads under every "
                                         "local method, 1 for dgl's and predsim's; 1 under fidelity=release)")
    aux_warmup_epochs: float = setting(0.0, rule=AUX_WARMUP_RULE, help="epochs at the start in which only the "
                                       "auxiliary networks train (the backbone's lr is 0); local methods only")
    step_in_backward: bool = setting(False, help="the optimizer steps inside the backward passes: each module's "
                                     "parameters (E2E: each parameter) as soon as their gradients are final, which "
                                     "are then freed (gradient memory: one module's, not the network's); exact")
    grad_clip: float | None = setting(None, rule=Number(low=0, low_open=True, optional=True,
                                                        meaning="the largest global gradient norm"))
    pretrained: str | None = setting(None, flag="--pretrained", metavar="FILE", const="library",
                                     help="start from pretrained weights: a state-dict file, or (no value) the "
                                     "library's own weights of a timm/ or torchvision/ model, from its cache on disk "
                                     "or downloaded")
    anchor_base: int | None = setting(None, rule=positive_int(True, "the anchor size at stride 8"),
                                      help="detection: anchor size at stride 8 (None: 32 from 300 px images up, "
                                      "else 8)")
    optimizer: str = setting("sgd", rule=OneOf(OPTIMIZERS), flag="--optimizer",
                             help="sgd (momentum, nesterov) or adamw (adamw_betas, eps 1e-8)")
    adamw_betas: Any = setting((0.9, 0.999), help="AdamW's two moment decays")
    # running
    seed: int = setting(0, rule=Number(low=0, integer=True), flag="--seed", help="seeds the weights, the data order, "
                        "the subsets and the folder split")
    max_steps: int | None = setting(None, rule=positive_int(True, "optimizer steps before stopping"),
                                    flag="--max-steps", help="stop when the run reaches this many optimizer steps; "
                                    "the run is then 'stopped', and --resume continues it (not kept for the "
                                    "resumed call)")
    device: str = setting("auto", flag="--device", help="auto (CUDA when there is one), cpu, cuda or cuda:N")
    workers: int = setting(0, rule=Number(low=0, integer=True, meaning="data-loading processes"))
    channels_last: bool = setting(False, flag="--channels-last", help="NHWC memory format for the model and inputs")
    amp: str | None = setting(None, rule=OneOf(tuple(AMP_DTYPES), optional=True), flag="--amp",
                              help="forward passes under autocast (fp16 adds a GradScaler); default: full precision")
    saved_activations: str | None = setting(None, rule=OneOf(tuple(SAVED_DTYPES), optional=True,
                                                             meaning="the dtype activations are saved in"),
                                            help="'bf16': what autograd saves for backward is stored in bf16")
    checkpointing: str = setting("off", rule=CHECKPOINTING_RULE, flag="--checkpointing",
                                 help="activation checkpointing inside every module (E2E: over all units): 'units' "
                                 "(each unit a segment), 'sqrt' (about sqrt(n) segments) or 'off'; exact gradients, "
                                 "one more forward pass")
    offload_activations: bool = setting(False, help="CUDA: what autograd saves for backward is kept in pinned host "
                                        "memory (exact gradients, two transfers per activation)")
    parallel: str | None = setting(None, rule=OneOf(PARALLEL_MODES, optional=True), flag="--parallel",
                                   help="under torchrun: one pipelined stage of modules per process "
                                   "(update-unlocked); default: data parallel")
    ema_sync_every: int = setting(1, rule=positive_int(meaning="steps between sends of the next stage's first unit"))
    dist_backend: str | None = setting(None, rule=OneOf(BACKENDS, optional=True), flag="--dist-backend",
                                       help="under torchrun (default nccl on CUDA, gloo on CPU)")
    overlap_comm: Any = setting("auto", rule=OneOf(OVERLAP_CHOICES,
                                                   meaning="start each module's all-reduce when its backward ends"))
    dist_timeout: float = setting(DEFAULT_TIMEOUT_S, rule=Number(low=0, low_open=True,
                                                                 meaning="seconds a process waits for the others"))
    compile: bool = setting(False, flag="--compile", help="torch.compile the modules and auxiliary networks (not the "
                            "training loop)")
    compile_mode: str | None = setting(None, rule=OneOf(COMPILE_MODES, optional=True,
                                                        meaning="torch.compile's mode, with compile=true"))
    out: str | None = setting(None, flag="--out", metavar="DIR",
                              help="run folder (default runs/<model>-<dataset>-<method>[-k<K>]); one that holds "
                              "another run is refused unless --overwrite")
    log_every: int = setting(50, rule=Number(low=0, integer=True,
                                             meaning="steps between progress lines when not on a terminal; 0: none"))
    logger: str | None = setting(None, rule=OneOf(LOGGERS, optional=True),
                                 help="'tensorboard' (the tensorboard extra) logs beside log.csv, which is always "
                                 "written")

    def local_settings(self) -> LocalSettings:
        """The local settings of this run, as the model builder takes them."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(LocalSettings)}
        return LocalSettings(**{**values, "objective_settings": dict(self.objective_settings)})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def run_name(self) -> str:
        k = "" if self.method == "e2e" or self.k is None else f"-k{self.k}"
        return f"{self.model.replace('/', '-')}-{self.dataset}-{self.method}{k}"


# fields of one invocation, not of the run: a resumed run does not inherit them from its checkpoint
SESSION_FIELDS = ("out", "max_steps")

# fields that define the model and its training: a checkpoint must agree on them to be resumed
IDENTITY_FIELDS = ("model", "dataset", "method", "objective", "k", "split", "objective_settings", "copy_init",
                   "batch_size", "fidelity", "gray_to_rgb", "normalize", "aux_lr_scale", "aux_warmup_epochs",
                   "scale_lr_scale")
SETTINGS = "objective_settings"
SETTINGS_ALIASES = ("objective_settings", "heads")  # the field, and its name in earlier versions


def apply(cfg: TrainConfig, values: dict[str, Any], source: str = "override") -> TrainConfig:
    """Return ``cfg`` with ``values`` set, each checked against the field's type.

    ``objective_settings.<name>`` (or ``heads.<name>``, dotted) and the flat legacy head keys set one
    entry of the objective's settings; ``objective_settings`` (or ``heads``) given as a mapping is
    merged into the current one.
    """
    types_ = field_types(TrainConfig)
    updates: dict[str, Any] = {}
    settings = dict(cfg.objective_settings)
    for key, value in values.items():
        key = key.replace("-", "_")
        group, dot, sub = key.partition(".")
        if dot:
            if group not in SETTINGS_ALIASES or not sub:
                raise ManppError(f"unknown setting '{key}' in {source}: only 'objective_settings' (also called "
                                 f"'heads') has nested settings (objective_settings.<name>=value)")
            settings[sub] = value
        elif key in LEGACY_HEAD_KEYS:
            settings[key] = value  # the flat key of earlier versions, same meaning
        elif key in SETTINGS_ALIASES:
            if value is None:
                value = {}
            if not isinstance(value, dict):
                raise ManppError(f"bad value {value!r} for '{key}' in {source}: expected a mapping such as "
                                 f"{{ixx_1: 5.0}}, or objective_settings.<name>=value")
            settings.update(value)
        elif key not in types_:
            raise ManppError(f"unknown setting '{key}' in {source}: accepted are {', '.join(types_)} "
                             f"(and objective_settings.<name> for the objective's settings)")
        else:
            updates[key] = coerce(key, value, types_[key])
    return dataclasses.replace(cfg, **updates, objective_settings=settings)


class _Loader(yaml.SafeLoader):
    """YAML as 1.2 reads it: only true/false are booleans. YAML 1.1 (PyYAML's default) also reads
    yes/no/on/off so, which would turn ``augment=off`` or ``checkpointing=off`` into False; a switch
    (a bool setting) still takes yes/no/on/off, as words."""


_Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_Loader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                              list("tTfF"))


def read_yaml(text: str) -> Any:
    """``text`` read as YAML 1.2 reads it (see :class:`_Loader`)."""
    return yaml.load(text, Loader=_Loader)


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a config file, or a shipped preset named without a folder (:mod:`manpp.config.presets`), into a
    dict; a clear error if it is missing or not a YAML mapping."""
    from .presets import config_source

    label, text = config_source(str(path))
    try:
        data = read_yaml(text)
    except yaml.YAMLError as exc:
        line = getattr(getattr(exc, "problem_mark", None), "line", None)
        where = f" (line {line + 1})" if line is not None else ""
        raise ManppError(f"{label} is not valid YAML{where}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ManppError(f"{label} must be a mapping of settings, got {type(data).__name__}")
    return data


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``['lr=0.1', 'split=[0,4]']`` -> ``{'lr': 0.1, 'split': [0, 4]}`` (values read as YAML)."""
    out = {}
    for item in items:
        if "=" not in item:
            raise ManppError(f"bad override '{item}': expected key=value, e.g. lr=0.05")
        key, _, raw = item.partition("=")
        try:
            out[key.strip()] = read_yaml(raw) if raw.strip() else None
        except yaml.YAMLError:
            out[key.strip()] = raw
    return out


def run_config(cfg: TrainConfig) -> TrainConfig:
    """The config of the run itself: the fields of one call (:data:`SESSION_FIELDS`) other than its folder
    are left out, so that resuming with another ``max_steps`` does not rewrite ``config.yaml``."""
    return dataclasses.replace(cfg, **{name: None for name in SESSION_FIELDS if name != "out"})


def config_text(cfg: TrainConfig) -> str:
    """``config.yaml``'s text: every field, in declaration order."""
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


def save_yaml(cfg: TrainConfig, path: str | Path) -> None:
    write_text(path, config_text(cfg))


def from_dict(data: dict[str, Any], source: str = "config") -> TrainConfig:
    return apply(TrainConfig(), data, source)


# the values runs trained with before these fields were written to their config (aux_lr_scale: its
# default was 1 for every method until MAN++'s on InfoPro became 2; scale_lr_scale: 1 before it existed)
PREDATED = {"aux_lr_scale": 1.0, "scale_lr_scale": 1.0}


def saved_config(data: dict[str, Any], source: str = "config") -> TrainConfig:
    """A run's own config as it saved it (checkpoint or ``config.yaml``); a field the run predates gets
    the value it trained with (:data:`PREDATED`), not today's default."""
    return from_dict({**PREDATED, **data}, source)


def check_resumable(cfg: TrainConfig, saved: dict, where: str = "checkpoint") -> None:
    """A checkpoint continues only the run it is from: the fields that define the model must agree."""
    saved_cfg = saved_config(saved, source=where)  # legacy flat keys land in heads, as for cfg
    for name in IDENTITY_FIELDS:
        if getattr(saved_cfg, name) != getattr(cfg, name):
            raise ManppError(f"{where} is from another configuration: {name} is {getattr(saved_cfg, name)!r} "
                             f"there but {getattr(cfg, name)!r} here")
    if saved.get("optimizer", "sgd") != cfg.optimizer:  # its state would not fit (checkpoints before it: sgd)
        raise ManppError(f"{where} is from another configuration: optimizer is {saved.get('optimizer', 'sgd')!r} "
                         f"there but {cfg.optimizer!r} here")


__all__ = ["IDENTITY_FIELDS", "LEGACY_HEAD_KEYS", "PREDATED", "SESSION_FIELDS", "TrainConfig", "apply",
           "check_resumable", "config_text", "from_dict", "load_yaml", "parse_overrides", "run_config", "save_yaml",
           "saved_config"]
