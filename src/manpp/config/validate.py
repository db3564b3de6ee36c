"""Every field of a run's config checked in one place, against the rule its declaration carries.

:func:`check_config` runs before any work (``manpp train`` and every other command, and
:func:`manpp.train`), so a bad value ends with one error that names the field, the value and
what is accepted, and leaves nothing behind. The rules are declared with the fields
(:func:`manpp.base.settings.setting` in :class:`manpp.config.TrainConfig` and
:class:`manpp.objectives.methods.LocalSettings`); :data:`RULES` only collects them. Types are already checked
when the value is read (:func:`manpp.config.apply`); names of models and datasets are checked by their
registries, and the objective's own settings (``objective_settings``) by the objective.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from ..base import distributed as D
from ..base.errors import ManppError
from ..base.registry import METHODS, OBJECTIVES
from ..base.settings import check_rule, rule_of
from ..core.optim import adamw_betas, check_milestones
from ..data.info import check_data_dir
from ..memory.earlystep import check_step_in_backward
from . import trainconfig as C
from .resolve import resolve_switches

# field -> rule, collected from the declarations; fields without one are names (checked by their
# registries or builders), free-form (data_dir, out, pretrained, split, objective_settings) or plain booleans
RULES = {f.name: rule_of(f) for f in dataclasses.fields(C.TrainConfig) if rule_of(f) is not None}


def check_classes(classes) -> None:
    """``classes``: None (recorded from the data) or the class names, distinct, in label order."""
    if classes is None:
        return
    if not isinstance(classes, (list, tuple)) or not all(isinstance(c, str) and c for c in classes) \
            or len(set(classes)) != len(classes):
        raise ManppError(f"bad classes {classes!r}: accepted is a list of distinct class names in label order "
                         f"(or none: a run records the data's)")


def check_value(name: str, value: Any) -> None:
    """One field against its rule (no rule: nothing to check)."""
    check_rule(name, RULES.get(name), value)


def check_config(cfg: C.TrainConfig) -> None:
    """Every field of ``cfg`` against its rule, the method and objective names, and the pairs that
    must agree; the first problem raises :class:`~manpp.base.errors.ManppError`."""
    METHODS.get(cfg.method)
    if cfg.objective is not None:
        OBJECTIVES.get(cfg.objective)
    for name, rule in RULES.items():
        check_rule(name, rule, getattr(cfg, name))
    check_milestones(cfg.lr_milestones)
    check_step_in_backward(cfg)
    check_data_dir(cfg.dataset, cfg.data_dir)
    for name in ("out", "data_dir", "pretrained"):
        value = getattr(cfg, name)
        if value is not None and not str(value).strip():
            flag = "--" + name.replace("_", "-")
            raise ManppError(f"{flag} '' names no file or folder: give one, or leave {flag} out for the default")
    check_classes(cfg.classes)
    if cfg.optimizer == "adamw":
        adamw_betas(cfg)
    if resolve_switches(cfg).drop_last is False:  # an explicit false, or fidelity=release's
        env = D.launch_env()
        if max(D.world_size(), env.world_size if env else 1) > 1:
            raise ManppError("drop_last=false (the release's last partial batch) works only in single-process "
                             "runs: under torchrun a partial batch does not split into equal shards")


__all__ = ["RULES", "check_config", "check_value"]
