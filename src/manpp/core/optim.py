"""The optimizer and the learning-rate schedule of a run (``cfg``: a :class:`manpp.config.TrainConfig`,
which reads its choice lists from here), and the choices they take.

``optimizer``: SGD (Nesterov momentum, the CIFAR/ImageNet-ResNet recipe) or AdamW (the ViT
recipe); ``lr_schedule``: cosine, or ``step`` (x0.1 at milestones, the detection recipe);
``lr_update``: every ``step`` (ours) or once per ``epoch`` (the authors' release). The auxiliary
networks may have their own lr scale (``aux_lr_scale``), MAN++'s scales one more (``scale_lr_scale``, over
the auxiliary networks'), and the auxiliary networks may train alone first
(``aux_warmup_epochs``: the backbone's lr is 0 meanwhile, so the heads learn to read the initial
features before the backbone follows their gradients).
"""

from __future__ import annotations

import math
import warnings
import torch

from ..base.errors import ManppError, choices
from ..base.settings import Number, check_rule
from .engine import LocalModel
from .momentum import SCALE_LR_SCALE_RULE, MomentumAux

OPTIMIZERS = ("sgd", "adamw")
LR_SCHEDULES = ("cosine", "step")
LR_UPDATES = ("step", "epoch")
# the rules of the settings read here, declared once (the config's fields carry them)
LR_RULE = Number(low=0, low_open=True, meaning="the peak learning rate")
SGD_MOMENTUM_RULE = Number(low=0, high=1, high_open=True, meaning="SGD's momentum")
WEIGHT_DECAY_RULE = Number(low=0)
AUX_LR_SCALE_RULE = Number(low=0, low_open=True, optional=True, meaning="the auxiliary networks' lr over the backbone's")
AUX_WARMUP_RULE = Number(low=0, meaning="epochs in which only the auxiliary networks train")


def check_milestones(milestones) -> None:
    ok = isinstance(milestones, (list, tuple)) and all(
        isinstance(m, (int, float)) and not isinstance(m, bool) and 0 < m < 1 for m in milestones)
    if not ok or list(milestones) != sorted(milestones):
        raise ManppError(f"bad lr_milestones {milestones!r}: accepted are increasing fractions of the run in (0, 1), "
                         f"e.g. [0.667, 0.889]")


def adamw_betas(cfg) -> tuple[float, float]:
    """``adamw_betas`` as two floats, or one clear error."""
    betas = cfg.adamw_betas
    ok = isinstance(betas, (list, tuple)) and len(betas) == 2 and all(
        isinstance(b, (int, float)) and not isinstance(b, bool) and 0.0 <= b < 1.0 for b in betas)
    if not ok:
        raise ManppError(f"bad adamw_betas {betas!r}: expected two numbers in [0, 1), e.g. [0.9, 0.999]")
    return float(betas[0]), float(betas[1])


def parameter_groups(model: LocalModel, cfg=None, params=None, *, lr: float | None = None) -> list[dict]:
    """The optimizer's groups: one, or with an ``aux_lr_scale`` other than 1 or an ``aux_warmup_epochs`` the
    auxiliary networks (their learnable copies, scales and heads) apart, with ``lr_scale`` =
    ``aux_lr_scale``; the backbone's group is marked ``backbone`` (both read by :func:`set_lr`). With a
    ``scale_lr_scale`` other than 1, MAN++'s learnable scales are a group of their own, at ``lr_scale`` =
    ``aux_lr_scale * scale_lr_scale``.

    ``aux_lr_scale`` is ``cfg``'s (a resolved run config), else the model's own (``model.aux_lr_scale``,
    resolved by the same rule when the model was built: ``local_model`` and ``wrap`` train as ``manpp
    train`` does). With ``lr``, each group also gets its lr, ``lr`` times its ``lr_scale``, for a loop of
    your own: ``torch.optim.SGD(manpp.parameter_groups(model, lr=0.1), lr=0.1, momentum=0.9)``."""
    params = list(model.parameters_to_optimize() if params is None else params)
    warmup = getattr(cfg, "aux_warmup_epochs", 0) or 0
    aux = {id(p) for p in model.aux.parameters()}
    if warmup and not any(id(p) in aux for p in model.parameters_to_optimize()):
        raise ManppError(f"aux_warmup_epochs={warmup} trains only the auxiliary networks first, and method "
                         f"'{getattr(cfg, 'method', 'e2e')}' has none: use aux_warmup_epochs=0")
    scale = getattr(cfg, "aux_lr_scale", None)
    if scale is None:
        scale = getattr(model, "aux_lr_scale", None)
    if scale is None:
        raise ManppError("parameter_groups needs the auxiliary networks' lr scale: a resolved config "
                         "(manpp.config.resolve.resolve) or a model built by manpp (model.aux_lr_scale)")
    scale = float(scale)
    scale_lr = float(getattr(cfg, "scale_lr_scale", getattr(model, "scale_lr_scale", 1.0)))
    scales = {id(m.scale) for m in model.aux.modules()
              if isinstance(m, MomentumAux) and isinstance(m.scale, torch.nn.Parameter)} if scale_lr != 1 else set()
    if scale_lr != 1 and not scales:
        raise ManppError(f"scale_lr_scale={scale_lr:g} sets the lr of MAN++'s learnable scales, and this model has "
                         f"none (method '{getattr(model, 'method', '?')}'): leave scale_lr_scale at 1")
    if scale == 1 and not warmup and not scales:
        groups = [{"params": params, "lr_scale": 1.0, "backbone": False}]
    else:
        groups = [{"params": [p for p in params if id(p) not in aux], "lr_scale": 1.0, "backbone": True},
                  {"params": [p for p in params if id(p) in aux and id(p) not in scales], "lr_scale": scale,
                   "backbone": False},
                  {"params": [p for p in params if id(p) in scales], "lr_scale": scale * scale_lr,
                   "backbone": False}]
    groups = [g for g in groups if g["params"]]
    if lr is not None:
        for g in groups:
            g["lr"] = lr * g["lr_scale"]
    return groups


