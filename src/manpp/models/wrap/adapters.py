"""The modules a wrapped model is made of: the backbone itself, and adapters that call the model's own
code between units (timm's ``forward_head`` and ViT embedding, a pool-and-classify head, channel
permutations for channels-last models)."""

from __future__ import annotations

import copy
from typing import Sequence

import torch
from torch import nn

from ..chain import UnitChain

TO_NHWC, TO_NCHW = (0, 2, 3, 1), (0, 3, 1, 2)


class WrappedBackbone(UnitChain):
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

    def export_state_dict(self) -> dict[str, torch.Tensor]:
        """The trained weights under the wrapped model's own keys (``strict=True`` loads them into a
        fresh instance of it); the backbone's own state dict when no model was wrapped."""
        state = self.state_dict()
        if self.export_keys is None:
            return {k: v.detach().clone() for k, v in state.items()}
        return {key: state[ours].detach().clone() for key, ours in self.export_keys.items()}

    def load_plain_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Weights saved from the wrapped model itself (its own keys, e.g. pretrained ones), loaded in."""
        if self.export_keys is None:
            self.load_state_dict(state)
            return
        missing = sorted(set(self.export_keys) - set(state))
        unexpected = sorted(set(state) - set(self.export_keys))
        if missing or unexpected:
            raise KeyError(f"the state dict does not fit the wrapped model: missing {missing[:3]}, unexpected "
                           f"{unexpected[:3]}")
        self.load_state_dict({ours: state[key] for key, ours in self.export_keys.items()}, strict=False)

    def plain_model(self) -> nn.Module:
        """The wrapped model on its own, with these weights (a copy: training it leaves this one alone)."""
        reference = self.__dict__.get("reference_")
        if reference is None:
            raise ValueError("no model was wrapped (a list of units): there is no plain model")
        return copy.deepcopy(reference)


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
    """Global average pooling (or the model's own pool), flatten, the model's classifier; a convolutional
    classifier (SqueezeNet's: a 1x1 convolution then its own pooling) runs on the map and is flattened after."""

    def __init__(self, pool: nn.Module | None, classifier: nn.Module):
        super().__init__()
        self.convolutional = any(isinstance(m, nn.Conv2d) for m in classifier.modules())
        self.pool = pool if pool is not None else (nn.Identity() if self.convolutional else nn.AdaptiveAvgPool2d(1))
        self.classifier = classifier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.convolutional:
            return torch.flatten(self.classifier(self.pool(x)), 1)
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


__all__ = ["ClassTokenHead", "ModelMethods", "Permute", "PoolHead", "PoolLinear", "TO_NCHW", "TO_NHWC", "TimmHead",
           "TimmTokenEmbed", "ViTEmbed", "WrappedBackbone", "attach_tensors", "channels_first", "root_tensors"]
