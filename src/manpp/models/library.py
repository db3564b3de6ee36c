"""Any timm or torchvision classifier by name: ``timm/<name>`` and ``torchvision/<name>``.

The model is created by its library (``timm.create_model``, ``torchvision.models.get_model``) with
the run's number of classes (and image size, for models that take one), then cut into units by
:func:`manpp.models.wrap.as_backbone`, exactly as :func:`manpp.wrap` cuts it in Python. Its export
is the library model's own state dict (``strict=True`` loads it into the same call of the
library). Library models read 3-channel images: grayscale data is replicated to RGB
(``gray_to_rgb`` defaults to true for them).

``pretrained``: a state-dict file of the library model (its classifier may have another number of
classes: those tensors are left as initialised), or ``library`` for the library's own weights,
taken from its cache on disk (``torchvision``: ``$TORCH_HOME/hub/checkpoints``; timm: the Hugging
Face cache), downloaded when the machine is online.
"""

from __future__ import annotations

import contextlib
import difflib
import socket
from pathlib import Path

import torch
from torch import nn

from ..base.errors import ManppError
from ..base.extras import require
from ..base.safeio import first_line
from .registry import register_backbone

LIBRARIES = ("timm", "torchvision")
LIBRARY_WEIGHTS = "library"  # pretrained=library: the library's own pretrained weights


def split_name(name: str) -> tuple[str, str] | None:
    """``('timm', 'convnext_atto')`` for ``timm/convnext_atto``; None for a name without a library prefix."""
    library, slash, model = str(name).partition("/")
    if not slash:
        return None
    if library not in LIBRARIES:
        raise ManppError(f"unknown model library '{library}' in '{name}': accepted are "
                         f"{', '.join(f'{lib}/<name>' for lib in LIBRARIES)} (or a built-in name)")
    if not model:
        raise ManppError(f"'{name}' names no model: give {library}/<name>, e.g. {_example(library)}")
    return library, model


def _example(library: str) -> str:
    return "timm/convnext_atto" if library == "timm" else "torchvision/mobilenet_v3_small"


def is_library_name(name: str) -> bool:
    return str(name).partition("/")[0] in LIBRARIES and "/" in str(name)


def names(library: str) -> list[str]:
    """Every classifier the library can create by name."""
    if library == "timm":
        return list(require("timm", "timm/<name> models").list_models())
    import torchvision

    return list(torchvision.models.list_models(module=torchvision.models))


def check_name(name: str) -> None:
    """An unknown library model is one line with the closest names."""
    library, model = split_name(name)
    known = names(library)
    if model not in known:
        close = difflib.get_close_matches(model, known, n=5, cutoff=0.6)
        hint = f"; did you mean {', '.join(f'{library}/{c}' for c in close)}?" if close else ""
        raise ManppError(f"unknown {library} model '{model}' ({len(known)} are known{hint})")


def create(name: str, *, num_classes: int, image_size: int, pretrained: str | None = None) -> nn.Module:
    """The plain library model, with the run's classes, at ``image_size`` where it takes one."""
    check_name(name)
    library, model = split_name(name)
    with_library_weights = pretrained == LIBRARY_WEIGHTS
    try:
        if library == "timm":
            timm = require("timm", "timm/<name> models")
            kwargs = dict(pretrained=with_library_weights, num_classes=num_classes)
            with hub_offline_unless_reachable(with_library_weights):
                try:  # ViTs and other fixed-size models take the size; the others do not know the keyword
                    net = timm.create_model(model, img_size=image_size, **kwargs)
                except TypeError:
                    net = timm.create_model(model, **kwargs)
        else:
            net = _torchvision(model, num_classes, image_size, with_library_weights)
    except ManppError:
        raise
    except (OSError, RuntimeError, ValueError) as exc:
        why = f"{type(exc).__name__}: {first_line(exc)[:160]}"
        if with_library_weights:
            raise ManppError(f"the {library} weights of '{model}' are not on disk and could not be downloaded "
                             f"({why}): run once online, or give pretrained=<a state-dict file>") from None
        raise ManppError(f"{library} cannot create '{model}' with {num_classes} classes at {image_size} px: "
                         f"{why}") from None
    if pretrained and not with_library_weights:
        load_file(net, pretrained, name)
    return net


HUB_HOST = ("huggingface.co", 443)  # where timm's weights come from


@contextlib.contextmanager
def hub_offline_unless_reachable(downloading: bool):
    """Within the block, the Hugging Face hub reads only its cache when its host cannot be reached (a quick
    connection attempt), instead of retrying for most of a minute before the same error."""
    if not downloading:
        yield
        return
    try:
        socket.create_connection(HUB_HOST, timeout=3).close()
        reachable = True
    except OSError:
        reachable = False
    constants = None
    if not reachable:
        try:
            from huggingface_hub import constants
        except ImportError:
            constants = None
    before = getattr(constants, "HF_HUB_OFFLINE", None)
    if constants is not None:
        constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        if constants is not None:
            constants.HF_HUB_OFFLINE = before


