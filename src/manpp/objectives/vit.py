"""The class-token classifier that is a ViT module's auxiliary head (docs/release.md: auxiliary heads)."""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn import functional as F

from ..memory.recompute import run_checkpointed
from ..models.wrap.adapters import ClassTokenHead


class TokenHead(nn.Module):
    """[learnable copy of a block], then the ViT's own classifier shape (LayerNorm, class token,
    Linear), cross-entropy.

    For MAN/MAN++ the release puts a learnable copy of the block after the copied one here (its
    second LB block); ``block`` is copied, not shared.
    """

    def __init__(self, width: int, num_classes: int, block: nn.Module | None = None):
        super().__init__()
        self.block = copy.deepcopy(block) if block is not None else None
        fc = nn.Linear(width, num_classes)
        nn.init.trunc_normal_(fc.weight, std=0.02)
        nn.init.zeros_(fc.bias)
        self.classify = ClassTokenHead(nn.LayerNorm(width, eps=1e-6), fc)
        # activation checkpointing (set by the local model): the block is recomputed in backward, so its
        # activations are not alive beside those of MAN++'s copies while they are recomputed
        self.checkpointing = "off"

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        if self.block is None:
            return self.classify(x)
        if self.checkpointing != "off" and torch.is_grad_enabled() and x.requires_grad:
            return self.classify(run_checkpointed(self.block, x, [self.block]))
        return self.classify(self.block(x))

    def forward(self, x: torch.Tensor, ctx) -> torch.Tensor:
        return F.cross_entropy(self.logits(x).float(), ctx.targets)
