"""``as_backbone``: a ready-made classifier as manpp units (what :func:`manpp.wrap` trains).

The wrapped backbone holds the model's OWN modules (not copies), sometimes inside small adapter
modules, so training it trains the model. What can be wrapped:

- **torchvision** classifiers: ResNet / ResNeXt / Wide ResNet (the stem, then every residual
  block); VGG, AlexNet, MobileNet, EfficientNet, ConvNeXt and RegNet (every layer of
  ``features`` / ``trunk_output``, stages opened into their blocks); VisionTransformer (the
  embedding, then every encoder block); Swin (see channels-last below).
- **timm** classifiers (anything with ``forward_features`` and ``forward_head``), cut along timm's
  own structure: the stages named by ``feature_info`` (``layer1..4``, ``stages``, ``blocks``,
  ``layers``) opened into their blocks, the stem being what ``forward_features`` runs before them
  (for ViTs: ``patch_embed``, ``_pos_embed`` with the class token, ``norm_pre``), the head being
  what it runs after them followed by the model's own ``forward_head``: ResNet / ResNeXt,
  ConvNeXt, EfficientNet, MobileNetV3, RegNet, ViT / DeiT at any ``img_size``, Swin, ...
- **channels-last** models (timm Swin, torchvision Swin: stages give (B, H, W, C)): every unit is
  wrapped in permutations so that between units the features are (B, C, H, W) maps, which the
  auxiliary networks read; the head permutes back.
- an **nn.Sequential**: every child is a unit and the last child is the head. ``head="<child
  name>"`` makes that child and the ones after it the head; ``head=<module>`` (not one of its
  children) appends that module as the head and every child is a unit.
- **any model, given its parts**: ``units=[dotted names]`` of its units in forward order (or the
  modules themselves) and ``head=`` (a dotted name or a module) turning the last unit's output
  into the logits; or a **list of units** (no model) with ``head=<module>``.

Units must output (B, C, H, W) feature maps (``aux_family="imagenet"``) or (B, tokens, width)
token sequences with the class token first (``aux_family="vit"``); the head must give (B, classes)
logits. ``as_backbone`` checks this with one forward pass on random images of ``image_size``, and
for a model it recognised itself also that the cut network computes exactly what the model does;
anything it cannot cut is refused with one :class:`~manpp.errors.ManppError` saying why and how to
pass ``units=`` and ``head=`` instead.

``export_state_dict()`` gives the trained weights under the model's own state-dict keys (found by
tensor identity), so they load with ``strict=True`` into a fresh instance of the model. A head
module passed as ``head=`` that is not part of the model is not in it (it is your module, trained
in place). For a list of units it is the backbone's own state dict.
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import torch
from torch import nn

from ..errors import ManppError
from .imagenet import ClassTokenHead, PoolLinear, ViTEmbed

__all__ = ["Permute", "WrappedBackbone", "as_backbone"]

# layers not worth a unit of their own in a torchvision ``features`` list: they join the unit before
LIGHT = (nn.ReLU, nn.ReLU6, nn.SiLU, nn.GELU, nn.Hardswish, nn.Dropout, nn.Identity, nn.BatchNorm2d, nn.LayerNorm,
         nn.MaxPool2d)
TO_NHWC, TO_NCHW = (0, 2, 3, 1), (0, 3, 1, 2)
PARTS = ("manpp.wrap(model, units=[dotted names of the units in forward order], head=<dotted name or module>), "
         "or a list of unit modules with head=<module>")
HOW_TO = "pass its parts instead: " + PARTS


class WrappedBackbone(nn.Module):
    """A wrapped model as manpp units: ``forward(x) = head(units(x))``.

    ``units`` hold the model's own modules, ``unit_names`` and ``unit_stages`` (0 for the stem or
    embedding) describe them, ``aux_family`` says what the units output (see the module docstring).
    """

    def __init__(self, units: Sequence[nn.Module], names: Sequence[str], stages: Sequence[int], head: nn.Module, *,
                 arch: str, aux_family: str, num_classes: int, in_channels: int, image_size: int,
                 export_keys: dict[str, str] | None = None):
        super().__init__()
        self.units = nn.ModuleList(units)
        self.unit_names, self.unit_stages = list(names), list(stages)
        self.head = head
        self.arch, self.aux_family = arch, aux_family
        self.num_classes, self.in_channels, self.image_size = num_classes, in_channels, image_size
        self.export_keys = export_keys  # the model's state-dict key -> ours (None: our own keys)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for unit in self.units:
            x = unit(x)
        return self.head(x)

    def export_state_dict(self) -> dict[str, torch.Tensor]:
        """The trained weights under the wrapped model's own keys (``strict=True`` loads them into a
        fresh instance of it); the backbone's own state dict when no model was wrapped."""
        state = self.state_dict()
        if self.export_keys is None:
            return {k: v.detach().clone() for k, v in state.items()}
        return {key: state[ours].detach().clone() for key, ours in self.export_keys.items()}


