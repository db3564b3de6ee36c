"""Typed run configuration: a dataclass, loadable from YAML, overridable by ``key=value``.

Precedence: defaults < ``-c FILE`` < command-line options < ``key=value`` overrides. The
resolved config is written next to the results (``config.yaml``).

The local objective's own settings live in the nested ``heads`` mapping (each objective declares
them, :mod:`manpp.registry`): ``heads.ixx_1=5`` on the command line, or ``heads: {ixx_1: 5}`` in
YAML. The flat keys of earlier versions (``ixx_1=5``, ``aux_config=1c2f``, ...) keep working and
go to ``heads``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .distributed import DEFAULT_TIMEOUT_S
from .errors import ManppError
from .methods import LocalSettings
from .momentum import EMA_MOMENTUM, SCALE_INIT
from .safeio import write_text
from .settings import coerce, field_types

# the flat head settings of earlier versions; each now lives in ``heads`` (and in its objective)
LEGACY_HEAD_KEYS = ("aux_config", "aux_loss", "feature_dim", "widen", "ixx_1", "ixy_1", "ixx_2", "ixy_2",
                    "lambda_schedule")


@dataclass
class TrainConfig:
    # what to train
    model: str = "resnet32"
    dataset: str = "digits"
    data_dir: str | None = None
    download: bool = True
    image_size: int | None = None  # input side in pixels; None: the dataset's own (32 for CIFAR, 224 for imagenet)
    train_subset: int | None = None  # use only this many training images (see subset_order)
    test_subset: int | None = None
    # ours or the authors' release, wherever they differ (manpp.fidelity); each switch below left at
    # None follows it
    fidelity: str = "ours"
    subset_order: str | None = None  # 'random' (ours: a fixed random subset) or 'first' (the first N images)
    gray_to_rgb: bool | None = None  # replicate grayscale images to 3 channels (the release)
    augment: str | None = None  # 'dataset' (its own), 'release' (the release's recipe for it) or 'off'
    normalize: str | None = None  # 'dataset' (its own statistics) or 'release' (the release's for it)
    drop_last: bool | None = None  # drop the last partial training batch of each epoch (ours) or train it
    method: str = "manpp"
    objective: str | None = None  # base objective of man / manpp (see --help); None: the backbone's default
    k: int | None = None  # modules; None: 1 for e2e, else the backbone's default (16 for CIFAR ResNets, else 4)
    split: Any = None  # 'even', 'paper', 'memory' or a list of module end units; None: per fidelity (even)
    # recipe (docs/method.md has the paper's values; the presets, manpp/configs, set them)
    epochs: int = 8
    batch_size: int = 64
    eval_batch_size: int = 512
    lr: float = 0.1
    sgd_momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 1e-4
    warmup_epochs: float = 1.0
    warmup_lr: float = 0.01
    lr_update: str | None = None  # 'step' (ours: the lr is set every step) or 'epoch' (once per epoch, the release)
    lr_schedule: str = "cosine"  # 'cosine', or 'step': lr x0.1 at each fraction of the run in lr_milestones
    lr_milestones: Any = (2 / 3, 8 / 9)  # 'step' schedule (the detection recipe: 60k and 80k of 90k iterations)
    aux_lr_scale: float = 1.0  # the auxiliary networks' lr (learnable copies, scales, heads) over the backbone's
    grad_clip: float | None = None  # clip the global gradient norm (the detection recipe: 1.0)
    pretrained: str | None = None  # a torchvision ResNet state dict file (e.g. ImageNet weights) for the backbone
    anchor_base: int | None = None  # detection: anchor size at stride 8 (None: 32 from 300 px images up, else 8)
    optimizer: str = "sgd"  # 'sgd' (SGD with sgd_momentum, nesterov) or 'adamw' (AdamW with adamw_betas, eps 1e-8)
    adamw_betas: Any = (0.9, 0.999)
    # MAN / MAN++
    ema_momentum: float = EMA_MOMENTUM
    copy_init: str | None = None  # 'copy' (ours) or 'random' (the release)
    scale_init: float = SCALE_INIT  # MAN++: the scale s_j at the start, in [0, 2] (MAN keeps s = 1)
    recompute_ema: Any = "auto"  # true / false / 'auto': recompute the EMA branch in backward where it lowers the peak
    # the objective's own settings, e.g. {'ixx_1': 5.0} (manpp describe --objective X lists them)
    heads: dict = field(default_factory=dict)
    allow_zero_loss: bool | None = None  # train even when the heads' weights leave a module without loss
    # running
    seed: int = 0
    max_steps: int | None = None
    device: str = "auto"  # 'auto', 'cpu' or 'cuda'
    workers: int = 0
    channels_last: bool = False  # NHWC memory format for the model and inputs (faster on CPU and GPU)
    amp: str | None = None  # None, 'bf16' or 'fp16': forward passes under autocast (fp16 adds a GradScaler)
    saved_activations: str | None = None  # 'bf16': what autograd saves for backward is stored in bf16 (half memory)
    parallel: str | None = None  # 'modules': one pipelined stage of modules per torchrun process (update-unlocked)
    ema_sync_every: int = 1  # parallel modules: steps between sends of the next stage's first unit (MAN/MAN++)
    dist_backend: str | None = None  # under torchrun: None picks 'nccl' on CUDA and 'gloo' on CPU
    overlap_comm: Any = "auto"  # torchrun: each module's all-reduce starts when its backward ends; auto: on CUDA
    dist_timeout: float = DEFAULT_TIMEOUT_S  # under torchrun: seconds a process waits in a collective before it fails
    compile: bool = False  # torch.compile the modules and auxiliary networks (not the training loop)
    compile_mode: str | None = None  # with compile: torch.compile's mode, e.g. 'reduce-overhead' (CUDA graphs)
    out: str | None = None
    log_every: int = 50  # not on a terminal: a progress line every this many steps (0: none)
    logger: str | None = None  # 'tensorboard' (the tensorboard extra) logs beside log.csv, which is always written

    def local_settings(self) -> LocalSettings:
        return LocalSettings(method=self.method, k=self.k, split=self.split, objective=self.objective,
                             ema_momentum=self.ema_momentum, copy_init=self.copy_init, scale_init=self.scale_init,
                             recompute_ema=self.recompute_ema, heads=dict(self.heads),
                             allow_zero_loss=bool(self.allow_zero_loss))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def run_name(self) -> str:
        k = "" if self.method == "e2e" or self.k is None else f"-k{self.k}"
        return f"{self.model.replace('/', '-')}-{self.dataset}-{self.method}{k}"


# fields of one invocation, not of the run: a resumed run does not inherit them from its checkpoint
SESSION_FIELDS = ("out", "max_steps")

# fields that define the model and its training: a checkpoint must agree on them to be resumed
IDENTITY_FIELDS = ("model", "dataset", "method", "objective", "k", "split", "heads", "copy_init", "batch_size",
                   "fidelity", "gray_to_rgb", "normalize", "aux_lr_scale")


def apply(cfg: TrainConfig, values: dict[str, Any], source: str = "override") -> TrainConfig:
    """Return ``cfg`` with ``values`` set, each checked against the field's type.

    ``heads.<name>`` (dotted) and the flat legacy head keys set one entry of ``heads``; ``heads``
    given as a mapping is merged into the current one.
    """
    types_ = field_types(TrainConfig)
    updates: dict[str, Any] = {}
    heads = dict(cfg.heads)
    for key, value in values.items():
        key = key.replace("-", "_")
        group, dot, sub = key.partition(".")
        if dot:
            if group != "heads" or not sub:
                raise ManppError(f"unknown setting '{key}' in {source}: only 'heads' has nested settings "
                                 f"(heads.<name>=value)")
            heads[sub] = value
        elif key in LEGACY_HEAD_KEYS:
            heads[key] = value  # the flat key of earlier versions, same meaning
        elif key == "heads":
            if value is None:
                value = {}
            if not isinstance(value, dict):
                raise ManppError(f"bad value {value!r} for 'heads' in {source}: expected a mapping such as "
                                 f"{{ixx_1: 5.0}}, or heads.<name>=value")
            heads.update(value)
        elif key not in types_:
            raise ManppError(f"unknown setting '{key}' in {source}: accepted are {', '.join(types_)} "
                             f"(and heads.<name> for the objective's settings)")
        else:
            updates[key] = coerce(key, value, types_[key])
    return dataclasses.replace(cfg, **updates, heads=heads)


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a config file, or a shipped preset named without a folder (:mod:`manpp.presets`), into a
    dict; a clear error if it is missing or not a YAML mapping."""
    from .presets import config_source

    label, text = config_source(str(path))
    try:
        data = yaml.safe_load(text)
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
            out[key.strip()] = yaml.safe_load(raw) if raw.strip() else None
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


__all__ = ["TrainConfig", "IDENTITY_FIELDS", "SESSION_FIELDS", "LEGACY_HEAD_KEYS", "apply", "config_text", "from_dict", "run_config", "load_yaml",
           "parse_overrides", "save_yaml"]
