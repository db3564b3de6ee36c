"""torchvision classifiers: ResNet-like models (stem, then every block), VisionTransformer (embedding,
then every encoder block), Swin (every block between channel permutations), and models with
``features`` (VGG, AlexNet, MobileNet, EfficientNet, ConvNeXt, RegNet's ``trunk_output``)."""

from __future__ import annotations

import torch
from torch import nn

from ...base.errors import ManppError
from .adapters import TO_NCHW, TO_NHWC, ClassTokenHead, Permute, PoolHead, PoolLinear, ViTEmbed, channels_first
from .cut import HOW_TO, Cut, around, call_order, evaluating, kind_of, run_model

# layers not worth a unit of their own in a torchvision ``features`` list: they join the unit before
LIGHT = (nn.ReLU, nn.ReLU6, nn.SiLU, nn.GELU, nn.Hardswish, nn.Dropout, nn.Identity, nn.BatchNorm2d, nn.LayerNorm,
         nn.MaxPool2d)


def cut_resnet(model: nn.Module, x: torch.Tensor) -> Cut:
    """A ResNet-like model (``layer1..N`` and ``fc``): the stem (whatever runs before ``layer1``:
    conv1, bn1, relu or act1, maxpool), then every block; the head pools and applies ``fc``."""
    children = dict(model.named_children())
    layers = [f"layer{i}" for i in range(1, 9) if f"layer{i}" in children]
    with evaluating(model):
        order = call_order(model, lambda: run_model(model, lambda: model(x), x))
    before, _ = around(order, layers, model)
    units: list[tuple[str, nn.Module, int | None]] = [("stem", nn.Sequential(*[children[n] for n in before]), 0)]
    for s, name in enumerate(layers, 1):
        units += [(f"{name}.{i}", block, s) for i, block in enumerate(children[name])]
    return Cut(units, PoolLinear(model.fc), kind_of(model).lower(), model, "error", label=kind_of(model))


def cut_torchvision_vit(model: nn.Module, x: torch.Tensor | None = None) -> Cut:
    embed = ViTEmbed(model.conv_proj, model.class_token, model.encoder.pos_embedding, model.encoder.dropout)
    layers = list(model.encoder.layers)
    units = [("embed", embed, 0)] + [(f"encoder.layers.{i}", layer, 1) for i, layer in enumerate(layers)]
    heads = list(model.heads.named_children())
    fc = heads[0][1] if [n for n, _ in heads] == ["head"] else model.heads  # the plain linear head when it is one
    head = ClassTokenHead(model.encoder.ln, fc)
    return Cut(units, head, kind_of(model).lower(), model, "error", label=kind_of(model))


def cut_torchvision_swin(model: nn.Module, x: torch.Tensor | None = None) -> Cut:
    """torchvision Swin: patch embedding, then every block (a patch merging joins the block after it),
    each between permutations so that the units give (B, C, H, W) maps."""
    layers = list(model.features.named_children())
    units: list[tuple[str, nn.Module, int | None]] = [
        (f"features.{layers[0][0]}", nn.Sequential(layers[0][1], Permute(TO_NCHW)), 0)]
    pending: list[nn.Module] = []
    stage = 0
    for name, layer in layers[1:]:
        if not isinstance(layer, nn.Sequential):
            pending.append(layer)  # patch merging
            continue
        stage += 1
        for i, block in layer.named_children():
            unit = nn.Sequential(*pending, block) if pending else block
            units.append((f"features.{name}.{i}", channels_first(unit), stage))
            pending = []
    if pending:
        raise ManppError(f"cannot cut {kind_of(model)}: its features end with a layer that is not a stage; {HOW_TO}")
    head = nn.Sequential(Permute(TO_NHWC), model.norm, model.permute, model.avgpool, model.flatten, model.head)
    return Cut(units, head, kind_of(model).lower(), model, "error", label=kind_of(model))


def cut_features(model: nn.Module, x: torch.Tensor | None = None) -> Cut:
    """A model with ``features`` (or RegNet's ``stem`` + ``trunk_output``), a pool and a classifier; the
    stages are inferred from where the feature maps shrink."""
    kind = kind_of(model)
    if isinstance(getattr(model, "features", None), nn.Sequential):
        features, prefix, pre = model.features, "features", []
    else:
        features, prefix = model.trunk_output, "trunk_output"
        pre = [("stem", model.stem, None)] if isinstance(getattr(model, "stem", None), nn.Module) else []
    units: list[tuple[str, nn.Module, int | None]] = list(pre)
    for name, layer in features.named_children():
        children = list(layer.named_children()) if isinstance(layer, nn.Sequential) else []
        openable = len(children) > 1 and not all(isinstance(c, (nn.Conv2d, *LIGHT)) for _, c in children)
        for block_name, block in ([(f"{name}.{n}", c) for n, c in children] if openable else [(str(name), layer)]):
            if units and isinstance(block, LIGHT):  # an activation, norm or pool joins the unit before it
                last_name, last, last_stage = units[-1]
                units[-1] = (last_name, nn.Sequential(last, block), last_stage)
                continue
            units.append((f"{prefix}.{block_name}", block, None))
    classifier = next((getattr(model, a) for a in ("classifier", "fc")
                       if isinstance(getattr(model, a, None), nn.Module)), None)
    if classifier is None:
        raise ManppError(f"cannot cut {kind}: it has '{prefix}' but no 'classifier' or 'fc' to use as the head; "
                         f"{HOW_TO}")
    head = PoolHead(getattr(model, "avgpool", None), classifier)
    return Cut(units, head, kind.lower(), model, "error", label=kind)


def _has(model: nn.Module, *names: str) -> bool:
    return all(hasattr(model, n) for n in names)


def is_resnet_like(model: nn.Module) -> bool:
    return _has(model, "layer1", "fc") and isinstance(model.layer1, nn.Sequential)


def is_vit(model: nn.Module) -> bool:
    return _has(model, "conv_proj", "class_token", "encoder", "heads")


def is_swin(model: nn.Module) -> bool:
    return _has(model, "features", "norm", "permute", "avgpool", "flatten", "head")


def has_features(model: nn.Module) -> bool:
    return isinstance(getattr(model, "features", None), nn.Sequential) or isinstance(
        getattr(model, "trunk_output", None), nn.Sequential)


# (predicate, cutter) of each family this module recognises, tried in order
FAMILIES = [(is_resnet_like, cut_resnet), (is_vit, cut_torchvision_vit), (is_swin, cut_torchvision_swin),
            (has_features, cut_features)]

__all__ = ["FAMILIES", "cut_features", "cut_resnet", "cut_torchvision_swin", "cut_torchvision_vit"]
