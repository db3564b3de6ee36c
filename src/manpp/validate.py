"""Every field of a run's config checked in one place: its range or its choices.

:func:`check_config` runs before any work (``manpp train`` and every other command, and
:func:`manpp.train`), so a bad value ends with one error that names the field, the value and
what is accepted, and leaves nothing behind. Types are already checked when the value is read
(:func:`manpp.config.apply`); names of models and datasets are checked by their builders, and
the objective's own settings (``heads``) by the objective.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from . import config as C
from . import distributed as D
from . import fidelity as F
from .data.options import AUGMENTS, NORMALIZES
from .errors import ManppError, choices
from .momentum import INITS, RECOMPUTE_CHOICES
from .registry import METHODS, OBJECTIVES
from .resolve import resolve_switches
from .saved import SAVED_DTYPES

OPTIMIZERS = ("sgd", "adamw")
LR_SCHEDULES = ("cosine", "step")
SUBSET_ORDERS = ("random", "first")
LR_UPDATES = ("step", "epoch")
AMPS = ("bf16", "fp16")
PARALLEL_MODES = ("modules",)
LOGGERS = ("tensorboard",)
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
OVERLAP_CHOICES = (True, False, "auto")  # auto: on CUDA (NCCL overlaps); off on the CPU, where it measured no gain


@dataclass(frozen=True)
class Number:
    """A number in a range; ``integer`` for counts; ``optional`` lets None through."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    integer: bool = False
    optional: bool = False
    meaning: str = ""

    def accepted(self) -> str:
        kind = "an integer" if self.integer else "a number"
        if self.low is not None and self.high is not None:
            text = f"{kind} in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"
        elif self.low is not None:
            text = f"{kind} {'>' if self.low_open else '>='} {self.low:g}"
        elif self.high is not None:
            text = f"{kind} {'<' if self.high_open else '<='} {self.high:g}"
        else:
            text = f"a finite {kind.split()[1]}"
        return text + (" or none" if self.optional else "")

    def ok(self, value: Any) -> bool:
        if value is None:
            return self.optional
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        if self.integer and not isinstance(value, int) or not math.isfinite(value):
            return False
        if self.low is not None and (value < self.low or self.low_open and value == self.low):
            return False
        return not (self.high is not None and (value > self.high or self.high_open and value == self.high))


@dataclass(frozen=True)
class OneOf:
    """One of a fixed set of values; ``optional`` lets None through."""

    values: tuple
    optional: bool = False
    meaning: str = ""

    def accepted(self) -> str:
        return choices(self.values) + (" or none" if self.optional else "")

    def ok(self, value: Any) -> bool:
        if value is None:
            return self.optional
        return any(value is v or (not isinstance(v, bool) and not isinstance(value, bool) and value == v)
                   for v in self.values)


def _positive_int(optional: bool = False, meaning: str = "") -> Number:
    return Number(low=1, integer=True, optional=optional, meaning=meaning)