class Permute(nn.Module):
    """``x.permute(*dims)``: moves channels between (B, C, H, W) and (B, H, W, C) at unit boundaries."""

    def __init__(self, dims: Sequence[int]):
        super().__init__()
        self.dims = tuple(dims)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.permute(*self.dims)

    def extra_repr(self) -> str:
        return f"dims={self.dims}"


def channels_first(module: nn.Module) -> nn.Module:
    """``module`` (which reads and gives (B, H, W, C)) between (B, C, H, W) neighbours."""
    return nn.Sequential(Permute(TO_NHWC), module, Permute(TO_NCHW))


class ModelMethods(nn.Module):
    """An adapter that calls methods of the wrapped model (``forward_head``, ``_pos_embed``).

    It registers the model's modules and tensors it uses, so they are trained, moved and saved with
    it; the model itself is referenced, not registered (its other modules are the units). Its
    ``training`` flag follows the adapter's, for the model's own code that reads ``self.training``.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.__dict__["model_"] = model  # not a submodule

    def train(self, mode: bool = True):
        super().train(mode)
        self.model_.training = mode
        return self


class TimmHead(ModelMethods):
    """What a timm model's ``forward_features`` runs after its last stage (``post``), then the model's
    own ``forward_head``; ``parts`` are the modules ``forward_head`` uses."""

    def __init__(self, model: nn.Module, post: Sequence[nn.Module], parts: dict[str, nn.Module],
                 channels_last: bool = False):
        super().__init__(model)
        self.channels_last = channels_last
        self.post = nn.Sequential(*post)
        self.parts = nn.ModuleDict(parts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            x = x.permute(*TO_NHWC)
        return self.model_.forward_head(self.post(x))


class TimmTokenEmbed(ModelMethods):
    """A timm ViT's embedding: ``patch_embed``, ``_pos_embed`` (class token, position embedding),
    ``patch_drop``, ``norm_pre``: (B, C, H, W) images -> (B, tokens, width)."""

    def __init__(self, model: nn.Module, parts: dict[str, nn.Module], tensors: dict[str, tuple[torch.Tensor, bool]]):
        super().__init__(model)
        self.parts = nn.ModuleDict(parts)
        attach_tensors(self, tensors)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        model = self.model_
        x = model._pos_embed(model.patch_embed(x))
        for name in ("patch_drop", "norm_pre"):
            step = getattr(model, name, None)
            if step is not None:
                x = step(x)
        return x


class PoolHead(nn.Module):
    """Global average pooling (or the model's own pool), flatten, the model's classifier."""

    def __init__(self, pool: nn.Module | None, classifier: nn.Module):
        super().__init__()
        self.pool = pool if pool is not None else nn.AdaptiveAvgPool2d(1)
        self.classifier = classifier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(x)
        first = next(iter(self.classifier.children()), self.classifier)
        if isinstance(first, (nn.Linear, nn.Dropout)):  # VGG, MobileNet, EfficientNet flatten first; ConvNeXt's
            x = torch.flatten(x, 1)  # classifier starts with a LayerNorm2d and a Flatten of its own
        return self.classifier(x)


def attach_tensors(module: nn.Module, tensors: dict[str, tuple[torch.Tensor, bool]]) -> None:
    """Register a model's root-level parameters and buffers (``name -> (tensor, persistent)``) on ``module``."""
    for name, (tensor, persistent) in tensors.items():
        if isinstance(tensor, nn.Parameter):
            module.register_parameter(name, tensor)
        else:
            module.register_buffer(name, tensor, persistent=persistent)


def root_tensors(model: nn.Module) -> dict[str, tuple[torch.Tensor, bool]]:
    """Parameters and buffers registered on ``model`` itself (a ViT's class token and position embedding),
    as ``name -> (tensor, persistent)``."""
    saved = set(model.state_dict(keep_vars=True))
    out = {n: (p, True) for n, p in model.named_parameters(recurse=False)}
    out.update({n: (b, n in saved) for n, b in model.named_buffers(recurse=False)})
    return out


# --- what the cutters return -----------------------------------------------------------------

@dataclass
class Cut:
    """Units ``(name, module, stage or None)`` and head of a model, and how to check them."""

    units: list[tuple[str, nn.Module, int | None]]
    head: nn.Module
    arch: str
    reference: nn.Module | None  # the model whose state-dict keys are exported (None: the backbone's own)
    check: str | None  # compare the cut network with reference(x): 'error', 'warn' or None
    sequential: bool = False  # an nn.Sequential cut by children (the error advice names head='<child>')
    label: str = ""  # how error messages name the model (default: ``arch``)

    def __post_init__(self):
        self.label = self.label or self.arch


def kind_of(model) -> str:
    return type(model).__name__


def arch_of(model: nn.Module) -> str:
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None)
    arch = cfg.get("architecture") if isinstance(cfg, dict) else None
    return str(arch or kind_of(model).lower())


