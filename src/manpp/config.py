"""Typed run configuration: a flat dataclass, loadable from YAML, overridable by ``key=value``.

Precedence: defaults < ``-c FILE`` < command-line options < ``key=value`` overrides. The
resolved config is written next to the results (``config.yaml``).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Union

import yaml

from .errors import ManppError
from .methods import LocalSettings
from .objectives import ObjectiveConfig


@dataclass
class TrainConfig:
    # what to train
    model: str = "resnet32"
    dataset: str = "digits"
    data_dir: str | None = None
    download: bool = True
    image_size: int | None = None  # input side in pixels; None: the dataset's own (32 for CIFAR, 224 for imagenet)
    train_subset: int | None = None  # use only this many training images (a fixed random subset)
    test_subset: int | None = None
    method: str = "manpp"
    objective: str = "infopro"  # base objective of man / manpp: 'dgl' or 'infopro'
    k: int | None = None  # modules; None: 1 for e2e, else min(16, units)
    split: Any = "even"  # 'even', 'paper' or a list of module end units
    # recipe (METHOD.md section 4 has the paper values; see configs/)
    epochs: int = 8
    batch_size: int = 64
    eval_batch_size: int = 512
    lr: float = 0.1
    sgd_momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 1e-4
    warmup_epochs: float = 1.0
    warmup_lr: float = 0.01
    lr_schedule: str = "cosine"  # 'cosine', or 'step': lr x0.1 at each fraction of the run in lr_milestones
    lr_milestones: Any = (2 / 3, 8 / 9)  # 'step' schedule (the detection recipe: 60k and 80k of 90k iterations)
    grad_clip: float | None = None  # clip the global gradient norm (the detection recipe: 1.0)
    pretrained: str | None = None  # a torchvision ResNet state dict file (e.g. ImageNet weights) for the backbone
    anchor_base: int | None = None  # detection: anchor size at stride 8 (None: 32 from 300 px images up, else 8)
    optimizer: str = "sgd"  # 'sgd' (SGD with sgd_momentum, nesterov) or 'adamw' (AdamW with adamw_betas, eps 1e-8)
    adamw_betas: Any = (0.9, 0.999)
    # MAN / MAN++
    ema_momentum: float = 0.995
    copy_init: str = "copy"  # 'copy' (ours) or 'random' (the release)
    recompute_ema: Any = "auto"  # true / false / 'auto': recompute the EMA branch in backward where it lowers the peak
    # local heads (ObjectiveConfig)
    aux_config: str = "2c2f"
    aux_loss: str = "cross_entropy"
    feature_dim: int = 128
    widen: int = 1
    ixx_1: float = 5.0
    ixy_1: float = 0.5
    ixx_2: float = 0.0
    ixy_2: float = 0.0
    lambda_schedule: str = "auto"
    # running
    seed: int = 0
    max_steps: int | None = None
    device: str = "auto"  # 'auto', 'cpu' or 'cuda'
    workers: int = 0
    channels_last: bool = False  # NHWC memory format for the model and inputs (faster on CPU and GPU)
    amp: str | None = None  # None, 'bf16' or 'fp16': forward passes under autocast (fp16 adds a GradScaler)
    parallel: str | None = None  # 'modules': one pipelined stage of modules per torchrun process (update-unlocked)
    ema_sync_every: int = 1  # parallel modules: steps between sends of the next stage's first unit (MAN/MAN++)
    dist_backend: str | None = None  # under torchrun: None picks 'nccl' on CUDA and 'gloo' on CPU
    compile: bool = False  # torch.compile the modules and auxiliary networks (not the training loop)
    out: str | None = None

    def local_settings(self) -> LocalSettings:
        heads = ObjectiveConfig(**{f.name: getattr(self, f.name) for f in fields(ObjectiveConfig)})
        return LocalSettings(method=self.method, k=self.k, split=self.split, objective=self.objective,
                             ema_momentum=self.ema_momentum, copy_init=self.copy_init,
                             recompute_ema=self.recompute_ema, heads=heads)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def run_name(self) -> str:
        k = "" if self.method == "e2e" or self.k is None else f"-k{self.k}"
        return f"{self.model}-{self.dataset}-{self.method}{k}"


# fields that define the model and its training: a checkpoint must agree on them to be resumed
IDENTITY_FIELDS = ("model", "dataset", "method", "objective", "k", "split", "aux_config", "aux_loss",
                   "feature_dim", "widen", "copy_init", "batch_size")


def _field_types() -> dict[str, Any]:
    hints = typing.get_type_hints(TrainConfig)
    return {f.name: hints[f.name] for f in fields(TrainConfig)}


def _coerce(name: str, value: Any, hint: Any) -> Any:
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        hint = args[0]
    if hint is Any:
        return value
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lstrip("-").isdigit():
            return int(value)
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        try:
            return float(value)
        except (TypeError, ValueError):
            pass
    elif hint is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    raise ManppError(f"bad value {value!r} for '{name}': expected {getattr(hint, '__name__', hint)}")


def apply(cfg: TrainConfig, values: dict[str, Any], source: str = "override") -> TrainConfig:
    """Return ``cfg`` with ``values`` set, each checked against the field's type."""
    types_ = _field_types()
    updates = {}
    for key, value in values.items():
        key = key.replace("-", "_")
        if key not in types_:
            raise ManppError(f"unknown setting '{key}' in {source}: accepted are {', '.join(types_)}")
        updates[key] = _coerce(key, value, types_[key])
    return dataclasses.replace(cfg, **updates)


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a config file into a dict; a clear error if it is missing or not a YAML mapping."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ManppError(f"cannot read config '{path}': {exc.strerror or exc}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        line = getattr(getattr(exc, "problem_mark", None), "line", None)
        where = f" (line {line + 1})" if line is not None else ""
        raise ManppError(f"config '{path}' is not valid YAML{where}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ManppError(f"config '{path}' must be a mapping of settings, got {type(data).__name__}")
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


def save_yaml(cfg: TrainConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def from_dict(data: dict[str, Any], source: str = "config") -> TrainConfig:
    return apply(TrainConfig(), data, source)


__all__ = ["TrainConfig", "IDENTITY_FIELDS", "apply", "from_dict", "load_yaml", "parse_overrides", "save_yaml",
           "field"]
