"""Methods as compositions: backbone + partition + local objective [+ momentum wrapper].

Adding a method means adding an entry to ``METHODS``; the engine does not change.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from torch import nn

from .engine import LocalModel, primary
from .errors import ManppError, choices
from .momentum import INITS, MomentumAux
from .objectives import OBJECTIVES, AuxSpec, ObjectiveConfig, build_objective
from .partition import make_partition


@dataclass(frozen=True)
class Method:
    name: str
    objective: str | None  # None: the objective chosen by the user (MAN/MAN++ wrap DGL or InfoPro)
    momentum: bool = False  # wrap the head in an EMA + learnable copy of the next unit
    learnable_scale: bool = False  # MAN++'s s_j (else s = 1, i.e. MAN)
    local: bool = True  # False: one module, end-to-end
    summary: str = ""


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("e2e", None, local=False, summary="end-to-end backpropagation (K = 1)"),
        Method("dgl", "dgl", summary="DGL: a small classifier per module"),
        Method("infopro", "infopro", summary="InfoPro: reconstruction + classification per module"),
        Method("man", None, momentum=True, summary="MAN: EMA + learnable copy of the next unit, summed"),
        Method("manpp", None, momentum=True, learnable_scale=True,
               summary="MAN++: EMA + learnable copy mixed by a learnable scale"),
    )
}


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise ManppError(f"unknown method '{name}': accepted are {choices(METHODS)}")
    return METHODS[name]


@dataclass
class LocalSettings:
    """Everything besides the backbone that decides the local model."""

    method: str = "manpp"
    k: int | None = None
    split: str | Sequence = "even"
    objective: str = "infopro"
    ema_momentum: float = 0.995
    copy_init: str = "copy"
    # recompute the EMA branch in backward: true, false, or 'auto' (only where it lowers the peak)
    recompute_ema: bool | str = "auto"
    heads: ObjectiveConfig = field(default_factory=ObjectiveConfig)


@torch.no_grad()
def unit_output_shapes(backbone: nn.Module, in_channels: int, image_size: int) -> list[tuple[int, ...]]:
    """Shape (C, H, W) of every unit's output, from one tiny forward pass in eval mode."""
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


def build_local_model(backbone: nn.Module, settings: LocalSettings, *, num_classes: int, image_channels: int,
                      image_size: int, denormalize: Callable | None = None) -> LocalModel:
    """Compose a :class:`LocalModel` from a backbone and the method settings."""
    method = get_method(settings.method)
    if not method.local:
        if settings.k not in (None, 1):
            raise ManppError(f"method 'e2e' trains the network as one module: K must be 1, got K={settings.k}")
        partition = make_partition(backbone, 1, "even")
        return LocalModel(backbone, partition, [], denormalize, method=method.name)
    objective = method.objective or settings.objective
    if objective not in OBJECTIVES:
        raise ManppError(f"unknown objective '{objective}': accepted are {choices(OBJECTIVES)}")
    if settings.copy_init not in INITS:
        raise ManppError(f"unknown copy_init '{settings.copy_init}': accepted are {choices(INITS)}")
    if not 0.0 <= settings.ema_momentum <= 1.0:
        raise ManppError(f"ema_momentum must be between 0 and 1, got {settings.ema_momentum}")
    partition = make_partition(backbone, settings.k, settings.split)
    if partition.k == 1:
        raise ManppError(f"method '{method.name}' needs K >= 2 modules (K = 1 is end-to-end: use method e2e)")
    shapes = unit_output_shapes(backbone, image_channels, image_size)
    nominal_k = partition.nominal_k
    family = getattr(backbone, "aux_family", "cifar")
    aux = []
    for j in range(partition.k - 1):
        # the head reads module j's output, or (MAN/MAN++) the output of the next module's first unit
        unit_index = partition.bounds[j + 1][0] if method.momentum else partition.bounds[j][1] - 1
        shape = shapes[unit_index]  # (C, H, W), or (tokens, width) on a ViT
        channels, size = (shape[-1], 0) if family == "vit" else shape[:2]
        spec = AuxSpec(channels=channels, size=size, stage=backbone.unit_stages[unit_index], index=j,
                       num_modules=partition.k, nominal_k=nominal_k, num_classes=num_classes,
                       image_channels=image_channels, image_size=image_size, family=family)
        next_unit = None
        if family == "vit" and method.momentum and unit_index + 1 < len(backbone.units):
            next_unit = backbone.units[unit_index + 1]  # the release's second learnable block
        head = build_objective(objective, spec, settings.heads, momentum=method.momentum, next_unit=next_unit,
                               task=getattr(backbone, "task", None))
        if method.momentum:
            unit = backbone.units[unit_index]
            # dense backbones wrap their blocks (``unit.block``): the copies are of the block itself
            head = MomentumAux(getattr(unit, "block", unit), head, momentum=settings.ema_momentum,
                               learnable_scale=method.learnable_scale, init=settings.copy_init,
                               reinit=getattr(backbone, "reinit_", None), recompute_ema=settings.recompute_ema)
        aux.append(head)
    return LocalModel(backbone, partition, aux, denormalize, method=method.name)
