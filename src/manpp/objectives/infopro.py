"""InfoPro's local loss (Wang et al., ICLR 2021): reconstruct the image and classify.

loss_j = lambda1 * BCE(decoder(h), image01) + lambda2 * L_cls(classifier(h), y), with the
weights interpolated linearly over the modules (docs/method.md, InfoPro, docs/release.md: auxiliary heads).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from ..base.errors import ManppError, choices
from ..base.registry import register_objective
from ..base.settings import OneOf, setting
from ..memory.recompute import run_checkpointed
from ..models.cifar_resnet import init_weights
from .layers import conv_bn_relu
from .spec import FEATURE_DIM

CLASSIFIER_CONFIGS = ("1c2f", "2c2f")
CLASSIFIER_LOSSES = ("cross_entropy", "contrast")
LAMBDA_SCHEDULES = ("shared", "auto", "module", "stage", "constant")
GRAY_DECODES = ("rgb", "gray")
SUPCON_TEMPERATURE = 0.07


@dataclass
class InfoProSettings:
    """The paper's CIFAR settings (docs/method.md, InfoPro), except ``ixy_2`` (see below)."""

    aux_config: str = setting("2c2f", rule=OneOf(CLASSIFIER_CONFIGS), help="the classifier: '1c2f' (one conv, two "
                              "linear layers) or '2c2f' (two convs)")
    aux_loss: str = setting("cross_entropy", rule=OneOf(CLASSIFIER_LOSSES), help="the classifier's loss: "
                            "cross-entropy, or 'contrast' (supervised contrastive, temperature 0.07)")
    feature_dim: int = setting(FEATURE_DIM, help="F, the classifier's hidden width")
    widen: int = setting(1, help="width multiplier of the decoder and the classifier")
    ixx_1: float = setting(5.0, help="the reconstruction weight at the first module")
    ixy_1: float = setting(0.5, help="the classification weight at the first module")
    ixx_2: float = setting(0.0, help="the reconstruction weight at module K-2 (linear in between)")
    # classification weight at module K-2: the paper's 0 leaves module K-2 (InfoPro) or, at small K,
    # modules 1 and 2 (MAN/MAN++) without any loss; 0.5 keeps the classification weight constant
    ixy_2: float = setting(0.5, help="the classification weight at module K-2 (the paper's 0 leaves a module "
                           "without a loss at small K; 0.5 keeps it constant)")
    # 'shared' (the default): one schedule under every method that trains these heads, so InfoPro and MAN/MAN++
    # on InfoPro's heads compare at the same loss weights; by module it is InfoPro's own, and it was the better
    # of the two for both (docs/results.md: the loss weights' schedule). 'auto' is the release's choice per method
    lambda_schedule: str = setting("shared", rule=OneOf(LAMBDA_SCHEDULES), help="how the weights go from the first "
                                   "module's to module K-2's: 'shared' (the default: by module under every method, "
                                   "constant on ImageNet), by 'module' (InfoPro), by 'stage' of the copied unit (the "
                                   "MAN/MAN++ release), 'constant', or 'auto' (the release's per method: stage under "
                                   "MAN/MAN++, module else; constant on ImageNet)")
    first_config: str | None = setting(None, help="module 0's classifier (the release: '1c2f'); none: aux_config")
    first_loss: str | None = setting(None, help="module 0's classifier loss (the release: 'contrast'); none: aux_loss")
    # what a grayscale image's decoder reconstructs: 'rgb' the image replicated to 3 channels (the
    # same training signal as storing it as 3 channels), 'gray' its one channel
    decode_gray: str = setting("rgb", rule=OneOf(GRAY_DECODES), help="a grayscale image's reconstruction: 'rgb' (the "
                               "image replicated to three channels) or 'gray' (one)")


