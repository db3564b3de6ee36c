"""Generated classification data: one smooth random template per class plus Gaussian noise."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..base.errors import ManppError
from .common import TensorImageDataset, is_integer
from .info import DatasetInfo, register_dataset

TEMPLATE_GRID = 8  # templates are random grid x grid images, upsampled to the image size
TEMPLATE_WEIGHT, NOISE_WEIGHT = 0.8, 0.6  # an image is TEMPLATE_WEIGHT * template + NOISE_WEIGHT * noise


def build_synthetic(samples: tuple[int, int], seed: int,
                    info: DatasetInfo) -> tuple[TensorImageDataset, TensorImageDataset]:
    """Class template + Gaussian noise; templates are smooth (8x8 upsampled) random colour images."""
    if (not isinstance(samples, (tuple, list)) or len(samples) != 2
            or not all(is_integer(n) and n > 0 for n in samples)):
        raise ManppError(f"synthetic_samples={samples!r} is invalid; expected (n_train, n_test), "
                         f"two positive integers")
    k, c, size = info.num_classes, info.in_channels, info.image_size
    generator = torch.Generator().manual_seed(int(seed))
    templates = F.interpolate(torch.randn(k, c, TEMPLATE_GRID, TEMPLATE_GRID, generator=generator),
                              size=(size, size), mode="bilinear", align_corners=False)
    templates = (templates - templates.mean()) / templates.std()

    def draw(n: int) -> TensorImageDataset:
        labels = torch.randperm(n, generator=generator) % k
        noise = torch.randn(n, c, size, size, generator=generator)
        return TensorImageDataset(TEMPLATE_WEIGHT * templates[labels] + NOISE_WEIGHT * noise, labels)

    return draw(int(samples[0])), draw(int(samples[1]))


@register_dataset("synthetic", channels=3, image_size=32, classes=10, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0),
                  resizable=True)
def _build(info, *, seed: int, samples: tuple[int, int] = (512, 128), **_):
    return build_synthetic(samples, seed, info)
