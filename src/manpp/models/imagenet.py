"""ImageNet-scale backbones from torchvision, exposed as ordered units.

- ResNets and ResNeXts (``resnet18`` ... ``resnet152``, ``resnext50_32x4d``, ``resnext101_32x8d``,
  ``wide_resnet50_2``): units are the stem (conv1, bn1, relu, maxpool) and every residual block,
  named ``stem``, ``layer1.0``, ..., with stages 0 (stem) to 4; the head is global average pooling
  and the final linear layer.
- ViTs (``vit_tiny``, ``vit_small``, ``vit_base``; patch 16, depth 12, MLP ratio 4): units are the
  embedding (patch projection, class token, position embedding) and every Transformer block,
  named ``embed``, ``blocks.0``, ...; the head is the final LayerNorm, the class token and a linear
  layer.

Both are built by torchvision and cut by the same cutter as :func:`manpp.wrap`
(:mod:`manpp.models.wrap`), so their modules are torchvision's own (same initialisation, same
parameter shapes) and their export is wrap's: ``export_state_dict()`` gives the plain torchvision
model's keys (``strict=True`` loads them), ``load_plain_state_dict`` takes such a state dict in (for
example ImageNet-pretrained weights), and ``plain_model()`` gives the plain model itself.
"""

from __future__ import annotations

import torch
from torch import nn

from ..base.errors import ManppError
from .registry import register_backbone

# blocks per stage of every torchvision ResNet/ResNeXt manpp names
RESNET_BLOCKS = {"resnet18": (2, 2, 2, 2), "resnet34": (3, 4, 6, 3), "resnet50": (3, 4, 6, 3),
                 "resnet101": (3, 4, 23, 3), "resnet152": (3, 8, 36, 3), "resnext50_32x4d": (3, 4, 6, 3),
                 "resnext101_32x8d": (3, 4, 23, 3), "wide_resnet50_2": (3, 4, 6, 3)}
RESNETS = tuple(RESNET_BLOCKS)
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


def torchvision_resnet(arch: str, num_classes: int = 1000, in_channels: int = 3,
                       replace_stride_with_dilation: list[bool] | None = None) -> nn.Module:
    """torchvision's ResNet/ResNeXt ``arch``, its first convolution made for ``in_channels`` when not 3."""
    import torchvision

    net = getattr(torchvision.models, arch)(weights=None, num_classes=num_classes,
                                            replace_stride_with_dilation=replace_stride_with_dilation)
    if in_channels != 3:
        old = net.conv1
        net.conv1 = nn.Conv2d(in_channels, old.out_channels, old.kernel_size, old.stride, old.padding, bias=False)
        nn.init.kaiming_normal_(net.conv1.weight, mode="fan_out", nonlinearity="relu")
    return net


def resnet_reinit(module: nn.Module) -> None:
    """Re-draw a module's weights as torchvision initialises a ResNet (for random copies)."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def vit_reinit(module: nn.Module) -> None:
    """Re-draw a module's weights as torchvision initialises a ViT's blocks (for random copies)."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.normal_(m.bias, std=1e-6)
        elif isinstance(m, nn.LayerNorm):
            m.reset_parameters()


def resnet_units_count(name: str) -> int:
    """The stem and every residual block of ResNet ``name`` (for a dense model: of its ResNet)."""
    return 1 + sum(RESNET_BLOCKS[name.split("_", 1)[1] if name.startswith(("retinanet_", "deeplabv3_")) else name])


@register_backbone(*RESNETS, family="imagenet", units=resnet_units_count,
                   export=lambda name, num_classes, image_size: f"torchvision.models.{name}")
def build_resnet(name: str, *, num_classes: int = 1000, in_channels: int = 3, image_size: int = 224, **_):
    """A torchvision ResNet/ResNeXt cut by the same cutter as ``manpp.wrap``: the stem (conv1, bn1, relu,
    maxpool), then every residual block; the head pools and applies ``fc``."""
    from .wrap import as_backbone

    net = torchvision_resnet(name, num_classes, in_channels)
    backbone = as_backbone(net, in_channels=in_channels, image_size=image_size, num_classes=num_classes)
    backbone.arch, backbone.reinit_ = name, resnet_reinit
    return backbone


def vit_loader(name: str, num_classes: int, image_size: int) -> str:
    """The call that builds the plain torchvision ViT an export of ``name`` loads into."""
    width, heads = VITS[name]
    return (f"torchvision.models.vision_transformer.VisionTransformer(image_size={image_size}, patch_size={VIT_PATCH}, "
            f"num_layers={VIT_DEPTH}, num_heads={heads}, hidden_dim={width}, mlp_dim={4 * width}, "
            f"num_classes={num_classes})")


@register_backbone(*VITS, family="vit", units=lambda name: 1 + VIT_DEPTH, export=vit_loader)
def build_vit(name: str, *, num_classes: int = 1000, in_channels: int = 3, image_size: int = 224, **_):
    """torchvision's VisionTransformer (patch 16, depth 12) at the Tiny/Small/Base widths, cut as
    ``manpp.wrap`` cuts it: the embedding, then every encoder block (named ``blocks.i``)."""
    from torchvision.models.vision_transformer import VisionTransformer

    from .wrap import as_backbone

    if image_size % VIT_PATCH:
        raise ManppError(f"model '{name}' needs an image size divisible by its patch size {VIT_PATCH}, "
                         f"got {image_size}")
    width, heads = VITS[name]
    net = VisionTransformer(image_size, VIT_PATCH, VIT_DEPTH, heads, width, 4 * width, num_classes=num_classes)
    if in_channels != 3:
        net.conv_proj = nn.Conv2d(in_channels, width, VIT_PATCH, VIT_PATCH)
    backbone = as_backbone(net, in_channels=in_channels, image_size=image_size, num_classes=num_classes)
    backbone.unit_names = ["embed"] + [f"blocks.{i}" for i in range(VIT_DEPTH)]
    backbone.arch, backbone.reinit_ = name, vit_reinit
    return backbone


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
