"""``fidelity``: our defaults, or the authors' release wherever the two differ.

Every difference is a switch of its own (a config key whose default, None, follows ``fidelity``);
``fidelity=release`` only changes the switches left unset. :func:`resolve` fills them in, so a
resolved config (the one written next to the results) names each choice explicitly.

| switch | ``ours`` | ``release`` |
|---|---|---|
| ``copy_init`` | ``copy`` | ``random`` (the copies start re-drawn) |
| ``split`` | ``even`` | ``paper`` where the release has a preset for the model and K, else ``even`` |
| ``gray_to_rgb`` | false | true (grayscale images replicated to 3 channels) |
| ``augment`` | ``dataset`` | ``release`` (CIFAR-10's: reflect-pad 4, crop, flip, for the sets it lacks) |
| ``normalize`` | ``dataset`` | ``release`` (CIFAR-10's statistics for the sets it lacks) |
| ``subset_order`` | ``random`` | ``first`` (``train_subset`` takes the first N images) |
| ``drop_last`` | true | false (the last partial batch is trained) |
| ``lr_update`` | ``step`` | ``epoch`` (the release's per-epoch warm-up blend and cosine) |
| ``allow_zero_loss`` | false | true (the release's weights can leave a module without loss) |
| ``heads`` | the objective's defaults | plus the objective's release settings (InfoPro: the stem module's 1c2f SupCon head, ``ixy_2=0``) |
"""

from __future__ import annotations

import dataclasses
from typing import Any

from .errors import ManppError, choices

FIDELITIES = ("ours", "release")

# each switch: (its value under 'ours', its value under 'release')
SWITCHES: dict[str, tuple[Any, Any]] = {
    "copy_init": ("copy", "random"),
    "gray_to_rgb": (False, True),
    "augment": ("dataset", "release"),
    "normalize": ("dataset", "release"),
    "subset_order": ("random", "first"),
    "drop_last": (True, False),
    "lr_update": ("step", "epoch"),
    "allow_zero_loss": (False, True),
}
SPLIT_RELEASE = "paper"  # where the model has a paper preset for the run's K


def check(cfg) -> None:
    if cfg.fidelity not in FIDELITIES:
        raise ManppError(f"unknown fidelity '{cfg.fidelity}': accepted are {choices(FIDELITIES)}")


def is_release(cfg) -> bool:
    check(cfg)
    return cfg.fidelity == "release"


def resolve(cfg, backbone=None):
    """``cfg`` with every switch left at None set from ``cfg.fidelity``.

    ``split`` and the objective's release settings need the backbone (its paper presets and its
    default objective); without one they are left as they are.
    """
    from .models.library import is_library_name

    release = is_release(cfg)
    values = {name: pair[release] for name, pair in SWITCHES.items() if getattr(cfg, name) is None}
    if cfg.gray_to_rgb is None and is_library_name(cfg.model):
        values["gray_to_rgb"] = True  # timm and torchvision models read RGB (and their weights expect it)
    if backbone is not None:
        if cfg.split is None:
            values["split"] = _release_split(cfg, backbone) if release else "even"
        if release:
            values["heads"] = {**release_heads(cfg, backbone), **cfg.heads}
    return dataclasses.replace(cfg, **values) if values else cfg


def _release_split(cfg, backbone) -> str:
    from .partition import default_k, paper_presets

    k = cfg.k if cfg.k is not None else default_k(backbone)
    return SPLIT_RELEASE if cfg.method != "e2e" and k in paper_presets(backbone) else "even"


def release_heads(cfg, backbone) -> dict[str, Any]:
    """The release settings of the objective the run's method uses on ``backbone`` (empty for E2E)."""
    from .methods import resolve_objective
    from .registry import METHODS, OBJECTIVES

    method = METHODS.get(cfg.method)
    if not method.local:
        return {}
    return dict(OBJECTIVES.get(resolve_objective(method, cfg.objective, backbone)).release)


__all__ = ["FIDELITIES", "SWITCHES", "check", "is_release", "release_heads", "resolve"]
