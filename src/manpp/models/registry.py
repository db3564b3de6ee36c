"""Backbones by name: each family registers its builder in its own file.

    @register_backbone("resnet18", "resnet34", family="imagenet")
    def build_resnet(name, *, num_classes, in_channels, image_size, **_):
        ...

A name is either exact (``resnet101``) or a pattern with a test (``resnet<6n+2>`` for the CIFAR
ResNets, ``timm/<name>`` for any timm classifier); exact names win, then the patterns in the order
they were registered. ``family`` says which auxiliary networks read the backbone's features
(``cifar``, ``imagenet``, ``vit``, ``detection``, ``segmentation``; None for a library model, whose
family is found when it is cut); ``task`` names its task (:mod:`manpp.tasks`). Every list of model
names (``--help``, errors) reads this registry, so a new family is one file plus its import in
``models/__init__.py``.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Callable

from ..base.errors import ManppError
from ..base.registry import FAMILIES, Registry
from ..core.partition import DEFAULT_K

TASK_NAMES = ("classification", "detection", "segmentation")


@dataclass(frozen=True)
class Backbone:
    """A registered backbone: its builder and what is known of it before it is built."""

    name: str  # the name, or a pattern's label (resnet<6n+2>, timm/<name>)
    build: Callable  # build(name, *, num_classes, in_channels, image_size, anchor_base, pretrained) -> nn.Module
    family: str | None
    task: str = "classification"
    matches: Callable[[str], bool] | None = None  # a pattern's test; None: the name itself
    summary: str = ""
    units: Callable[[str], int] | None = None  # the number of units, known from the name (None: build it)
    default_k: int = DEFAULT_K  # K when none is given (capped at the units)
    # export(name, num_classes, image_size): the call that builds the plain model an export loads into
    # (None: manpp's own backbone, manpp.build_backbone(name, ...))
    export: Callable[[str, int, int], str] | None = None


class BackboneRegistry(Registry[Backbone]):
    """Exact names first, then patterns; an unknown name is one line with the close ones."""

    def find(self, name: str) -> Backbone:
        key = str(name).strip()
        entries = dict(self.items())
        if key.lower() in entries and entries[key.lower()].matches is None:
            return entries[key.lower()]
        for entry in entries.values():
            if entry.matches is not None and entry.matches(key):
                return entry
        exact = [n for n, e in entries.items() if e.matches is None]
        close = difflib.get_close_matches(key.lower(), exact, n=3, cutoff=0.7)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        listed = ", ".join(f"{n} ({e.summary})" if e.summary and e.matches is not None else n
                           for n, e in entries.items())
        raise ManppError(f"unknown model '{name}': accepted are {listed}{hint}")


BACKBONES = BackboneRegistry("model")


def register_backbone(*names: str, family: str | None, task: str = "classification",
                      matches: Callable[[str], bool] | None = None, summary: str = "",
                      units: Callable[[str], int] | None = None, default_k: int = DEFAULT_K,
                      export: Callable[[str, int, int], str] | None = None):
    """Decorator registering ``build`` under every name of ``names`` (with ``matches``: one pattern).

    ``units(name)`` gives the number of units without building the model (what resolving a config
    needs: :mod:`manpp.config.resolve`); ``default_k`` is K when none is given; ``export(name, num_classes,
    image_size)`` the call that builds the plain model ``manpp export``'s file loads into."""
    if family is not None and family not in FAMILIES:
        raise ValueError(f"backbone {names}: unknown family {family!r}; known are {FAMILIES}")
    if task not in TASK_NAMES:
        raise ValueError(f"backbone {names}: unknown task {task!r}; known are {TASK_NAMES}")
    if matches is not None and len(names) != 1:
        raise ValueError("a pattern registers one label")

    def decorator(build: Callable) -> Callable:
        for name in names:
            BACKBONES.add(name, Backbone(name, build, family, task, matches, summary, units, default_k, export))
        return build

    return decorator


__all__ = ["BACKBONES", "Backbone", "register_backbone"]