# field -> rule; the fields not named here are names (checked by their registries or builders),
# free-form (data_dir, out, pretrained, split, heads) or plain booleans (checked by their type)
RULES: dict[str, Number | OneOf] = {
    "image_size": _positive_int(True, "the input side in pixels"),
    "train_subset": _positive_int(True, "training images to use"),
    "test_subset": _positive_int(True, "test images to use"),
    "fidelity": OneOf(F.FIDELITIES),
    "subset_order": OneOf(SUBSET_ORDERS, optional=True),
    "augment": OneOf(AUGMENTS, optional=True),
    "normalize": OneOf(NORMALIZES, optional=True),
    "k": _positive_int(True, "the number of modules"),
    "epochs": _positive_int(meaning="training epochs"),
    "batch_size": _positive_int(meaning="images per training step"),
    "eval_batch_size": _positive_int(meaning="images per evaluation batch"),
    "lr": Number(low=0, low_open=True, meaning="the peak learning rate"),
    "sgd_momentum": Number(low=0, high=1, high_open=True, meaning="SGD's momentum"),
    "weight_decay": Number(low=0),
    "warmup_epochs": Number(low=0, meaning="epochs of linear warm-up"),
    "warmup_lr": Number(low=0, meaning="the learning rate the warm-up starts from"),
    "lr_update": OneOf(LR_UPDATES, optional=True),
    "lr_schedule": OneOf(LR_SCHEDULES),
    "aux_lr_scale": Number(low=0, low_open=True, meaning="the auxiliary networks' lr over the backbone's"),
    "grad_clip": Number(low=0, low_open=True, optional=True, meaning="the largest global gradient norm"),
    "anchor_base": _positive_int(True, "the anchor size at stride 8"),
    "optimizer": OneOf(OPTIMIZERS),
    "ema_momentum": Number(low=0, high=1, meaning="the EMA copies' momentum"),
    "copy_init": OneOf(INITS, optional=True),
    "scale_init": Number(low=0, high=2, meaning="MAN++'s scale s at the start"),
    "recompute_ema": OneOf(RECOMPUTE_CHOICES),
    "seed": Number(low=0, integer=True),
    "max_steps": _positive_int(True, "optimizer steps before stopping"),
    "workers": Number(low=0, integer=True, meaning="data-loading processes"),
    "amp": OneOf(AMPS, optional=True),
    "parallel": OneOf(PARALLEL_MODES, optional=True),
    "ema_sync_every": _positive_int(meaning="steps between sends of the next stage's first unit"),
    "dist_backend": OneOf(D.BACKENDS, optional=True),
    "overlap_comm": OneOf(OVERLAP_CHOICES, meaning="start each module's all-reduce when its backward ends"),
    "dist_timeout": Number(low=0, low_open=True, meaning="seconds a process waits for the others"),
    "log_every": Number(low=0, integer=True, meaning="steps between progress lines when not on a terminal; 0: none"),
    "logger": OneOf(LOGGERS, optional=True),
    "saved_activations": OneOf(tuple(SAVED_DTYPES), optional=True, meaning="the dtype activations are saved in"),
    "compile_mode": OneOf(COMPILE_MODES, optional=True, meaning="torch.compile's mode, with compile=true"),
}


def check_value(name: str, value: Any) -> None:
    """One field against its rule (no rule: nothing to check)."""
    rule = RULES.get(name)
    if rule is not None and not rule.ok(value):
        meaning = f" ({rule.meaning})" if rule.meaning else ""
        if isinstance(rule, OneOf):
            raise ManppError(f"unknown {name} {value!r}{meaning}: accepted are {rule.accepted()}")
        raise ManppError(f"bad {name} {value!r}{meaning}: accepted is {rule.accepted()}")


def check_config(cfg: C.TrainConfig) -> None:
    """Every field of ``cfg`` against its rule, the method and objective names, and the pairs that
    must agree; the first problem raises :class:`~manpp.errors.ManppError`."""
    METHODS.get(cfg.method)
    if cfg.objective is not None:
        OBJECTIVES.get(cfg.objective)
    for name in RULES:
        check_value(name, getattr(cfg, name))
    _check_milestones(cfg.lr_milestones)
    if cfg.optimizer == "adamw":
        adamw_betas(cfg)
    if resolve_switches(cfg).drop_last is False:  # an explicit false, or fidelity=release's
        env = D.launch_env()
        if max(D.world_size(), env.world_size if env else 1) > 1:
            raise ManppError("drop_last=false (the release's last partial batch) works only in single-process "
                             "runs: under torchrun a partial batch does not split into equal shards")


def _check_milestones(milestones: Any) -> None:
    ok = isinstance(milestones, (list, tuple)) and all(
        isinstance(m, (int, float)) and not isinstance(m, bool) and 0 < m < 1 for m in milestones)
    if not ok or list(milestones) != sorted(milestones):
        raise ManppError(f"bad lr_milestones {milestones!r}: accepted are increasing fractions of the run in (0, 1), "
                         f"e.g. [0.667, 0.889]")


def adamw_betas(cfg: C.TrainConfig) -> tuple[float, float]:
    """``adamw_betas`` as two floats, or one clear error."""
    betas = cfg.adamw_betas
    ok = isinstance(betas, (list, tuple)) and len(betas) == 2 and all(
        isinstance(b, (int, float)) and not isinstance(b, bool) and 0.0 <= b < 1.0 for b in betas)
    if not ok:
        raise ManppError(f"bad adamw_betas {betas!r}: expected two numbers in [0, 1), e.g. [0.9, 0.999]")
    return float(betas[0]), float(betas[1])


__all__ = ["AMPS", "LOGGERS", "LR_SCHEDULES", "LR_UPDATES", "OPTIMIZERS", "RULES", "SUBSET_ORDERS", "Number",
           "OneOf", "adamw_betas", "check_config", "check_value"]