def holds_backbone(step: int, cfg, steps_per_epoch: int) -> bool:
    """Whether ``step`` is in the auxiliary networks' warm-up (``aux_warmup_epochs``)."""
    return step < int((getattr(cfg, "aux_warmup_epochs", 0) or 0) * steps_per_epoch)


def set_lr(optimizer: torch.optim.Optimizer, lr: float, hold_backbone: bool = False) -> None:
    """Every group's lr for this step: ``lr`` times the group's ``lr_scale``; 0 for the backbone's
    group with ``hold_backbone`` (the auxiliary networks' warm-up)."""
    for group in optimizer.param_groups:
        group["lr"] = 0.0 if hold_backbone and group.get("backbone") else lr * group.get("lr_scale", 1.0)


def build_optimizer(cfg, params) -> torch.optim.Optimizer:
    """SGD (momentum ``sgd_momentum``, ``nesterov``) or AdamW (``adamw_betas``, eps 1e-8); both use
    ``lr`` (overwritten every step by :func:`set_lr`) and ``weight_decay``. ``params``: parameters or
    :func:`parameter_groups`."""
    if cfg.optimizer not in OPTIMIZERS:
        raise ManppError(f"unknown optimizer {cfg.optimizer!r}: accepted are {choices(OPTIMIZERS)}")
    for name, rule in (("lr", LR_RULE), ("sgd_momentum", SGD_MOMENTUM_RULE), ("weight_decay", WEIGHT_DECAY_RULE),
                       ("aux_lr_scale", AUX_LR_SCALE_RULE), ("scale_lr_scale", SCALE_LR_SCALE_RULE),
                       ("aux_warmup_epochs", AUX_WARMUP_RULE)):
        check_rule(name, rule, getattr(cfg, name, 0))
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, betas=adamw_betas(cfg), eps=1e-8, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.sgd_momentum, nesterov=cfg.nesterov,
                           weight_decay=cfg.weight_decay)


def build_scaler(cfg, device: torch.device) -> "torch.amp.GradScaler | None":
    """One GradScaler for all K local losses with ``amp: fp16``; None otherwise (bf16 needs none)."""
    if cfg.amp != "fp16":
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            with torch.autocast(device.type, dtype=torch.float16):
                ok = torch.is_autocast_enabled(device.type) and torch.get_autocast_dtype(device.type) == torch.float16
            scaler = torch.amp.GradScaler(device.type)
        except (RuntimeError, ValueError, AttributeError, TypeError):
            ok = False
    if not ok or not scaler.is_enabled():
        raise ManppError(f"amp 'fp16' is not supported on {device.type} by torch {torch.__version__}: use amp bf16 "
                         f"or none there")
    return scaler


def lr_at(step: int, cfg, steps_per_epoch: int) -> float:
    """Linear warm-up from ``warmup_lr`` to ``lr``, then cosine to 0 (or, ``lr_schedule: step``,
    ``lr`` times 0.1 per milestone passed, as fractions of ``epochs``), evaluated per step.

    ``lr_update: epoch`` is the release's schedule instead (docs/release.md: training recipes), set once per
    epoch e = 1..E: cosine c(e) = lr/2 (1 + cos(pi e / E)), and for e <= W warm-up epochs the blend
    c(e) (e - 1) / W + warmup_lr (W + 1 - e) / W. The last epoch trains at lr 0.
    """
    if cfg.lr_update is None:
        raise ValueError("lr_at needs a resolved config (lr_update is set by manpp.config.resolve.resolve)")
    per_epoch = cfg.lr_update == "epoch"
    if per_epoch and cfg.lr_schedule == "cosine":
        e = step // max(1, steps_per_epoch) + 1
        cosine = 0.5 * cfg.lr * (1 + math.cos(math.pi * min(e, cfg.epochs) / max(1, cfg.epochs)))
        warm = round(cfg.warmup_epochs)
        return cosine * (e - 1) / warm + cfg.warmup_lr * (warm + 1 - e) / warm if e <= warm else cosine
    if per_epoch:  # the step schedule, by epoch
        step = step // max(1, steps_per_epoch) * steps_per_epoch
    total = max(1, cfg.epochs * steps_per_epoch)
    warm = int(cfg.warmup_epochs * steps_per_epoch)
    if step < warm:
        return cfg.warmup_lr + (cfg.lr - cfg.warmup_lr) * step / warm
    progress = (step - warm) / max(1, total - warm)
    if cfg.lr_schedule == "step":
        return cfg.lr * 0.1 ** sum(step >= m * total for m in cfg.lr_milestones)
    return 0.5 * cfg.lr * (1 + math.cos(math.pi * min(1.0, progress)))


__all__ = ["LR_SCHEDULES", "LR_UPDATES", "OPTIMIZERS", "adamw_betas", "build_optimizer", "build_scaler",
           "check_milestones", "holds_backbone", "lr_at", "parameter_groups", "set_lr"]
