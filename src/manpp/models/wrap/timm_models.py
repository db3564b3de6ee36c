"""timm classifiers (anything with ``forward_features`` and ``forward_head``), cut along timm's own
structure: the stages named by ``feature_info`` opened into their blocks, the stem being what
``forward_features`` runs before them, the head what it runs after them plus ``forward_head``."""

from __future__ import annotations

import torch
from torch import nn

from ...base.errors import ManppError
from .adapters import TO_NCHW, Permute, TimmHead, TimmTokenEmbed, attach_tensors, channels_first, root_tensors
from .cut import HOW_TO, Cut, arch_of, around, call_order, evaluating, kind_of, run_model


def is_timm(model: nn.Module) -> bool:
    return type(model).__module__.startswith("timm.") or (
        callable(getattr(model, "forward_features", None)) and callable(getattr(model, "forward_head", None)))


FEATURES_ONLY = ("FeatureListNet", "FeatureDictNet", "FeatureHookNet", "FeatureGetterNet")  # timm's features_only


def is_features_only(model: nn.Module) -> bool:
    return type(model).__name__ in FEATURES_ONLY


def refuse_features_only(model: nn.Module, x: torch.Tensor) -> Cut:
    raise ManppError(f"cannot wrap a timm features_only model ({kind_of(model)}): it returns a list of feature maps "
                     f"and has no classifier to train; create it without features_only=True (timm.create_model(name, "
                     f"num_classes=N)), or {HOW_TO.replace('pass its parts instead: ', 'pass its parts: ')}")


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


def runs_its_children(stage: nn.Module, x: torch.Tensor | None) -> bool:
    """Whether ``stage(x)`` is its children applied one after another (RegNet's ``RegStage``), checked on
    the input the stage saw in the model's forward: then every child can be a unit."""
    children = list(stage.children())
    if len(children) < 2 or root_tensors(stage) or not isinstance(x, torch.Tensor):
        return False
    with evaluating(stage):
        try:
            expected, h = stage(x), x
            for child in children:
                h = child(h)
        except Exception:  # noqa: BLE001 - not a plain sequence: the stage stays one unit
            return False
    return isinstance(h, torch.Tensor) and isinstance(expected, torch.Tensor) and h.shape == expected.shape and \
        bool(torch.allclose(h, expected, rtol=1e-4, atol=1e-5))


def open_stage(name: str, stage: nn.Module, x: torch.Tensor | None = None) -> list[tuple[str, nn.Module]]:
    """A stage's blocks as units; a stage's downsample (before its blocks) joins the first block; a stage
    that only runs its children in order (``x``: its input in the model's forward) is opened into them."""
    if isinstance(stage, (nn.Sequential, nn.ModuleList)) or runs_its_children(stage, x):
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
    inputs: dict[str, torch.Tensor] = {}  # what each stage reads, to see whether it can be opened
    def keep_input(name: str):
        return lambda _module, args: inputs.setdefault(name, args[0] if args else None)

    hooks = [children[n].register_forward_pre_hook(keep_input(n)) for n in trunk]
    try:
        with evaluating(model):
            order = call_order(model, lambda: run_model(model, lambda: model.forward_features(x), x))
    finally:
        for h in hooks:
            h.remove()
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
        for block_name, block in open_stage(name, stage, inputs.get(name)):
            units.append((block_name, channels_first(block) if channels_last else block, s))
    used = {*before, *trunk, *after}
    head = TimmHead(model, [children[n] for n in after], {n: c for n, c in children.items() if n not in used},
                    channels_last)
    return Cut(units, head, arch_of(model), model, "error")


# (predicate, cutter) of each family this module recognises, tried in order
FAMILIES = [(is_features_only, refuse_features_only), (is_timm, cut_timm)]

__all__ = ["FAMILIES", "cut_timm", "is_features_only", "is_timm"]
