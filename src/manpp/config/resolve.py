"""One resolution of a run's config: every choice left open is made here, once, before anything is built.

Every entry point (``manpp train`` and its pipelined form, ``compare``, ``bench``, ``describe``,
``plan``, and :func:`manpp.train.build.build_model` for Python users) turns its config into a resolved one
with :func:`resolve`; nothing after it chooses a default again, and nothing writes a built model's
facts back into the config. ``config.yaml`` records exactly the resolved config. What is settled:

- the fidelity switches (``fidelity``: ours or the authors' release; :mod:`manpp.config.fidelity`), and
  ``gray_to_rgb`` for library models (``timm/...``, ``torchvision/...``), which read RGB;
- K (the backbone's default, capped at its number of units), the split (``even``, or ``paper``
  where the release has a preset for the model and K under ``fidelity=release``);
- the objective (the method's own, the one asked for, or the backbone family's default) and its
  full settings (``objective_settings``: defaults, the release's where ``fidelity=release``, then the
  run's own);
- ``aux_lr_scale``: the method's own for its objective under ``fidelity=ours`` (2 for InfoPro's
  heads under InfoPro, MAN and MAN++; 1 for DGL's and PredSim's), 1 under ``fidelity=release``.

What is known of a backbone before it is built (its family, units, default K, paper presets) comes
from its registration by name (:mod:`manpp.models.registry`, :data:`manpp.core.partition.PAPER_PRESETS`);
only a library model, whose cut is found by cutting it, is built once to learn it. Resolving a
resolved config changes nothing.

The local part of the rule is :func:`resolve_local`, which Python's :func:`manpp.local_model` and
:func:`manpp.wrap` apply to the backbone they are given: the command line and Python train the same
defaults. :func:`manpp.objectives.methods.build_local_model` takes only resolved settings and refuses others.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable

from ..base.errors import ManppError
from ..base.registry import METHODS, OBJECTIVES, aux_lr_scale_of, default_objective
from . import trainconfig as C
from . import fidelity as F


@dataclass(frozen=True)
class BackboneFacts:
    """What resolving needs to know of a backbone."""

    family: str  # which auxiliary networks read its features
    units: int
    default_k: int  # K when none is given, at most the units
    presets: tuple[int, ...]  # the nominal K of its paper presets


def backbone_facts(cfg: C.TrainConfig) -> BackboneFacts:
    """The facts of ``cfg.model``: from its registration, or (a library model) from cutting it once."""
    from ..models import BACKBONES
    from ..core.partition import PAPER_PRESETS, capped_k

    entry = BACKBONES.find(cfg.model)
    if entry.units is not None and entry.family is not None:
        name = entry.name if entry.matches is None else str(cfg.model).strip().lower()
        units = entry.units(name)
        presets = tuple(sorted(PAPER_PRESETS.get(name, {})))
        return BackboneFacts(entry.family, units, capped_k(entry.default_k, units), presets)
    from ..models import build_backbone

    info = data_info(cfg)
    return facts_of(build_backbone(cfg.model, num_classes=info.num_classes, in_channels=info.in_channels,
                                   image_size=info.image_size, anchor_base=cfg.anchor_base))


def facts_of(backbone) -> BackboneFacts:
    """The facts of a built backbone (a library model, or one given to ``local_model`` or ``wrap``)."""
    from ..objectives.methods import family_of
    from ..core.partition import default_k

    return BackboneFacts(family_of(backbone), len(backbone.units), default_k(backbone), ())


def data_info(cfg: C.TrainConfig):
    """The :class:`~manpp.data.DatasetInfo` of a run's dataset, for its model's task, after the data
    switches (reads no data)."""
    from ..data import DATASETS, dataset_info
    from ..data.options import adjusted_info
    from ..models import model_task

    cfg = resolve_switches(cfg)  # a no-op for a resolved config
    info = dataset_info(cfg.dataset, image_size=cfg.image_size, task=model_task(cfg.model))
    counted = DATASETS.get(info.name).classes_from
    if counted is not None and cfg.data_dir is not None:  # a folder's classes: its subfolders (names only)
        info = dataclasses.replace(info, num_classes=counted(cfg.data_dir))
    return adjusted_info(info, cfg.gray_to_rgb, cfg.normalize)


def _explicit_split(split) -> bool:
    return split is not None and (not isinstance(split, str) or "," in split)


def resolve_switches(cfg: C.TrainConfig) -> C.TrainConfig:
    """The first stage of :func:`resolve`, which needs no backbone: the fidelity switches and
    ``gray_to_rgb`` (what the data and the schedule read)."""
    from ..models.library import is_library_name

    F.check(cfg)
    release = cfg.fidelity == "release"
    values = {name: pair[release] for name, pair in F.SWITCHES.items() if getattr(cfg, name) is None}
    if cfg.gray_to_rgb is None and is_library_name(cfg.model):
        values["gray_to_rgb"] = True  # timm and torchvision models read RGB (and their weights expect it)
    return dataclasses.replace(cfg, **values) if values else cfg


def resolve(cfg: C.TrainConfig) -> C.TrainConfig:
    """``cfg`` with every open choice made (see the module docstring); checks what the choices need."""
    cfg = resolve_switches(cfg)
    local, aux_lr_scale = resolve_local(cfg.local_settings(), lambda: backbone_facts(cfg),
                                        release=cfg.fidelity == "release", aux_lr_scale=cfg.aux_lr_scale)
    return dataclasses.replace(cfg, k=local.k, split=local.split, objective=local.objective,
                               objective_settings=local.objective_settings, aux_lr_scale=aux_lr_scale)


def resolve_local(settings, facts: Callable[[], BackboneFacts], *, release: bool,
                  aux_lr_scale: float | None) -> tuple:
    """The local settings (:class:`manpp.objectives.methods.LocalSettings`) with every open choice made, and the
    auxiliary networks' lr scale: K, the split, the objective and its full settings, the fidelity switches
    of the model (``copy_init``, ``allow_zero_loss``). ``facts`` is called only when a choice needs the
    backbone. The rule of :func:`resolve`, and of ``manpp.local_model`` and ``manpp.wrap``."""
    switches = {name: F.SWITCHES[name][release] for name in ("copy_init", "allow_zero_loss")
                if getattr(settings, name) is None}
    settings = dataclasses.replace(settings, **switches) if switches else settings
    method = METHODS.get(settings.method)
    if not method.local:  # end-to-end: one module, no objective
        if settings.k not in (None, 1):
            raise ManppError(f"method 'e2e' trains the network as one module: K must be 1, got K={settings.k}")
        return (dataclasses.replace(settings, split=settings.split or "even", objective=None, objective_settings={}),
                1.0 if aux_lr_scale is None else aux_lr_scale)
    chosen = method.objective or settings.objective
    open_k = settings.k is None and not _explicit_split(settings.split)
    known = facts() if chosen is None or open_k or settings.split is None else None  # only what is open
    name = chosen or default_objective(known.family)
    objective = OBJECTIVES.get(name)
    if known is not None:
        objective.check_family(known.family)
    k = known.default_k if open_k else settings.k
    split = settings.split
    if split is None:
        split = F.SPLIT_RELEASE if release and k in known.presets else "even"
    given = {**(objective.release if release else {}), **settings.objective_settings}  # the run's own win
    full = dataclasses.asdict(objective.make_settings(given))
    if aux_lr_scale is None:
        aux_lr_scale = aux_lr_scale_of(method.name, name, release=release)
    return (dataclasses.replace(settings, k=k, split=split, objective=name if method.takes_objective else None,
                                objective_settings=full), aux_lr_scale)


__all__ = ["BackboneFacts", "backbone_facts", "data_info", "facts_of", "resolve", "resolve_local", "resolve_switches"]
