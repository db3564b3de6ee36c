"""PredSim (Nøkland & Eidnes, "Training Neural Networks with Local Error Signals", ICML 2019).

Two local losses on a module's output h, mixed as ``(1 - beta) * pred + beta * sim``:

- *sim*, similarity matching: a 3x3 conv of h, flattened per image; its batch similarity matrix
  (cosine similarity of the centred rows) is pulled towards that of the one-hot labels, with a
  mean squared error. Images of one class are pushed together, others apart, without a classifier.
- *pred*, prediction: h average-pooled to at most ``pred_features`` values, then a linear
  classifier and cross-entropy.

The paper's beta is 0.99. The AugLocal paper (Ma et al., ICLR 2024) compares against it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from ..base.errors import ManppError
from ..base.registry import register_objective
from ..base.settings import setting
from ..models.cifar_resnet import init_weights


@dataclass
class PredSimSettings:
    beta: float = setting(0.99, help="the weight of the similarity loss; 1 - beta goes to the prediction loss")
    pred_features: int = setting(2048, help="the prediction head reads the features pooled to at most this many "
                                 "values")


def similarity_matrix(x: torch.Tensor) -> torch.Tensor:
    """Cosine similarity between the centred rows of ``x`` flattened per sample: (N, N) in [-1, 1]."""
    x = x.flatten(1).float()
    x = x - x.mean(dim=1, keepdim=True)
    x = x / (x.norm(dim=1, keepdim=True) + 1e-8)
    return (x @ x.T).clamp(-1, 1)


class PredSimHead(nn.Module):
    def __init__(self, channels: int, size: int, num_classes: int, beta: float = 0.99, pred_features: int = 2048):
        super().__init__()
        if not 0.0 <= beta <= 1.0:
            raise ManppError(f"predsim beta must be between 0 and 1, got {beta}")
        self.beta, self.num_classes = float(beta), num_classes
        self.sim_conv = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)
        self.pool_side = max(1, min(size, math.isqrt(max(1, pred_features // channels))))
        self.pred = nn.Linear(channels * self.pool_side ** 2, num_classes)
        init_weights(self.sim_conv)

    def forward(self, h: torch.Tensor, ctx) -> torch.Tensor:
        y = ctx.targets
        loss = h.new_zeros((), dtype=torch.float32)
        if self.beta > 0:
            target = similarity_matrix(F.one_hot(y, self.num_classes))
            loss = loss + self.beta * F.mse_loss(similarity_matrix(self.sim_conv(h)), target)
        if self.beta < 1:
            logits = self.pred(torch.flatten(F.adaptive_avg_pool2d(h, self.pool_side), 1)).float()
            loss = loss + (1 - self.beta) * F.cross_entropy(logits, y)
        return loss

    def extra_repr(self) -> str:
        return f"beta={self.beta:g}, pool_side={self.pool_side}"


@register_objective("predsim", settings=PredSimSettings, families=("cifar", "imagenet"),
                    summary="PredSim: similarity matching + prediction per module")
def build(spec, settings: PredSimSettings, **_) -> PredSimHead:
    return PredSimHead(spec.channels, spec.size, spec.num_classes, settings.beta, settings.pred_features)