@contextlib.contextmanager
def evaluating(*roots: nn.Module | None):
    """Eval mode for every module under ``roots`` inside the block, each module's own mode after."""
    modes = {}
    for root in roots:
        if root is not None:
            for m in root.modules():
                modes[id(m)] = (m, m.training)
    for m, _ in modes.values():
        m.training = False
    try:
        with torch.no_grad():
            yield
    finally:
        for m, mode in modes.values():
            m.training = mode


def call_order(model: nn.Module, run: Callable[[], object]) -> list[str]:
    """The names of ``model``'s children in the order ``run()`` calls them."""
    order: list[str] = []
    handles = [child.register_forward_pre_hook(lambda *_, name=name: order.append(name))
               for name, child in model.named_children()]
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    return order


def run_model(model: nn.Module, run: Callable[[], object], x: torch.Tensor):
    try:
        return run()
    except Exception as exc:  # the model's own error on our probe batch, explained
        raise ManppError(f"cannot wrap {kind_of(model)}: it does not run on a batch of shape {tuple(x.shape)} "
                         f"({first_line(exc)}); pass the image_size= and in_channels= it takes") from exc


def first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


def around(order: list[str], trunk: list[str], model: nn.Module) -> tuple[list[str], list[str]]:
    """The children called before and after the trunk (which must run once, in order)."""
    if not trunk or trunk[0] not in order or trunk[-1] not in order:
        raise ManppError(f"cannot cut {kind_of(model)} into units: its forward does not run its stages "
                         f"({', '.join(trunk)}); {HOW_TO}")
    first = order.index(trunk[0])
    last = len(order) - 1 - order[::-1].index(trunk[-1])
    before, middle, after = order[:first], order[first:last + 1], order[last + 1:]
    twice = sorted({n for n in before + after if (before + after).count(n) > 1 or n in trunk})
    if middle != trunk or twice:
        what = f"calls {', '.join(twice)} more than once" if twice else f"runs {', '.join(middle)} between its stages"
        raise ManppError(f"cannot cut {kind_of(model)} into units: its forward {what}; {HOW_TO}")
    return before, after


# --- timm ------------------------------------------------------------------------------------

def is_timm(model: nn.Module) -> bool:
    return type(model).__module__.startswith("timm.") or (
        callable(getattr(model, "forward_features", None)) and callable(getattr(model, "forward_head", None)))


