"""``manpp settings``: every setting a run takes, by group, from the declarations themselves.

Each field of :class:`manpp.config.TrainConfig` is declared once (:func:`manpp.base.settings.setting`: default,
rule, help, flag); this lists them in the groups of ``manpp train --help`` with their flag (where they have
one), default, accepted values and meaning, then each objective's own settings
(``objective_settings.<name>=value``). Nothing here is written by hand but the groups.
"""

from __future__ import annotations

import dataclasses
import typing

from ..base.registry import OBJECTIVES
from ..base.settings import flag_of, help_of, rule_of
from ..config import trainconfig as C

# the groups of the command line's help and of this list; every config field is in one (tested)
GROUPS = {
    "model and data": ("model", "dataset", "data_dir", "image_size", "pretrained", "classes", "val_fraction",
                       "download", "train_subset", "test_subset", "subset_order", "gray_to_rgb", "augment",
                       "normalize", "drop_last", "eval_batch_size", "workers", "anchor_base"),
    "method": ("method", "k", "split", "objective", "objective_settings", "fidelity", "ema_momentum", "copy_init",
               "scale_init", "scale_lr_scale", "recompute_ema", "allow_zero_loss"),
    "optimisation": ("epochs", "batch_size", "lr", "optimizer", "max_steps", "seed", "sgd_momentum", "nesterov",
                     "weight_decay", "adamw_betas", "warmup_epochs", "warmup_lr", "lr_schedule", "lr_milestones",
                     "lr_update", "aux_lr_scale", "aux_warmup_epochs", "grad_clip"),
    "memory and speed": ("device", "amp", "checkpointing", "saved_activations", "offload_activations",
                         "step_in_backward", "channels_last", "compile", "compile_mode"),
    "run folder and logging": ("out", "log_every", "logger"),
    "several processes (torchrun)": ("parallel", "dist_backend", "overlap_comm", "dist_timeout", "ema_sync_every"),
}


def group_of(name: str) -> str:
    for group, names in GROUPS.items():
        if name in names:
            return group
    raise KeyError(f"config field '{name}' is in no group of manpp.commands.settingslist.GROUPS")


def _default(field: dataclasses.Field):
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return field.default_factory()  # type: ignore[misc]
    return None


def _shown(value) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, tuple):
        return "[" + ", ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value) + "]"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value) if value != {} else "{}"


def entry(field: dataclasses.Field, hints: dict, prefix: str = "") -> dict:
    """One setting: its key, flag, default, accepted values and meaning (``hints``: its class's type hints)."""
    rule = rule_of(field)
    accepted = rule.accepted() if rule is not None else ("true or false" if hints.get(field.name) in
                                                          (bool, bool | None) else "")
    meaning = help_of(field) or (getattr(rule, "meaning", "") if rule is not None else "")
    return {"key": prefix + field.name, "flag": flag_of(field), "default": _shown(_default(field)),
            "accepted": accepted, "meaning": " ".join(meaning.split())}


def all_settings() -> dict[str, list[dict]]:
    """Group -> its settings; then one group per objective, of its own settings."""
    fields = {f.name: f for f in dataclasses.fields(C.TrainConfig)}
    hints = typing.get_type_hints(C.TrainConfig)
    out = {group: [entry(fields[name], hints) for name in names] for group, names in GROUPS.items()}
    for name, objective in OBJECTIVES.items():
        own_hints = typing.get_type_hints(objective.settings)
        own = [entry(f, own_hints, "objective_settings.") for f in dataclasses.fields(objective.settings)]
        if own:
            out[f"objective {name} (objective_settings.<name>=value, or heads.<name>=value)"] = own
    return out


def format_settings(groups: dict[str, list[dict]], width: int = 100) -> str:
    lines = ["Every setting, as key=value after any command (or in a YAML file given with -c); a flag where it has "
             "one. Default, then what is accepted, then what it does.", ""]
    for group, items in groups.items():
        lines.append(f"{group}:")
        for item in items:
            head = f"  {item['key']}" + (f" ({item['flag']})" if item["flag"] else "")
            detail = f"default {item['default']}" + (f"; {item['accepted']}" if item["accepted"] else "")
            lines.append(f"{head}  [{detail}]")
            if item["meaning"]:
                lines += _wrapped(item["meaning"], "      ", width)
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def _wrapped(text: str, indent: str, width: int) -> list[str]:
    import textwrap

    return textwrap.wrap(text, width=width, initial_indent=indent, subsequent_indent=indent)


__all__ = ["GROUPS", "all_settings", "entry", "format_settings", "group_of"]
