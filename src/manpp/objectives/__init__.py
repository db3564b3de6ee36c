"""Local objectives: the auxiliary networks that train a module from its own output.

An objective's head is an ``nn.Module`` whose ``forward(features, ctx)`` returns a scalar loss,
where ``ctx`` is a :class:`manpp.core.engine.LocalContext` (targets, and the un-normalised image for
reconstruction losses). Each objective is one file that registers itself by name with its own
settings dataclass and the backbone families it reads (:mod:`manpp.base.registry`); importing it
here is its registration line.
"""

from __future__ import annotations

from ..base.registry import OBJECTIVES, default_objective, objective_names
from . import dgl, infopro, predsim  # noqa: F401  (each registers itself)
from .spec import AuxSpec

__all__ = ["AuxSpec", "OBJECTIVES", "default_objective", "objective_names"]