def is_stage(module: nn.Module) -> bool:
    """A container of blocks: a Sequential / ModuleList, or a module with a ``blocks`` Sequential."""
    return isinstance(module, (nn.Sequential, nn.ModuleList)) or isinstance(getattr(module, "blocks", None),
                                                                            nn.Sequential)


def timm_trunk(model: nn.Module) -> list[str]:
    """The model's top-level stage containers in order, from ``feature_info`` (else by name)."""
    children = dict(model.named_children())
    tops: list[str] = []
    for info in getattr(model, "feature_info", None) or []:
        top = str(info.get("module", "")).split(".")[0] if isinstance(info, dict) else ""
        if top in children and top not in tops:
            tops.append(top)
    if len(tops) > 1 and ("stem" in tops[0] or not is_stage(children[tops[0]])):
        tops = tops[1:]  # the first feature is the stem's output (ResNet 'act1', RegNet 'stem')
    if not tops:
        tops = next(([n] for n in ("stages", "layers", "blocks") if n in children and is_stage(children[n])), [])
    if not tops:
        tops = [f"layer{i}" for i in range(1, 9) if f"layer{i}" in children]
    return tops


def open_stage(name: str, stage: nn.Module) -> list[tuple[str, nn.Module]]:
    """A stage's blocks as units; a stage's downsample (before its blocks) joins the first block."""
    if isinstance(stage, (nn.Sequential, nn.ModuleList)):
        return [(f"{name}.{n}", c) for n, c in stage.named_children()]
    blocks = getattr(stage, "blocks", None)
    if isinstance(blocks, nn.Sequential) and len(blocks) and not root_tensors(stage):
        children = list(stage.named_children())
        at = [n for n, _ in children].index("blocks")
        pre = [c for _, c in children[:at] if not isinstance(c, nn.Identity)]
        post = [c for _, c in children[at + 1:] if not isinstance(c, nn.Identity)]
        units = [(f"{name}.blocks.{n}", c) for n, c in blocks.named_children()]
        if pre:
            units[0] = (units[0][0], nn.Sequential(*pre, units[0][1]))
        if post:
            units[-1] = (units[-1][0], nn.Sequential(units[-1][1], *post))
        return units
    return [(name, stage)]


def cut_timm(model: nn.Module, x: torch.Tensor) -> Cut:
    kind = kind_of(model)
    children = dict(model.named_children())
    trunk = timm_trunk(model)
    if not trunk:
        raise ManppError(f"cannot cut {kind} into units: it names no stages (no 'feature_info', 'stages', 'layers', "
                         f"'blocks' or 'layer1..'); {HOW_TO}")
    with evaluating(model):
        order = call_order(model, lambda: run_model(model, lambda: model.forward_features(x), x))
    before, after = around(order, trunk, model)
    channels_last = getattr(model, "output_fmt", None) == "NHWC"
    tensors = root_tensors(model)
    if hasattr(model, "patch_embed") and callable(getattr(model, "_pos_embed", None)):  # a ViT
        if getattr(model, "cls_token", "absent") is None:
            raise ManppError(f"cannot wrap {kind} without a class token (class_token=False): manpp's ViT auxiliary "
                             f"networks read the class token; create the model with class_token=True")
        stem: nn.Module | None = TimmTokenEmbed(model, {n: children[n] for n in before}, tensors)
        stem_name = "embed"
    elif before or tensors:
        stem = nn.Sequential(*[children[n] for n in before])
        attach_tensors(stem, tensors)
        if channels_last:
            stem.append(Permute(TO_NCHW))
        stem_name = "stem"
    else:
        stem = None
    units = [(stem_name, stem, 0)] if stem is not None else []
    tops = [(n, children[n]) for n in trunk]
    only = children[trunk[0]]
    inner = list(only.named_children()) if len(trunk) == 1 and isinstance(only, (nn.Sequential, nn.ModuleList)) else []
    if inner and all(is_stage(c) for _, c in inner):  # one list of stages (ConvNeXt, EfficientNet, Swin)
        tops = [(f"{trunk[0]}.{n}", c) for n, c in inner]
    for s, (name, stage) in enumerate(tops, 1):
        for block_name, block in open_stage(name, stage):
            units.append((block_name, channels_first(block) if channels_last else block, s))
    used = {*before, *trunk, *after}
    head = TimmHead(model, [children[n] for n in after], {n: c for n, c in children.items() if n not in used},
                    channels_last)
    return Cut(units, head, arch_of(model), model, "error")


