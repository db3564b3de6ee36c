"""ImageNet-scale backbones from torchvision, exposed as ordered units.

- ResNets and ResNeXts (``resnet18`` ... ``resnet152``, ``resnext50_32x4d``, ``resnext101_32x8d``,
  ``wide_resnet50_2``): units are the stem (conv1, bn1, relu, maxpool) and every residual block,
  named ``stem``, ``layer1.0``, ..., with stages 0 (stem) to 4; the head is global average pooling
  and the final linear layer.
- ViTs (``vit_tiny``, ``vit_small``, ``vit_base``; patch 16, depth 12, MLP ratio 4): units are the
  embedding (patch projection, class token, position embedding) and every Transformer block,
  named ``embed``, ``blocks.0``, ...; the head is the final LayerNorm, the class token and a linear
  layer.

The modules are torchvision's own (same initialisation, same parameter shapes), so
:meth:`TorchvisionResNet.export_state_dict` gives a state dict that loads into the plain
torchvision model with ``strict=True``, and :meth:`load_plain_state_dict` takes one (for
example ImageNet-pretrained weights) in.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import ManppError

RESNETS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnext50_32x4d",
           "resnext101_32x8d", "wide_resnet50_2")
VITS = {"vit_tiny": (192, 3), "vit_small": (384, 6), "vit_base": (768, 12)}  # width, heads
VIT_PATCH, VIT_DEPTH = 16, 12


class PlainStateDict:
    """Name mapping between this backbone's state dict and the plain torchvision model's."""

    def _plain_prefixes(self) -> list[tuple[str, str]]:  # (ours, plain), most specific first
        raise NotImplementedError

    def export_state_dict(self) -> dict[str, torch.Tensor]:
        """The backbone's weights under the plain torchvision model's names (no auxiliary nets)."""
        return {self._rename(k, to_plain=True): v.detach().clone() for k, v in self.state_dict().items()}

    def load_plain_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Load weights saved from the plain torchvision model (e.g. ImageNet-pretrained ones)."""
        self.load_state_dict({self._rename(k, to_plain=False): v for k, v in state.items()})

    def plain_model(self) -> nn.Module:
        """A fresh plain torchvision model of the same architecture, loaded with these weights."""
        model = self._make_plain()
        model.load_state_dict(self.export_state_dict())
        return model

    def _rename(self, key: str, to_plain: bool) -> str:
        for ours, plain in self._plain_prefixes():
            src, dst = (ours, plain) if to_plain else (plain, ours)
            if key == src.rstrip(".") or key.startswith(src):
                return dst + key[len(src):]
        raise KeyError(f"no mapping for state-dict key '{key}'")


class TorchvisionResNet(PlainStateDict, nn.Module):
    """A torchvision ResNet/ResNeXt cut into units: [stem, layer1.0, ..., layer4.(n-1)]."""

    aux_family = "imagenet"  # InfoPro heads of the release's ImageNet code

    def __init__(self, arch: str = "resnet101", num_classes: int = 1000, in_channels: int = 3,
                 replace_stride_with_dilation: list[bool] | None = None):
        super().__init__()
        import torchvision

        self.arch = arch
        self.num_classes, self.in_channels = num_classes, in_channels
        net = getattr(torchvision.models, arch)(weights=None, num_classes=num_classes,
                                                replace_stride_with_dilation=replace_stride_with_dilation)
        if in_channels != 3:
            old = net.conv1
            net.conv1 = nn.Conv2d(in_channels, old.out_channels, old.kernel_size, old.stride, old.padding, bias=False)
            nn.init.kaiming_normal_(net.conv1.weight, mode="fan_out", nonlinearity="relu")
        units, names, stages = resnet_units(net)
        self.units = nn.ModuleList(units)
        self.unit_names, self.unit_stages = names, stages
        self.head = PoolLinear(net.fc)

    def reinit_(self, module: nn.Module) -> None:
        """Re-draw a module's weights as torchvision initialises a ResNet (for random copies)."""
        for m in module.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for unit in self.units:
            x = unit(x)
        return self.head(x)

    def _plain_prefixes(self) -> list[tuple[str, str]]:
        pairs = [("units.0.0.", "conv1."), ("units.0.1.", "bn1."), ("head.fc.", "fc.")]
        pairs += [(f"units.{i}.", f"{name}.") for i, name in enumerate(self.unit_names) if i > 0]
        return pairs

    def _make_plain(self) -> nn.Module:
        import torchvision

        net = getattr(torchvision.models, self.arch)(weights=None, num_classes=self.num_classes)
        if self.in_channels != 3:
            net.conv1 = nn.Conv2d(self.in_channels, 64, 7, 2, 3, bias=False)
        return net


def resnet_units(net: nn.Module) -> tuple[list[nn.Module], list[str], list[int]]:
    """A torchvision ResNet's units (the stem, then every residual block), their names and stages."""
    units: list[nn.Module] = [nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)]
    names, stages = ["stem"], [0]
    for s in range(1, 5):
        for i, block in enumerate(getattr(net, f"layer{s}")):
            units.append(block)
            names.append(f"layer{s}.{i}")
            stages.append(s)
    return units, names, stages


class PoolLinear(nn.Module):
    def __init__(self, fc: nn.Linear):
        super().__init__()
        self.fc = fc

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


