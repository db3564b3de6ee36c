"""The block the convolutional auxiliary heads are built of (DGL's and InfoPro's)."""

from __future__ import annotations

from torch import nn


def conv_bn_relu(cin: int, cout: int, kernel: int = 1, stride: int = 1) -> list[nn.Module]:
    """Convolution without bias ("same" padding), BatchNorm, ReLU: as a list, to splice into a Sequential."""
    return [nn.Conv2d(cin, cout, kernel, stride, kernel // 2, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]