# --- torchvision -----------------------------------------------------------------------------

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


def cut_torchvision_vit(model: nn.Module) -> Cut:
    embed = ViTEmbed(model.conv_proj, model.class_token, model.encoder.pos_embedding, model.encoder.dropout)
    layers = list(model.encoder.layers)
    units = [("embed", embed, 0)] + [(f"encoder.layers.{i}", layer, 1) for i, layer in enumerate(layers)]
    head = ClassTokenHead(model.encoder.ln, model.heads)
    return Cut(units, head, kind_of(model).lower(), model, "error", label=kind_of(model))


def cut_torchvision_swin(model: nn.Module) -> Cut:
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


def cut_features(model: nn.Module) -> Cut:
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


def cut_recognised(model: nn.Module, x: torch.Tensor) -> Cut:
    """The cut of a timm or torchvision classifier, else one clear error."""
    kind = kind_of(model)
    has = lambda *names: all(hasattr(model, n) for n in names)  # noqa: E731
    if is_timm(model):
        return cut_timm(model, x)
    if has("layer1", "fc") and isinstance(model.layer1, nn.Sequential):
        return cut_resnet(model, x)
    if has("conv_proj", "class_token", "encoder", "heads"):
        return cut_torchvision_vit(model)
    if has("features", "norm", "permute", "avgpool", "flatten", "head"):
        return cut_torchvision_swin(model)
    if isinstance(getattr(model, "features", None), nn.Sequential) or isinstance(
            getattr(model, "trunk_output", None), nn.Sequential):
        return cut_features(model)
    named = [n for n, _ in model.named_children()]
    raise ManppError(f"cannot cut {kind} into units: it is not a torchvision or timm classifier manpp recognises "
                     f"(none of its modules ({', '.join(named) or 'none'}) is a known stage list such as ResNet "
                     f"'layer1..4', 'features', timm 'stages'/'blocks' or a ViT 'encoder.layers'); {HOW_TO}")


# --- models described by the user -----------------------------------------------------------

def find_submodule(model: nn.Module, name: str, what: str) -> nn.Module:
    try:
        module = model.get_submodule(name)
    except AttributeError:
        top = [n for n, _ in model.named_children()]
        raise ManppError(f"{what} '{name}' is not a module of {kind_of(model)}: give a dotted name such as "
                         f"'layer1.0'; its top-level modules are {', '.join(top) or 'none'}") from None
    if not name or module is model:
        raise ManppError(f"{what} '{name}' is the whole {kind_of(model)}: name one of its parts")
    return module


def check_disjoint(parts: list[tuple[str, nn.Module]]) -> None:
    """No part may be, or contain, another (it would run twice)."""
    for i, (a, ma) in enumerate(parts):
        inside = {id(m) for m in ma.modules()}
        for j, (b, mb) in enumerate(parts):
            if i != j and id(mb) in inside:
                relation = "is the same module as" if ma is mb else "contains"
                raise ManppError(f"'{a}' {relation} '{b}': units and head must be separate modules, each run once")


