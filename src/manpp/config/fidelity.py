"""``fidelity``: our defaults, or the authors' release wherever the two differ.

Every difference is a switch of its own (a config key whose default, None, follows ``fidelity``);
``fidelity=release`` only changes the switches left unset. :func:`manpp.config.resolve.resolve` fills them
in, so a resolved config (the one written next to the results) names each choice explicitly.

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
| ``aux_lr_scale`` | the method's for its objective (InfoPro's heads 2 under every local method, the others 1; :mod:`manpp.config.resolve`) | 1 (the auxiliary networks at the backbone's lr) |
| ``objective_settings`` | the objective's defaults (InfoPro: ``lambda_schedule=shared``, the weights by module under every method) | plus the objective's release settings (InfoPro: the stem module's 1c2f SupCon head, ``ixy_2=0``, ``lambda_schedule=auto``: by the stage of the copied unit under MAN/MAN++) |
"""

from __future__ import annotations

from typing import Any

from ..base.errors import ManppError, choices

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


__all__ = ["FIDELITIES", "SPLIT_RELEASE", "SWITCHES", "check", "is_release"]
