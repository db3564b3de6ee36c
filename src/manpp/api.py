"""The two calls most users need: ``local_model`` (a manpp backbone) and ``wrap`` (your own model)."""

from __future__ import annotations

import dataclasses
import difflib
from typing import Any, Callable, Sequence

from torch import nn

from .base.errors import ManppError
from .config.resolve import facts_of, resolve_local
from .core.engine import LocalModel
from .objectives.methods import LocalSettings, build_local_model
from .tasks import task_of


_DEFAULT = LocalSettings()  # the one declaration of the local settings' defaults (the command line's too)


def local_model(backbone: nn.Module, *, method: str = _DEFAULT.method, k: int | None = _DEFAULT.k,
                objective: str | None = _DEFAULT.objective, split=_DEFAULT.split, in_channels: int | None = None,
                image_size: int | None = None, num_classes: int | None = None,
                ema_momentum: float = _DEFAULT.ema_momentum, copy_init: str | None = _DEFAULT.copy_init,
                scale_init: float = _DEFAULT.scale_init, scale_lr_scale: float = _DEFAULT.scale_lr_scale,
                recompute_ema: bool | str = _DEFAULT.recompute_ema,
                objective_settings: dict[str, Any] | None = None, allow_zero_loss: bool | None = _DEFAULT.allow_zero_loss,
                denormalize: Callable | None = None, task=None, aux_lr_scale: float | None = None,
                **settings) -> LocalModel:
    """Cut ``backbone`` (a manpp backbone: ``manpp.build_backbone``) into ``k`` modules and attach the
    local objectives of ``method``. Every argument after the backbone is a keyword, in the order
    ``wrap`` takes them too.

    Every setting left at None is chosen as ``manpp train`` chooses it (:func:`manpp.config.resolve.resolve_local`,
    ``fidelity=ours``): ``k`` the backbone's default (``partition.default_k``), ``objective`` the one
    registered as the default for its feature family, ``split`` ``"even"``, ``copy_init`` ``"copy"``.
    ``objective_settings`` (or any other keyword, e.g. ``ixx_1=5`` for InfoPro) are the objective's own
    settings. ``split`` is ``"even"``, ``"paper"``, ``"memory"`` (balanced activation memory) or a list of
    module end units.
    ``in_channels`` and ``image_size`` are the input's (default: the backbone's own, else 3 and 32).
    Settings that leave a module without any local loss are refused unless ``allow_zero_loss=True``.
    ``aux_lr_scale``: the auxiliary networks' lr over the backbone's (default: the method's own on its
    objective, as ``manpp train`` resolves it), recorded as ``model.aux_lr_scale``; build the optimizer
    from ``manpp.parameter_groups(model, lr=...)`` to apply it. ``scale_lr_scale`` (MAN++): its scales' lr over the
    auxiliary networks', recorded as ``model.scale_lr_scale`` and applied the same way. ``heads=`` and ``image_channels=`` are the
    names of earlier versions, still taken.
    """
    in_channels = in_channels if in_channels is not None else settings.pop("image_channels", None)
    check_sizes("local_model", k=k, in_channels=in_channels, image_size=image_size, num_classes=num_classes)
    _check_backbone(backbone, num_classes)
    given = {**(objective_settings or {}), **(settings.pop("heads", None) or {})}
    _check_keywords("local_model", settings)
    local = LocalSettings(method=method, k=k, split=split, objective=objective, ema_momentum=ema_momentum,
                          copy_init=copy_init, recompute_ema=recompute_ema, scale_init=scale_init,
                          scale_lr_scale=scale_lr_scale,
                          objective_settings={**given, **settings}, allow_zero_loss=allow_zero_loss)
    local, aux_lr_scale = resolve_local(local, lambda: facts_of(backbone), release=False, aux_lr_scale=aux_lr_scale)
    return build_local_model(
        backbone, local,
        num_classes=num_classes or backbone.num_classes,
        in_channels=in_channels or getattr(backbone, "in_channels", 3),
        image_size=image_size or getattr(backbone, "image_size", None) or 32, denormalize=denormalize,
        task=task or task_of(backbone), aux_lr_scale=aux_lr_scale,
    )