def cut_named(model: nn.Module, units: Sequence, head) -> Cut:
    """``units=`` (dotted names or modules of ``model``) and ``head=`` (a dotted name or a module)."""
    if isinstance(units, str) or not isinstance(units, Iterable):
        raise ManppError(f"units= must be a list of dotted module names in forward order, got {units!r}")
    names_of = {id(m): n for n, m in model.named_modules() if n}
    parts = []
    for i, ref in enumerate(units):
        if isinstance(ref, str):
            parts.append((ref, find_submodule(model, ref, "unit")))
        elif isinstance(ref, nn.Module):
            parts.append((names_of.get(id(ref), f"unit{i}"), ref))
        else:
            raise ManppError(f"units= holds {type(ref).__name__} {ref!r}: give dotted module names (or modules)")
    if not parts:
        raise ManppError("units= is empty: name at least one unit")
    if head is None:
        raise ManppError(f"units= needs head=: the module (or its dotted name) of {kind_of(model)} that turns the "
                         f"last unit's output into the logits")
    head_module = find_submodule(model, head, "head") if isinstance(head, str) else head
    if not isinstance(head_module, nn.Module):
        raise ManppError(f"head= must be a module or a dotted module name, got {type(head).__name__}")
    check_disjoint(parts + [("head", head_module)])
    inside = id(head_module) in names_of
    return Cut([(n, m, None) for n, m in parts], head_module, kind_of(model).lower(), model,
               "warn" if inside else None, label=kind_of(model))


def cut_sequential(model: nn.Sequential, head) -> Cut:
    children = list(model.named_children())
    names = [n for n, _ in children]
    if isinstance(head, nn.Module) and any(head is c for _, c in children):
        head = names[[c for _, c in children].index(head)]
    if head is None:
        if len(children) < 2:
            raise ManppError(f"cannot wrap a Sequential of {len(children)} module(s): it needs at least one unit and "
                             f"a head (its last child), or head=<module>")
        head = names[-1]
    if isinstance(head, str):
        if head not in names:
            raise ManppError(f"head '{head}' is not a child of the Sequential: its children are {', '.join(names)}")
        at = names.index(head)
        if at == 0:
            raise ManppError(f"head '{head}' is the Sequential's first child: no units would be left before it")
        tail = [c for _, c in children[at:]]
        head_module, inside = tail[0] if len(tail) == 1 else nn.Sequential(*tail), True
        children = children[:at]
    elif isinstance(head, nn.Module):
        head_module, inside = head, False
        check_disjoint(children + [("head", head)])
    else:
        raise ManppError(f"head= must be a child name or a module, got {type(head).__name__}")
    return Cut([(n, c, None) for n, c in children], head_module, "sequential", model, "warn" if inside else None,
               sequential=True, label=kind_of(model))


def cut_list(units: Sequence, head) -> Cut:
    modules = list(units)
    bad = [f"{i} ({type(m).__name__})" for i, m in enumerate(modules) if not isinstance(m, nn.Module)]
    if bad or not modules:
        raise ManppError(f"a list of units must hold nn.Module objects, got {', '.join(bad) or 'an empty list'}")
    if not isinstance(head, nn.Module):
        raise ManppError("a list of units needs head=<module>: the module that turns the last unit's output into "
                         "the logits")
    parts = [(str(i), m) for i, m in enumerate(modules)]
    check_disjoint(parts + [("head", head)])
    return Cut([(n, m, None) for n, m in parts], head, "units", None, None, label="the list of units")


# --- checks ----------------------------------------------------------------------------------

def export_keys(backbone: nn.Module, reference: nn.Module, label: str) -> dict[str, str]:
    """The reference model's state-dict key -> the backbone's key holding the same tensor."""
    ours: dict[int, str] = {}
    for key, tensor in backbone.state_dict(keep_vars=True).items():
        ours.setdefault(id(tensor), key)
    mapping, missing = {}, []
    for key, tensor in reference.state_dict(keep_vars=True).items():
        if id(tensor) in ours:
            mapping[key] = ours[id(tensor)]
        else:
            missing.append(key)
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ManppError(f"cannot wrap {label}: its tensor '{missing[0]}'{more} is in none of the units or the head, "
                         f"so training would not update it and export_state_dict() could not give it back; add the "
                         f"module that holds it to units= or head=")
    return mapping


