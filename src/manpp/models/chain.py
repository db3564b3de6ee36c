"""The forward every backbone shares: its units in order, then its head (see :mod:`manpp.models`)."""

from __future__ import annotations

import torch
from torch import nn


class UnitChain(nn.Module):
    """A backbone as manpp sees it: ``units`` (an ``nn.ModuleList``) applied in order, then ``head``."""

    def run_units(self, x: torch.Tensor) -> torch.Tensor:
        for unit in self.units:
            x = unit(x)
        return x

    def forward(self, x: torch.Tensor):
        return self.head(self.run_units(x))