def check_sizes(caller: str, **values) -> None:
    """K, channels, image size, classes: None (the default) or a whole number of at least 1, named when not."""
    for name, value in values.items():
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ManppError(f"{caller}: {name} must be a whole number of at least 1 (or None for the default), got "
                             f"{value!r} ({type(value).__name__})")


KEYWORDS = ("method", "k", "objective", "split", "in_channels", "image_size", "num_classes", "ema_momentum",
            "copy_init", "scale_init", "scale_lr_scale", "recompute_ema", "objective_settings", "allow_zero_loss", "denormalize", "task",
            "aux_lr_scale")


def _check_keywords(caller: str, settings: dict) -> None:
    """A keyword that is no objective's setting is a mistyped keyword: named, with what is accepted."""
    from .base.registry import OBJECTIVES

    known = {f.name for _, o in OBJECTIVES.items() for f in dataclasses.fields(o.settings)}
    unknown = [key for key in settings if key not in known]
    if unknown:
        close = difflib.get_close_matches(unknown[0], [*KEYWORDS, *known], n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ManppError(f"{caller}: unknown keyword {unknown[0]!r}{hint}: accepted are {', '.join(KEYWORDS)}"
                         f"{', units, head' if caller == 'wrap' else ''}, and the objective's settings (manpp "
                         f"settings objective_settings lists them)")


def _check_backbone(backbone, num_classes: int | None) -> None:
    """What the engine needs of a backbone, checked up front: one clear line instead of an AttributeError."""
    name = type(backbone).__name__
    units = getattr(backbone, "units", None)
    if not isinstance(backbone, nn.Module) or not isinstance(units, (nn.ModuleList, nn.Sequential)) or \
            len(units) == 0 or not isinstance(getattr(backbone, "head", None), nn.Module):
        raise ManppError(f"local_model takes a backbone that exposes its units (.units, a ModuleList, and .head), "
                         f"such as manpp.build_backbone('resnet32'); a {name} has none: to train your own model, "
                         f"use manpp.wrap(model, k=...), which cuts torchvision and timm models, nn.Sequential and "
                         f"unit lists")
    if num_classes is None and not isinstance(getattr(backbone, "num_classes", None), int):
        raise ManppError(f"local_model needs num_classes: the {name} backbone does not say how many classes it has")


def wrap(model: nn.Module | Sequence[nn.Module], *, method: str = _DEFAULT.method, k: int | None = _DEFAULT.k,
         objective: str | None = _DEFAULT.objective, split=_DEFAULT.split, in_channels: int | None = None,
         image_size: int | None = None,
         num_classes: int | None = None, units: Sequence[str | nn.Module] | None = None,
         head: nn.Module | str | None = None, **options) -> LocalModel:
    """A :class:`~manpp.core.engine.LocalModel` that trains ``model`` itself (its own modules, not copies).

    ``model`` is one of:

    - a torchvision or timm classifier, cut automatically (stem, every block, head);
    - an ``nn.Sequential``: every child is a unit and the last child the head; ``head="<child>"``
      makes that child and the ones after it the head, ``head=<module>`` appends a head of yours;
    - any model with ``units``, the dotted names of its units in forward order, and ``head``, the
      module (or its dotted name) that turns the last unit's output into the logits;
    - a list of unit modules, with ``head=<module>``.

    Every argument after the model is a keyword, in ``local_model``'s order. ``image_size`` and
    ``in_channels`` (default: the model's own, else 224 and the first convolution's input channels)
    shape the batch the cut is checked on and the auxiliary networks are sized for; ``num_classes``
    defaults to the head's output width. ``local.export_state_dict()`` gives the trained weights
    under ``model``'s own state-dict keys. See :mod:`manpp.models.wrap`. Other ``options`` go to
    :func:`local_model`.
    """
    from .models.wrap import as_backbone

    check_sizes("wrap", k=k, in_channels=in_channels, image_size=image_size, num_classes=num_classes)
    _check_keywords("wrap", {key: v for key, v in options.items() if key not in KEYWORDS and key not in
                             ("heads", "image_channels")})
    backbone = as_backbone(model, units=units, head=head, in_channels=in_channels, image_size=image_size,
                           num_classes=num_classes)
    return local_model(backbone, method=method, k=k, objective=objective, split=split,
                       in_channels=backbone.in_channels, image_size=backbone.image_size,
                       num_classes=backbone.num_classes, **options)