def feature_family(cut: Cut, shapes: list[tuple[int, ...]]) -> str:
    """'imagenet' for (B, C, H, W) unit outputs, 'vit' for (B, tokens, width), else a clear error
    (``shapes`` with the batch dimension)."""
    dims = {len(s) for s in shapes}
    if dims in ({4}, {3}):
        return "imagenet" if dims == {4} else "vit"
    index = next(i for i, s in enumerate(shapes) if len(s) not in (3, 4) or len(s) != len(shapes[0]))
    name, module, _ = cut.units[index]
    shape = shapes[index]
    if cut.sequential and len(shape) == 2 and index > 0:
        advice = f"pass head='{name}' so that this child and the ones after it form the head"
    else:
        advice = "cut the model where its units give feature maps or tokens: " + PARTS
    shown = "(B, " + ", ".join(map(str, shape[1:])) + ")"
    mixed = " after units that gave other shapes" if len(shape) in (3, 4) else ""
    raise ManppError(f"cannot wrap {cut.label}: unit '{name}' ({type(module).__name__}) outputs a {shown} tensor"
                     f"{mixed}, but manpp's auxiliary networks read (B, C, H, W) feature maps or (B, tokens, width) "
                     f"token sequences with the class token first, the same kind from every unit; {advice}")


def stages_from_shapes(shapes: list[tuple[int, ...]]) -> list[int]:
    """Stage 0 for the first unit (the stem), stage 1 for the next, then a new stage wherever the
    (C, H, W) feature map shrinks; tokens stay in stage 1 (``shapes`` without the batch dimension)."""
    stages = [0]
    for i, (prev, cur) in enumerate(zip(shapes, shapes[1:])):
        shrinks = len(cur) == len(prev) == 3 and cur[-1] < prev[-1]
        stages.append(1 if i == 0 else stages[-1] + int(shrinks))
    return stages


def first_conv_channels(modules: Iterable[nn.Module]) -> int | None:
    for root in modules:
        for m in root.modules():
            if isinstance(m, nn.Conv2d):
                return m.in_channels
    return None


def default_image_size(model) -> int:
    """The side the model is built for: a ViT's ``image_size`` / ``patch_embed.img_size``, a timm model's
    ``pretrained_cfg['input_size']``, else 224."""
    size = getattr(model, "image_size", None)
    patch_embed = getattr(model, "patch_embed", None)
    if size is None and patch_embed is not None:
        size = getattr(patch_embed, "img_size", None)
    cfg = getattr(model, "pretrained_cfg", None)
    if size is None and isinstance(cfg, dict) and cfg.get("input_size"):
        size = cfg["input_size"][-1]
    if isinstance(size, (tuple, list)):
        size = size[-1]
    return int(size) if isinstance(size, int) and size > 0 else 224


def probe(cut: Cut, backbone: WrappedBackbone, x: torch.Tensor) -> tuple[str, list[tuple[int, ...]], torch.Tensor]:
    """The feature family, every unit's output shape (without the batch) and the head's output on ``x``,
    in eval mode; checks that the head gives logits and (``cut.check``) that the cut network computes
    what the model does."""
    with evaluating(backbone, cut.reference):
        h, shapes = x, []
        for (name, _, _), unit in zip(cut.units, backbone.units):
            try:
                h = unit(h)
            except Exception as exc:
                raise ManppError(f"cannot wrap {cut.label}: unit '{name}' fails on its input of shape "
                                 f"{tuple(h.shape)} ({first_line(exc)}); check that the units are in forward "
                                 f"order, and pass the image_size= and in_channels= the model takes") from exc
            if not isinstance(h, torch.Tensor):
                raise ManppError(f"cannot wrap {cut.label}: unit '{name}' returns {type(h).__name__}, not a tensor; "
                                 f"manpp passes one tensor from unit to unit")
            shapes.append(tuple(h.shape))
        family = feature_family(cut, shapes)
        try:
            out = backbone.head(h)
        except Exception as exc:
            raise ManppError(f"cannot wrap {cut.label}: the head fails on the last unit's output of shape "
                             f"{tuple(h.shape)} ({first_line(exc)})") from exc
        if not isinstance(out, torch.Tensor) or out.dim() != 2:
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ManppError(f"cannot wrap {cut.label}: the head gives {got}, not (batch, classes) logits; manpp.wrap "
                             f"trains classifiers")
        if cut.check is not None and cut.reference is not None:
            if cut.check == "error":
                expected = run_model(cut.reference, lambda: cut.reference(x), x)
            else:
                try:
                    expected = cut.reference(x)
                except Exception:  # a model described by its parts may take other inputs: nothing to compare
                    expected = None
            if isinstance(expected, torch.Tensor) and expected.shape == out.shape:
                tol = 1e-4 * (1.0 + float(expected.abs().max()))
                gap = float((out - expected).abs().max())
                if not gap <= tol:
                    message = (f"the wrapped {cut.label} computes something else than the model itself (largest "
                               f"difference {gap:.3g})")
                    if cut.check == "error":
                        raise ManppError(f"cannot cut {cut.label} faithfully: {message}, so its forward does more "
                                         f"than manpp recognises; {HOW_TO}")
                    warnings.warn(f"{message}: check that units= lists every step of its forward in order and that "
                                  f"head= does the rest", stacklevel=4)
    return family, [s[1:] for s in shapes], out


