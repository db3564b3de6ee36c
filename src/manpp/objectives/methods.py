"""Methods as compositions: backbone + partition + local objective [+ momentum wrapper].

E2E, MAN and MAN++ are registered here; every objective registers its plain local method itself
(:mod:`manpp.base.registry`). ``build_local_model`` composes any of them; the engine does not change.
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from ..base.errors import ManppError
from ..base.registry import METHODS, OBJECTIVES, Method, register_method
from ..base.settings import check_rule, positive_int, setting
from ..core.engine import LocalModel, primary
from ..core.momentum import (EMA_MOMENTUM, EMA_MOMENTUM_RULE, INIT_RULE, RECOMPUTE_RULE, SCALE_INIT, SCALE_INIT_RULE,
                             SCALE_LR_SCALE_RULE, MomentumAux, check_settings, settle_recompute)
from ..core.partition import make_partition, memory_balanced_ends
from .spec import AuxSpec

register_method(Method("e2e", None, local=False, summary="end-to-end backpropagation (K = 1)"))
register_method(Method("man", None, momentum=True, summary="MAN: EMA + learnable copy of the next unit, summed"))
# the auxiliary networks' lr is a default of the heads (Objective.aux_lr_scale: InfoPro's 2, measured on 3 seeds
# for InfoPro, MAN and MAN++; docs/results.md, ablations), the same under every local method
register_method(Method("manpp", None, momentum=True, learnable_scale=True,
                       summary="MAN++: EMA + learnable copy mixed by a learnable scale"))


def _method_help() -> str:
    return "default manpp; " + "; ".join(f"{n}: {METHODS[n].summary}" for n in METHODS.names())


def _objective_help() -> str:
    takers = "/".join(n for n, m in METHODS.items() if m.takes_objective)
    return (f"base objective of {takers}: {', '.join(OBJECTIVES.names())} (default: the backbone's, infopro on "
            f"ResNets, dgl on ViTs and dense models); its settings are objective_settings.<name>=value")


@dataclass
class LocalSettings:
    """Everything besides the backbone that decides the local model, each setting declared once (the
    run's config, :class:`manpp.config.TrainConfig`, holds them too). None: the backbone's default, or
    (``split``, ``copy_init``, ``allow_zero_loss``) the choice of ``fidelity``."""

    method: str = setting("manpp", help=_method_help, flag="--method", metavar="METHOD")
    k: int | None = setting(None, rule=positive_int(True, "the number of modules"), flag="--k",
                            help="number of gradient-isolated modules (default: 16 on CIFAR ResNets, else 4, capped "
                            "at the units)")
    split: Any = setting(None, flag="--split", help="even (default), paper, memory (balanced activation memory), or "
                         "comma-separated last units of modules")
    objective: str | None = setting(None, help=_objective_help, flag="--objective", metavar="OBJECTIVE")
    ema_momentum: float = setting(EMA_MOMENTUM, rule=EMA_MOMENTUM_RULE, help="MAN/MAN++: the EMA copies' momentum")
    copy_init: str | None = setting(None, rule=dataclasses.replace(INIT_RULE, optional=True),
                                    help="'copy' (ours) or 'random' (the release): how the copies start")
    scale_init: float = setting(SCALE_INIT, rule=SCALE_INIT_RULE, help="MAN++: the scale s at the start")
    scale_lr_scale: float = setting(1.0, rule=SCALE_LR_SCALE_RULE,
                                    help="MAN++: the scales' lr over the auxiliary networks' (0 holds each s at "
                                    "scale_init)")
    recompute_ema: Any = setting("auto", rule=RECOMPUTE_RULE,
                                 help="recompute the EMA branch in backward: true, false, or 'auto' (only where it "
                                 "lowers the activation peak)")
    objective_settings: dict[str, Any] = setting(
        factory=dict, help="the objective's own settings, e.g. {ixx_1: 5.0} (manpp describe --objective X lists them); "
        "objective_settings.<name>=value, or heads.<name>=value as before")
    allow_zero_loss: bool | None = setting(None, help="train even when the objective's weights leave a module "
                                           "without any local loss")


def family_of(backbone: nn.Module) -> str:
    """The kind of features the backbone's units give (see :data:`manpp.base.registry.FAMILIES`)."""
    return getattr(backbone, "aux_family", "cifar")


def check_loss(head: nn.Module, index: int, objective: str, allow_zero_loss: bool) -> None:
    """Refuse a head whose loss weights are all 0 (module ``index`` would never train), unless allowed."""
    weights = head.loss_weights() if hasattr(head, "loss_weights") else None
    if not weights or any(w != 0 for w in weights.values()):
        return
    listed = ", ".join(f"{name} = {w:g}" for name, w in weights.items())
    message = (f"module {index} gets no local loss: its {objective} weights are {listed}, so it would never "
               f"train; change the weights (manpp describe --objective {objective} lists them) or set "
               f"allow_zero_loss=true to train anyway")
    if not allow_zero_loss:
        raise ManppError(message)
    warnings.warn(message.replace("; change the weights", " (allowed by allow_zero_loss); change the weights"),
                  stacklevel=3)


@torch.no_grad()
def unit_output_shapes(backbone: nn.Module, in_channels: int, image_size: int) -> list[tuple[int, ...]]:
    """Shape of every unit's output (without the batch), from one tiny forward pass in eval mode."""
    was_training = backbone.training
    backbone.eval()
    p = next(backbone.parameters())
    x = torch.zeros(1, in_channels, image_size, image_size, device=p.device, dtype=p.dtype)
    shapes = []
    for unit in backbone.units:
        x = unit(x)
        shapes.append(tuple(primary(x).shape[1:]))
    backbone.train(was_training)
    return shapes


def build_local_model(backbone: nn.Module, settings: LocalSettings, *, num_classes: int, in_channels: int,
                      image_size: int, denormalize: Callable | None = None, task=None,
                      aux_lr_scale: float) -> LocalModel:
    """Compose a :class:`LocalModel` from a backbone and resolved method settings (every choice made by
    :func:`manpp.config.resolve.resolve_local`, as :func:`manpp.local_model` and a run's config do; an open one is
    refused here, not chosen).

    ``task`` (a :class:`manpp.tasks.Task`) gives the final loss and what dense auxiliary heads need;
    None: classification with cross-entropy. ``aux_lr_scale``: the auxiliary networks' lr over the
    backbone's, recorded on the model (``model.aux_lr_scale``, which :func:`manpp.core.optim.parameter_groups`
    reads).
    """
    method = METHODS.get(settings.method)
    _check_resolved(settings, method, aux_lr_scale)
    check_rule("scale_lr_scale", SCALE_LR_SCALE_RULE, settings.scale_lr_scale)
    if settings.scale_lr_scale != 1 and not method.learnable_scale:
        raise ManppError(f"scale_lr_scale={settings.scale_lr_scale:g} sets the lr of MAN++'s learnable scales, and "
                         f"method '{method.name}' has none: use method manpp, or leave scale_lr_scale at 1")
    final_loss = task.loss if task is not None else None
    if not method.local:
        if settings.k not in (None, 1):
            raise ManppError(f"method 'e2e' trains the network as one module: K must be 1, got K={settings.k}")
        model = LocalModel(backbone, make_partition(backbone, 1, "even"), [], denormalize, method=method.name,
                           final_loss=final_loss)
        model.aux_lr_scale = float(aux_lr_scale)
        model.scale_lr_scale = 1.0
        return model
    family = family_of(backbone)
    name = method.objective or settings.objective
    objective = OBJECTIVES.get(name)
    objective.check_family(family)
    heads = objective.make_settings(settings.objective_settings)
    copy_init = settings.copy_init
    check_settings(settings.ema_momentum, copy_init, settings.recompute_ema, settings.scale_init)
    k, split = settings.k, settings.split
    if isinstance(split, str) and split == "memory":
        split = memory_balanced_ends(backbone, k, in_channels, image_size) if k and k > 1 else "even"
    partition = make_partition(backbone, k, split)
    if partition.k == 1:
        raise ManppError(f"method '{method.name}' needs K >= 2 modules (K = 1 is end-to-end: use method e2e)")
    shapes = unit_output_shapes(backbone, in_channels, image_size)
    aux = []
    for j in range(partition.k - 1):
        # the head reads module j's output, or (MAN/MAN++) the output of the next module's first unit
        unit_index = partition.bounds[j + 1][0] if method.momentum else partition.bounds[j][1] - 1
        shape = shapes[unit_index]  # (C, H, W), or (tokens, width) on a ViT
        channels, size = (shape[-1], 0) if family == "vit" else shape[:2]
        spec = AuxSpec(channels=channels, size=size, stage=backbone.unit_stages[unit_index], index=j,
                       num_modules=partition.k, nominal_k=partition.nominal_k, num_classes=num_classes,
                       in_channels=in_channels, image_size=image_size, family=family)
        next_unit = None
        if family == "vit" and method.momentum and unit_index + 1 < len(backbone.units):
            next_unit = backbone.units[unit_index + 1]  # the release's second learnable block
        head = objective.build(spec, heads, momentum=method.momentum, next_unit=next_unit, task=task)
        check_loss(head, j, name, bool(settings.allow_zero_loss))
        if method.momentum:
            unit = backbone.units[unit_index]
            # dense backbones wrap their blocks (``unit.block``): the copies are of the block itself
            head = MomentumAux(getattr(unit, "block", unit), head, momentum=settings.ema_momentum,
                               learnable_scale=method.learnable_scale, init=copy_init,
                               reinit=getattr(backbone, "reinit_", None), recompute_ema=settings.recompute_ema,
                               scale_init=settings.scale_init)
        aux.append(head)
    hooks = [settle_recompute] if any(getattr(a, "recompute_ema", None) == "auto" for a in aux) else []
    model = LocalModel(backbone, partition, aux, denormalize, method=method.name, final_loss=final_loss,
                       first_step_hooks=hooks)
    model.objective, model.objective_settings = name, heads  # what was chosen, for configs and tables
    model.aux_lr_scale = float(aux_lr_scale)
    model.scale_lr_scale = float(settings.scale_lr_scale)
    return model


def _check_resolved(settings: LocalSettings, method: Method, aux_lr_scale) -> None:
    """Refuse settings with a choice left open (None), naming each."""
    open_ = [name for name, value in (("split", settings.split), ("copy_init", settings.copy_init),
                                      ("allow_zero_loss", settings.allow_zero_loss), ("aux_lr_scale", aux_lr_scale))
             if value is None]
    explicit = settings.split is not None and (not isinstance(settings.split, str) or "," in settings.split)
    if method.local and settings.k is None and not explicit:  # (a list of module ends gives K)
        open_.insert(0, "k")
    if method.local and method.objective is None and settings.objective is None:
        open_.append("objective")
    if open_:
        raise ManppError(f"build_local_model takes resolved settings, and {', '.join(open_)} "
                         f"{'is' if len(open_) == 1 else 'are'} open (None): build with manpp.local_model or "
                         f"manpp.wrap, or resolve a run's config with manpp.config.resolve.resolve, which choose them")