class Decoder(nn.Module):
    """Bilinear resize to the image size, 3x3 conv C->12 -> BN -> ReLU -> 3x3 conv -> image channels.

    The size is the target image's, whatever the input size (``image_size`` is the one it is built for)."""

    def __init__(self, channels: int, image_size: int, image_channels: int = 3, widen: int = 1):
        super().__init__()
        hidden = 12 * widen
        self.image_size = image_size
        self.net = nn.Sequential(
            nn.Conv2d(channels, hidden, 3, 1, 1), nn.BatchNorm2d(hidden), nn.ReLU(inplace=True),
            nn.Conv2d(hidden, image_channels, 3, 1, 1),
        )
        init_weights(self)
        self.factored = True  # False: the straightforward resize-then-conv (for comparison)

    def forward(self, x: torch.Tensor, image01: torch.Tensor) -> torch.Tensor:
        x = self.net[1:](resized_conv(x, self.net[0], tuple(image01.shape[-2:]), self.factored))
        return reconstruction_loss(x, image01)


def reconstruction_loss(logits: torch.Tensor, image01: torch.Tensor) -> torch.Tensor:
    """Sigmoid + BCE (mean), computed stably as BCE-with-logits (same value, no log(0)).

    A one-channel image against a 3-channel decoder (``decode_gray='rgb'``) is replicated.
    """
    if image01.shape[1] != logits.shape[1]:
        image01 = image01.expand(-1, logits.shape[1], -1, -1)
    return F.binary_cross_entropy_with_logits(logits.float(), image01.float())


def decoded_channels(image_channels: int, decode_gray: str) -> int:
    """The channels the decoder reconstructs: 3 for a grayscale image with ``decode_gray='rgb'``."""
    if decode_gray not in GRAY_DECODES:
        raise ManppError(f"unknown decode_gray '{decode_gray}': accepted are {choices(GRAY_DECODES)}")
    return 3 if image_channels == 1 and decode_gray == "rgb" else image_channels


FACTORED_MIN_SAVING_NHWC = 2.0  # on channels-last maps the factored path must do under half the plain MACs


@functools.lru_cache(maxsize=64)
def _shifted_resize_matrices(n_in: int, n_out: int, kernel: int, device: torch.device,
                             dtype: torch.dtype) -> torch.Tensor:
    """[kernel, n_out, n_in]: row Y of matrix t gives resized position Y + t - kernel // 2 (zero outside).

    The resize weights are PyTorch's own: F.interpolate applied to an identity matrix, along
    one axis only (the other keeps its size, which bilinear resizing leaves exact).
    """
    eye = torch.eye(n_in, device=device, dtype=torch.float32)[None, None]
    a = F.interpolate(eye, size=(n_out, n_in), mode="bilinear", align_corners=True)[0, 0]
    pad = kernel // 2
    a = F.pad(a, (0, 0, pad, pad))
    return torch.stack([a[t:t + n_out] for t in range(kernel)]).to(dtype)