class ViTEmbed(nn.Module):
    """Patch projection, class token and position embedding: (B, C, H, W) -> (B, 1 + N, D)."""

    def __init__(self, conv_proj: nn.Conv2d, class_token: nn.Parameter, pos_embedding: nn.Parameter,
                 dropout: nn.Module):
        super().__init__()
        self.conv_proj, self.class_token, self.pos_embedding, self.dropout = conv_proj, class_token, pos_embedding, dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_proj(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.class_token.expand(x.shape[0], -1, -1), x], dim=1)
        return self.dropout(x + self.pos_embedding)


class ClassTokenHead(nn.Module):
    """LayerNorm, class token, Linear: the ViT's classifier (and its auxiliary heads' ending)."""

    def __init__(self, ln: nn.LayerNorm, fc: nn.Linear):
        super().__init__()
        self.ln, self.fc = ln, fc

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.ln(x)[:, 0])


class TorchvisionViT(PlainStateDict, nn.Module):
    """torchvision's VisionTransformer (patch 16, depth 12) at the Tiny/Small/Base widths, as units."""

    aux_family = "vit"  # class-token heads

    def __init__(self, arch: str = "vit_small", num_classes: int = 1000, in_channels: int = 3, image_size: int = 224):
        super().__init__()
        from torchvision.models.vision_transformer import VisionTransformer

        if image_size % VIT_PATCH:
            raise ManppError(f"model '{arch}' needs an image size divisible by its patch size {VIT_PATCH}, "
                             f"got {image_size}")
        width, heads = VITS[arch]
        self.arch, self.num_classes, self.in_channels, self.image_size = arch, num_classes, in_channels, image_size
        net = VisionTransformer(image_size, VIT_PATCH, VIT_DEPTH, heads, width, 4 * width, num_classes=num_classes)
        if in_channels != 3:
            net.conv_proj = nn.Conv2d(in_channels, width, VIT_PATCH, VIT_PATCH)
        self._plain_args = (image_size, VIT_PATCH, VIT_DEPTH, heads, width, 4 * width)
        embed = ViTEmbed(net.conv_proj, net.class_token, net.encoder.pos_embedding, net.encoder.dropout)
        self.units = nn.ModuleList([embed, *net.encoder.layers])
        self.unit_names = ["embed"] + [f"blocks.{i}" for i in range(VIT_DEPTH)]
        self.unit_stages = [0] + [1] * VIT_DEPTH
        self.head = ClassTokenHead(net.encoder.ln, net.heads.head)
        self.width = width

    def reinit_(self, module: nn.Module) -> None:
        for m in module.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.normal_(m.bias, std=1e-6)
            elif isinstance(m, nn.LayerNorm):
                m.reset_parameters()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for unit in self.units:
            x = unit(x)
        return self.head(x)

    def _plain_prefixes(self) -> list[tuple[str, str]]:
        pairs = [("units.0.conv_proj.", "conv_proj."), ("units.0.class_token", "class_token"),
                 ("units.0.pos_embedding", "encoder.pos_embedding"), ("head.ln.", "encoder.ln."),
                 ("head.fc.", "heads.head.")]
        pairs += [(f"units.{i + 1}.", f"encoder.layers.encoder_layer_{i}.") for i in range(VIT_DEPTH)]
        return pairs

    def _make_plain(self) -> nn.Module:
        from torchvision.models.vision_transformer import VisionTransformer

        net = VisionTransformer(*self._plain_args, num_classes=self.num_classes)
        if self.in_channels != 3:
            net.conv_proj = nn.Conv2d(self.in_channels, self.width, VIT_PATCH, VIT_PATCH)
        return net


def load_resnet_weights(backbone: nn.Module, state: dict[str, torch.Tensor]) -> int:
    """Load a plain torchvision ResNet/ResNeXt state dict (e.g. ImageNet-pretrained weights) into the
    ResNet units of ``backbone`` (a classifier, RetinaNet or DeepLabV3 one); its ``fc`` is skipped.

    Returns the number of tensors loaded; a clear error when the weights do not fit.
    """
    inner = "block." if getattr(backbone, "aux_family", "") == "detection" else ""
    prefixes = [("conv1.", f"units.0.{inner}0."), ("bn1.", f"units.0.{inner}1.")]
    prefixes += [(f"{name}.", f"units.{i}.{inner}") for i, name in enumerate(backbone.unit_names) if i > 0]
    mapped = {}
    for key, value in state.items():
        if key.startswith("fc."):
            continue
        target = next((ours + key[len(plain):] for plain, ours in prefixes if key.startswith(plain)), None)
        if target is None:
            raise ManppError(f"pretrained weights do not fit {getattr(backbone, 'arch', 'this model')}: unexpected "
                             f"key '{key}' (expected a torchvision ResNet state dict: conv1, bn1, layer1..layer4, fc)")
        mapped[target] = value
    units = {k for k in backbone.state_dict() if k.startswith("units.")}
    missing = sorted(units - set(mapped))
    if missing:
        raise ManppError(f"pretrained weights do not fit {getattr(backbone, 'arch', 'this model')}: "
                         f"{len(missing)} tensors missing, e.g. '{missing[0]}' (another depth or width?)")
    try:
        backbone.load_state_dict(mapped, strict=False)
    except RuntimeError as exc:
        raise ManppError(f"pretrained weights do not fit {getattr(backbone, 'arch', 'this model')}: "
                         f"{str(exc).splitlines()[-1].strip()}") from None
    return len(mapped)