def as_backbone(model: nn.Module | Sequence[nn.Module], *, units: Sequence | None = None, head=None,
                in_channels: int | None = None, image_size: int | None = None,
                num_classes: int | None = None) -> WrappedBackbone:
    """``model`` as a manpp backbone of its own modules (see the module docstring for what is accepted).

    ``in_channels`` defaults to the first convolution's input channels (else 3), ``image_size`` to the
    model's own (a ViT's) or 224; they shape the one probe batch the cut is checked on. ``num_classes``
    defaults to the width of the head's output (and must match it when given).
    """
    if isinstance(model, (list, tuple, nn.ModuleList)):
        if units is not None:
            raise ManppError("units= names modules of a model; a list of units is already the units: pass head= only")
        cut_first = cut_list(model, head)
        roots = [m for _, m, _ in cut_first.units]
    elif isinstance(model, nn.Module):
        cut_first, roots = None, [model]
    else:
        raise ManppError(f"manpp.wrap takes an nn.Module or a list of unit modules, got {type(model).__name__}")
    in_channels = int(in_channels or first_conv_channels(roots) or 3)
    image_size = int(image_size or default_image_size(model))
    p = next((t for r in roots for t in r.parameters()), None)
    x = torch.randn(2, in_channels, image_size, image_size, generator=torch.Generator().manual_seed(0))
    if p is not None:
        x = x.to(device=p.device, dtype=p.dtype if p.dtype.is_floating_point else x.dtype)

    if cut_first is not None:
        cut = cut_first
    elif units is not None:
        cut = cut_named(model, units, head)
    elif isinstance(model, nn.Sequential):
        cut = cut_sequential(model, head)
    elif head is not None:
        raise ManppError(f"head= without units= is for an nn.Sequential or a list of units; for {kind_of(model)} "
                         f"pass units= too, or neither to let manpp cut it")
    else:
        try:
            cut = cut_recognised(model, x)
        except ManppError:
            raise
        except (AttributeError, KeyError, TypeError, IndexError, ValueError) as exc:
            raise ManppError(f"cannot cut {kind_of(model)} into units: its structure is not the one manpp expected "
                             f"({type(exc).__name__}: {exc}); {HOW_TO}") from exc

    backbone = WrappedBackbone([m for _, m, _ in cut.units], [n for n, _, _ in cut.units],
                               [s or 0 for _, _, s in cut.units], cut.head, arch=cut.arch, aux_family="imagenet",
                               num_classes=num_classes or 0, in_channels=in_channels, image_size=image_size)
    if cut.reference is not None:
        backbone.export_keys = export_keys(backbone, cut.reference, cut.label)
    backbone.aux_family, shapes, out = probe(cut, backbone, x)
    if any(s is None for _, _, s in cut.units):
        backbone.unit_stages = stages_from_shapes(shapes)
    if num_classes is not None and int(num_classes) != out.shape[1]:
        raise ManppError(f"num_classes={num_classes} does not match the model, whose head gives {out.shape[1]} "
                         f"logits")
    backbone.num_classes = int(out.shape[1])
    return backbone