def resized_conv(x: torch.Tensor, conv: nn.Conv2d, size: tuple[int, int], factor: bool = True) -> torch.Tensor:
    """``conv(F.interpolate(x, size, mode='bilinear', align_corners=True))``, with less work.

    Both the resize and the conv are linear and the resize acts on each channel alone, so the
    conv's channel mixing can go first, at x's resolution: one 1x1 conv gives, for each kernel
    tap, the mixed channels (C -> O * k * k); each tap's map is then resized *and shifted* by
    one matrix per axis, and the taps are summed (two small matrix products). For the InfoPro
    decoder of a 64-channel 8x8 CIFAR feature this is about 7x less arithmetic than the 32x32
    conv, and the large resized input is never stored. The matrices are dense, and its taps move
    through memory in more layouts than the plain path's, so it is used only where it saves enough
    multiply-adds: more than half on channels-last maps (where the plain path's NHWC resize and conv
    are fastest: on this CPU a 32-channel 16x16 map to 32x32 took 73 ms plain against 102 ms factored,
    forward and backward at batch 128), any on NCHW maps (196 against 93 ms there); ``factor=False``
    asks for the plain computation. Same values up to float rounding (tested).
    """
    n, c, h, w = x.shape
    if (h, w) == tuple(size):  # resizing to the same size is the identity
        return conv(x)
    o, k = conv.out_channels, conv.kernel_size[0]
    plain_macs = c * o * k * k * size[0] * size[1]
    factored_macs = c * o * k * k * h * w + o * k * h * size[1] * k * w + o * size[0] * size[1] * k * h
    usable = conv.stride == (1, 1) and conv.dilation == (1, 1) and conv.groups == 1 and k % 2 == 1 \
        and conv.kernel_size == (k, k) and conv.padding == (k // 2, k // 2) and conv.padding_mode == "zeros"
    nhwc = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    saving = FACTORED_MIN_SAVING_NHWC if nhwc else 1.0
    if not (factor and usable and factored_macs * saving < plain_macs):
        # PyTorch's CPU bilinear kernel is several times faster on NHWC tensors (same values);
        # the result goes back to the caller's layout
        fmt = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
        return conv(F.interpolate(x.contiguous(memory_format=torch.channels_last), size=size, mode="bilinear",
                                  align_corners=True).contiguous(memory_format=fmt))
    dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
    rows = _shifted_resize_matrices(h, size[0], k, x.device, dtype)
    cols = _shifted_resize_matrices(w, size[1], k, x.device, dtype)
    taps = F.conv2d(x, conv.weight.permute(0, 2, 3, 1).reshape(o * k * k, c, 1, 1)).reshape(n, o, k, k, h, w)
    out = torch.einsum("noijyx,jXx->noiyX", taps, cols)
    out = torch.einsum("noiyX,iYy->noYX", out, rows)
    if conv.bias is not None:
        out = out + conv.bias.to(out.dtype).view(1, o, 1, 1)
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        out = out.contiguous(memory_format=torch.channels_last)
    return out


class ImageNetDecoder(nn.Module):
    """The release's ImageNet decoder, for any width, feature size and image size.

    1x1 conv to 128 (192 above 512 channels), then steps of x2 bilinear upsampling (the last one
    to the exact image size) each followed by a conv, through widths ... 64, 32, 12 to the image
    channels. For 512 channels at 28 px and 1024 at 14 px of a 224 px image these are exactly
    the release's Decoder(512) and Decoder(1024). At another input size the steps follow the
    features' and the target image's sizes (the same number of steps).
    """

    def __init__(self, channels: int, size: int, image_size: int, image_channels: int = 3):
        super().__init__()
        steps = min(6, max(1, round(math.log2(image_size / size))))
        widths = ([256, 128, 64, 32, 12][-(steps - 1):] if steps > 1 else []) + [image_channels]
        cin = 128 if channels <= 512 else 192
        self.reduce = nn.Sequential(*conv_bn_relu(channels, cin, 1))
        self.sizes = [size * 2 ** (i + 1) for i in range(steps - 1)] + [image_size]
        convs = []
        for i, cout in enumerate(widths):
            kernel = 1 if cin >= 192 else 3
            last = i == len(widths) - 1
            convs.append(nn.Conv2d(cin, cout, kernel, 1, kernel // 2) if last else nn.Sequential(*conv_bn_relu(cin, cout, kernel)))
            cin = cout
        self.convs = nn.ModuleList(convs)
        self.factored = True  # False: the straightforward resize-then-conv (for comparison)

    def forward(self, x: torch.Tensor, image01: torch.Tensor) -> torch.Tensor:
        x = self.reduce(x)
        h, w = x.shape[-2:]
        sizes = [(h * 2 ** (i + 1), w * 2 ** (i + 1)) for i in range(len(self.sizes) - 1)] + [tuple(image01.shape[-2:])]
        for size, conv in zip(sizes, self.convs):
            if isinstance(conv, nn.Conv2d):
                x = resized_conv(x, conv, size, self.factored)
            else:
                x = conv[1:](resized_conv(x, conv[0], size, self.factored))
        return reconstruction_loss(x, image01)


class AuxClassifier(nn.Module):
    """'1c2f': conv -> BN -> ReLU -> GAP -> FC(F) -> ReLU -> FC; '2c2f' adds a second 3x3 conv.

    The conv widens 16 -> 32 and 32 -> 64 with stride 2 and keeps 64 (and wider) at stride 1,
    as in the release. With ``loss='contrast'`` the output is the F-dim feature for SupCon.
    """

    def __init__(self, channels: int, num_classes: int, config: str = "2c2f", loss: str = "cross_entropy",
                 feature_dim: int = FEATURE_DIM, widen: int = 1):
        super().__init__()
        if config not in CLASSIFIER_CONFIGS:
            raise ManppError(f"unknown aux_config '{config}': accepted are {choices(CLASSIFIER_CONFIGS)}")
        if loss not in CLASSIFIER_LOSSES:
            raise ManppError(f"unknown aux_loss '{loss}': accepted are {choices(CLASSIFIER_LOSSES)}")
        width, stride = (2 * channels, 2) if channels < 64 else (channels, 1)
        width *= widen
        layers = conv_bn_relu(channels, width, 3, stride)
        if config == "2c2f":
            layers += conv_bn_relu(width, width, 3)
        self.convs = nn.Sequential(*layers)
        out = feature_dim if loss == "contrast" else num_classes
        self.fc = nn.Sequential(nn.Linear(width, feature_dim * widen), nn.ReLU(inplace=True),
                                nn.Linear(feature_dim * widen, out))
        self.loss = loss
        init_weights(self.convs)

    def forward(self, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        z = self.fc(torch.flatten(F.adaptive_avg_pool2d(self.convs(x), 1), 1)).float()
        if self.loss == "contrast":
            return supcon_loss(F.normalize(z, dim=1), targets)
        return F.cross_entropy(z, targets)


class ImageNetAuxClassifier(AuxClassifier):
    """The release's ImageNet classifier head: 1x1 conv, two 3x3 stride-2 convs, 1x1 conv to 2048, GAP, FC.

    The first conv goes to 128 channels (256 above 512 input channels); any number of classes.
    """

    def __init__(self, channels: int, num_classes: int, loss: str = "cross_entropy", feature_dim: int = FEATURE_DIM):
        nn.Module.__init__(self)  # AuxClassifier's layers are not built; its forward is used
        if loss not in CLASSIFIER_LOSSES:
            raise ManppError(f"unknown aux_loss '{loss}': accepted are {choices(CLASSIFIER_LOSSES)}")
        first = 128 if channels <= 512 else 256
        self.convs = nn.Sequential(*conv_bn_relu(channels, first, 1), *conv_bn_relu(first, 256, 3, 2),
                                   *conv_bn_relu(256, 512, 3, 2), *conv_bn_relu(512, 2048, 1))
        self.fc = nn.Linear(2048, feature_dim if loss == "contrast" else num_classes)
        self.loss = loss


def supcon_loss(features: torch.Tensor, labels: torch.Tensor, temperature: float = SUPCON_TEMPERATURE) -> torch.Tensor:
    """Supervised contrastive loss (Khosla et al. 2020), one view, on L2-normalised features.

    For each anchor: minus the mean over its positives (same label, self excluded) of the log
    softmax of similarity/temperature over all other samples. Anchors with no positive add 0.
    """
    n = features.shape[0]
    logits = features @ features.T / temperature
    self_mask = torch.eye(n, dtype=torch.bool, device=features.device)
    logits = logits.masked_fill(self_mask, float("-inf"))
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    positives = (labels[:, None] == labels[None, :]) & ~self_mask
    pos_log_prob = log_prob.masked_fill(~positives, 0.0).sum(1)
    return -(pos_log_prob / positives.sum(1).clamp(min=1)).mean()


def resolved_schedule(schedule: str, family: str, momentum: bool) -> str:
    """The schedule ``module``, ``stage`` or ``constant`` that ``schedule`` stands for on a backbone of ``family``,
    under a method with (``momentum``: MAN, MAN++) or without the copies of the next unit. ImageNet's heads keep
    constant weights under 'shared' and 'auto' (the release's 5 and 0.75 in every module)."""
    if schedule in ("shared", "auto") and family == "imagenet":
        return "constant"
    if schedule == "shared":
        return "module"
    if schedule == "auto":
        return "stage" if momentum else "module"
    return schedule


def lambda_ratio(spec, schedule: str) -> float:
    """Interpolation ratio r in [0, 1] for module ``spec.index``.

    'module' (InfoPro): r = j / (K - 2). 'stage' (MAN/MAN++ release): r = stage / (K - 2), where
    stage is the stage of the unit the head reads (the copied unit for MAN), and r = 0 for the
    first module (the release's stem module); K is the preset's nominal K. 'constant': r = 0, the
    weights ixx_1 / ixy_1 everywhere (the release's ImageNet heads, 5 and 0.75).
    """
    if schedule == "constant":
        return 0.0
    if schedule == "module":
        return spec.index / (spec.num_modules - 2) if spec.num_modules > 2 else 0.0
    if spec.index == 0 or spec.nominal_k <= 2:
        return 0.0
    return min(1.0, spec.stage / (spec.nominal_k - 2))


class InfoProHead(nn.Module):
    def __init__(self, decoder: Decoder, classifier: AuxClassifier, lambda1: float, lambda2: float):
        super().__init__()
        self.decoder, self.classifier = decoder, classifier
        self.lambda1, self.lambda2 = float(lambda1), float(lambda2)
        # activation checkpointing (set by the local model): each term recomputed in backward in turn,
        # so the decoder's and the classifier's activations are never alive together
        self.checkpointing = "off"

    @classmethod
    def from_spec(cls, spec, cfg: InfoProSettings, momentum: bool = False) -> "InfoProHead":
        schedule = cfg.lambda_schedule
        if schedule not in LAMBDA_SCHEDULES:
            raise ManppError(f"unknown lambda_schedule '{schedule}': accepted are {choices(LAMBDA_SCHEDULES)}")
        schedule = resolved_schedule(schedule, spec.family, momentum)
        r = lambda_ratio(spec, schedule)
        lam1 = cfg.ixx_1 * (1 - r) + cfg.ixx_2 * r
        lam2 = cfg.ixy_1 * (1 - r) + cfg.ixy_2 * r
        first = spec.index == 0
        config = cfg.first_config if first and cfg.first_config is not None else cfg.aux_config
        loss = cfg.first_loss if first and cfg.first_loss is not None else cfg.aux_loss
        out_channels = decoded_channels(spec.in_channels, cfg.decode_gray)
        if spec.family == "imagenet":
            decoder = ImageNetDecoder(spec.channels, spec.size, spec.image_size, out_channels)
            classifier = ImageNetAuxClassifier(spec.channels, spec.num_classes, loss, cfg.feature_dim)
        else:
            decoder = Decoder(spec.channels, spec.image_size, out_channels, cfg.widen)
            classifier = AuxClassifier(spec.channels, spec.num_classes, config, loss, cfg.feature_dim, cfg.widen)
        return cls(decoder, classifier, lam1, lam2)

    def loss_weights(self) -> dict[str, float]:
        """The weights of the local loss's terms (all 0: the module gets no loss)."""
        return {"lambda1 (reconstruction)": self.lambda1, "lambda2 (classification)": self.lambda2}

    def forward(self, x: torch.Tensor, ctx) -> torch.Tensor:
        checkpointed = self.checkpointing != "off" and torch.is_grad_enabled() and x.requires_grad

        def term(part: nn.Module, target):
            if checkpointed:
                return run_checkpointed(lambda h: part(h, target), x, [part])
            return part(x, target)

        loss = x.new_zeros((), dtype=torch.float32)
        if self.lambda1:
            loss = loss + self.lambda1 * term(self.decoder, ctx.image01)
        if self.lambda2:
            loss = loss + self.lambda2 * term(self.classifier, ctx.targets)
        return loss

    def extra_repr(self) -> str:
        return f"lambda1={self.lambda1:.4g}, lambda2={self.lambda2:.4g}"


# the release: the CIFAR MAN++ stem module's classifier is always 1c2f with SupCon
# (docs/release.md: the MAN++ auxiliary network), the README's end weights are 0 / 0,
# and MAN/MAN++ interpolate them by the stage of the copied unit, InfoPro by module
RELEASE_SETTINGS = {"first_config": "1c2f", "first_loss": "contrast", "ixy_2": 0.0, "lambda_schedule": "auto"}


# its heads at twice the backbone's lr under fidelity=ours: +1.24 and +1.46 points for InfoPro and +0.98, +1.52,
# +0.41 for MAN++ on InfoPro in the accuracy protocol's paired seeds (docs/results.md, ablations)
@register_objective("infopro", settings=InfoProSettings, families=("cifar", "imagenet"),
                    default_for=("cifar", "imagenet"), release=RELEASE_SETTINGS, aux_lr_scale=2.0,
                    summary="InfoPro: reconstruction + classification per module")
def build(spec, settings: InfoProSettings, *, momentum: bool = False, **_) -> InfoProHead:
    return InfoProHead.from_spec(spec, settings, momentum=momentum)
