"""CIFAR-style ResNets (He et al. 2016, section 4.2) of any depth 6n+2, cut into units.

Widths 16 / 16 / 32 / 64: a 3x3 stem, then three stages of n BasicBlocks. ResNet-32 has
n = 5 and ResNet-110 n = 18. The shortcut of a block that changes shape is a 1x1 conv + BN,
as in the InfoPro/MAN++ releases. Weights: conv N(0, sqrt(2 / (k*k*C_out))), BN 1 / 0.
"""

from __future__ import annotations

import math
import re

import torch
from torch import nn

from ..base.errors import ManppError
from .chain import UnitChain
from .imagenet import RESNETS
from .registry import register_backbone


def cifar_resnet_depths() -> list[int]:
    """Depths advertised in messages; any 6n+2 >= 8 is accepted."""
    return [20, 32, 44, 56, 110]


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = None
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = x if self.shortcut is None else self.shortcut(x)
        return self.relu(out + identity)


class Stem(nn.Sequential):
    def __init__(self, cin: int, cout: int):
        super().__init__(nn.Conv2d(cin, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class ClassifierHead(nn.Module):
    """Global average pool + linear classifier (the final module's task head)."""

    def __init__(self, channels: int, num_classes: int):
        super().__init__()
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def init_weights(module: nn.Module) -> None:
    """The releases' initialisation: conv N(0, sqrt(2/(k*k*C_out))), BN 1/0, Linear default."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            n = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
            nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / n))
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            m.reset_parameters()


class CifarResNet(UnitChain):
    """ResNet-(6n+2) for 32x32 inputs, exposed as ``units`` = [stem, layer1.0, ..., layer3.(n-1)]."""

    widths = (16, 16, 32, 64)
    default_k = 16  # the paper's CIFAR setting (every unit its own module on ResNet-32)

    def __init__(self, depth: int = 32, num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        if depth < 8 or (depth - 2) % 6:
            raise ManppError(f"CIFAR ResNet depth must be 6n+2 (8, 14, 20, 32, 110, ...), got {depth}")
        n = (depth - 2) // 6
        self.depth, self.blocks_per_stage = depth, n
        # 'resnet50' and 'resnet152' are also torchvision's ImageNet names: keep the presets apart
        self.arch = f"resnet{depth}" if f"resnet{depth}" not in RESNETS else f"cifar_resnet{depth}"
        w = self.widths
        units: list[nn.Module] = [Stem(in_channels, w[0])]
        names, stages = ["stem"], [0]
        cin = w[0]
        for s in range(1, 4):
            for i in range(n):
                stride = 2 if (s > 1 and i == 0) else 1
                units.append(BasicBlock(cin, w[s], stride))
                names.append(f"layer{s}.{i}")
                stages.append(s)
                cin = w[s]
        self.units = nn.ModuleList(units)
        self.unit_names = names
        self.unit_stages = stages
        self.head = ClassifierHead(cin, num_classes)
        self.num_classes = num_classes
        self.in_channels = in_channels
        init_weights(self)

    def reinit_(self, module: nn.Module) -> None:
        """Re-draw a module's weights with this backbone's initialisation (for random copies)."""
        init_weights(module)

def is_cifar_name(name: str) -> bool:
    """``resnet<6n+2>`` (the torchvision names, registered exactly, win) or ``cifar_resnet<6n+2>``."""
    found = re.fullmatch(r"(cifar_)?resnet(\d+)", str(name).strip().lower())
    return found is not None and int(found.group(2)) >= 8 and (int(found.group(2)) - 2) % 6 == 0


def depth_of(name: str) -> int:
    return int(re.sub(r"^(cifar_)?resnet", "", str(name).strip().lower()))


@register_backbone("resnet<6n+2>", family="cifar", matches=is_cifar_name,
                   summary="a CIFAR ResNet of any depth 6n+2, e.g. resnet20, resnet32, resnet56, resnet110; "
                   "cifar_resnet<6n+2> where the name is also torchvision's",
                   units=lambda name: 1 + 3 * ((depth_of(name) - 2) // 6), default_k=CifarResNet.default_k)
def build_cifar_resnet(name: str, *, num_classes: int = 10, in_channels: int = 3, **_) -> CifarResNet:
    return CifarResNet(depth_of(name), num_classes=num_classes, in_channels=in_channels)