def _torchvision(model: str, num_classes: int, image_size: int, with_library_weights: bool) -> nn.Module:
    import torchvision

    builder = torchvision.models.get_model_builder(model)
    kwargs = {"image_size": image_size} if model.startswith("vit_") else {}
    if model in ("googlenet", "inception_v3"):  # their auxiliary classifiers train only with their own loss
        kwargs.update(aux_logits=False, init_weights=True)
    if not with_library_weights:
        return builder(weights=None, num_classes=num_classes, **kwargs)
    net = builder(weights="DEFAULT", **({"image_size": image_size} if kwargs and image_size == 224 else {}))
    head = _classifier(net)
    if head.out_features != num_classes:  # a new classifier for the run's classes, the rest pretrained
        replacement = nn.Linear(head.in_features, num_classes, bias=head.bias is not None)
        _replace(net, head, replacement)
    return net


def _classifier(net: nn.Module) -> nn.Linear:
    """The last ``nn.Linear`` of a model (its classifier)."""
    linears = [m for m in net.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ManppError(f"cannot find the classifier of {type(net).__name__} (no nn.Linear)")
    return linears[-1]


def _replace(root: nn.Module, old: nn.Module, new: nn.Module) -> None:
    for parent in root.modules():
        for child_name, child in parent.named_children():
            if child is old:
                setattr(parent, child_name, new)
                return


def load_file(net: nn.Module, path: str | Path, name: str) -> int:
    """A state dict of the library model (``pretrained=FILE``); tensors of another shape are allowed
    only in the classifier (another number of classes), which then keeps its own initialisation."""
    from ..base.checkpoint import load_weights

    state = load_weights(path)
    own = net.state_dict()
    unexpected = [k for k in state if k not in own]
    missing = [k for k in own if k not in state]
    if unexpected or missing:
        what = (f"unexpected key '{unexpected[0]}'" if unexpected else f"missing key '{missing[0]}'") + \
            (f" (and {len(unexpected) + len(missing) - 1} more)" if len(unexpected) + len(missing) > 1 else "")
        raise ManppError(f"pretrained weights '{path}' do not fit {name}: {what}; give a state dict of this model")
    classifier = {id(p) for p in _classifier(net).parameters()}
    own_vars = net.state_dict(keep_vars=True)
    reshaped = [k for k in state if state[k].shape != own[k].shape]
    outside = [k for k in reshaped if id(own_vars[k]) not in classifier]
    if outside:
        raise ManppError(f"pretrained weights '{path}' do not fit {name}: '{outside[0]}' is {tuple(state[outside[0]].shape)} "
                         f"there but {tuple(own[outside[0]].shape)} here")
    net.load_state_dict({k: v for k, v in state.items() if k not in reshaped}, strict=False)
    return len(state) - len(reshaped)


def loads_into(name: str, num_classes: int, image_size: int = 224) -> str:
    """How a user rebuilds the plain model that an export loads into: the call, with the image size where the
    model's weights depend on it (a ViT's position embedding)."""
    library, model = split_name(name)
    if library == "timm":
        size = f", img_size={image_size}" if _timm_takes_image_size(model, image_size) else ""
        return f"timm.create_model('{model}', num_classes={num_classes}{size})"
    extra = f", image_size={image_size}" if model.startswith("vit_") else ""
    if model in ("googlenet", "inception_v3"):
        extra += ", aux_logits=False, init_weights=True"
    return f"torchvision.models.get_model('{model}', num_classes={num_classes}{extra})"


def _timm_takes_image_size(model: str, image_size: int) -> bool:
    """Whether timm's ``model`` is built for an image size (``img_size=``), tried on the meta device (no weights
    are made)."""
    timm = require("timm", "timm/<name> models")
    try:
        with torch.device("meta"):
            timm.create_model(model, pretrained=False, img_size=image_size)
        return True
    except TypeError:
        return False


@register_backbone("<library>/<name>", family=None, matches=lambda name: "/" in str(name), export=loads_into,
                   summary="any classifier of timm or torchvision: timm/<name>, torchvision/<name>")
def build_library_backbone(name: str, *, num_classes: int, in_channels: int, image_size: int,
                           pretrained: str | None = None, **_):
    """``timm/<name>`` or ``torchvision/<name>`` as a manpp backbone (see the module docstring)."""
    from .wrap import as_backbone

    check_name(name)
    if in_channels != 3:
        raise ManppError(f"{name} reads 3-channel images, but the data has {in_channels}: leave gray_to_rgb at its "
                         f"default (true for library models) or set gray_to_rgb=true")
    net = create(name, num_classes=num_classes, image_size=image_size, pretrained=pretrained)
    backbone = as_backbone(net, in_channels=in_channels, image_size=image_size, num_classes=num_classes)
    backbone.arch = name
    return backbone


__all__ = ["LIBRARIES", "LIBRARY_WEIGHTS", "build_library_backbone", "check_name", "create", "is_library_name",
           "load_file", "loads_into", "split_name"]
