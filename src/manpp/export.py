"""``manpp export``: the trained backbone alone, as the plain model's state dict.

It is written as a ``.pt`` file and, with the ``safetensors`` extra, as ``.safetensors`` beside it
(tensors only: nothing in it can run code). Only a finished run is exported unless
``allow_unfinished``; ``best`` exports the weights of the best evaluation (``best.pt``) instead of
the last. The auxiliary networks (heads, learnable and EMA copies, scales) are dropped. For torchvision
backbones (ImageNet ResNets, ResNeXts, ViTs) the keys are torchvision's, so the file loads with
``strict=True`` into ``torchvision.models.<arch>(num_classes=N)`` for inference or fine-tuning;
for CIFAR ResNets it loads into ``manpp.build_backbone(name, ...)``.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from . import config as C
from .build import data_info
from .errors import ManppError, choices
from .extras import available, require
from .models import build_backbone
from .rundir import BEST, is_finished, load_checkpoint, state_dict_mismatch


FORMATS = ("pt", "safetensors")


def export_backbone(checkpoint: str | Path, out: str | Path, *, best: bool = False, allow_unfinished: bool = False,
                    formats: tuple[str, ...] | None = None) -> dict:
    """Write the backbone of a run's checkpoint to ``out``; returns what was written.

    ``out``: a file name (``NAME.pt``; the safetensors file is ``NAME.safetensors``) or a folder
    (``backbone.pt`` and ``backbone.safetensors`` in it). ``formats``: some of :data:`FORMATS`;
    None writes ``.pt``, and ``.safetensors`` when the safetensors package is installed.
    """
    ckpt = load_checkpoint(checkpoint)
    if not is_finished(ckpt):
        done = f"{ckpt.get('epoch', 0)} of {ckpt['config'].get('epochs')} epochs"
        if not allow_unfinished:
            raise ManppError(f"run '{checkpoint}' is not finished ({done}, status {ckpt.get('status', 'unknown')}): resume it with "
                             f"manpp train --resume, or export it anyway with --allow-unfinished")
        warnings.warn(f"exporting an unfinished run ({done})", stacklevel=2)
    if best:
        folder = Path(checkpoint) if Path(checkpoint).is_dir() else Path(checkpoint).parent
        if not (folder / BEST).is_file():
            raise ManppError(f"run '{checkpoint}' has no {BEST} (runs of manpp before 0.2, and parallel-modules "
                             f"runs, keep only the last checkpoint): export without --best")
        ckpt = dict(ckpt, model=load_checkpoint(folder / BEST)["model"])
    paths = _paths(str(out), _formats(formats))
    cfg = C.from_dict(ckpt["config"], source=f"checkpoint '{checkpoint}'")
    state = {k[len("backbone."):]: v for k, v in ckpt["model"].items() if k.startswith("backbone.")}
    if not state:
        raise ManppError(f"checkpoint '{checkpoint}' holds no backbone weights")
    head = [v for k, v in state.items() if k.startswith("head.") and k.endswith("weight")]
    stem = next(v for k, v in state.items() if v.dim() == 4)  # the first convolution's weight
    info = data_info(cfg)
    num_classes = head[-1].shape[0]
    cls = state.get("head.head.classification_head.cls_logits.weight")  # RetinaNet: 9 anchors x classes
    if cls is not None:
        num_classes = cls.shape[0] // 9
    backbone = build_backbone(cfg.model, num_classes=num_classes, in_channels=stem.shape[1],
                              image_size=info.image_size, anchor_base=cfg.anchor_base)
    try:
        backbone.load_state_dict(state)
    except RuntimeError as exc:
        raise ManppError(f"the checkpoint's backbone does not fit model '{cfg.model}': {state_dict_mismatch(exc)}") from None
    plain = backbone.export_state_dict() if hasattr(backbone, "export_state_dict") else backbone.state_dict()
    written = [_write(plain, path, fmt) for fmt, path in paths.items()]
    loader = (f"torchvision.models.{backbone.arch}" if hasattr(backbone, "export_state_dict")
              else f"manpp.build_backbone('{cfg.model}', ...)")
    if cfg.model.startswith("vit_"):
        loader = "torchvision.models.vision_transformer.VisionTransformer"
    elif cfg.model.startswith("retinanet_"):
        loader = "torchvision.models.detection.RetinaNet (ResNet-FPN body, P6 from C5; see the README)"
    elif cfg.model.startswith("deeplabv3_"):
        loader = f"torchvision.models.segmentation.{cfg.model}(aux_loss=False)"
    return {"path": written[0], "paths": written, "best": best, "model": cfg.model, "num_classes": int(num_classes),
            "tensors": len(plain), "params": sum(v.numel() for k, v in plain.items() if "running_" not in k and "num_batches" not in k),
            "loads_into": loader}


def _formats(formats: tuple[str, ...] | None) -> tuple[str, ...]:
    if formats is None:
        if not available("safetensors"):
            warnings.warn("safetensors is not installed, so only the .pt file is written: pip install "
                          "'manpp[safetensors]'", stacklevel=3)
            return ("pt",)
        return FORMATS
    bad = [f for f in formats if f not in FORMATS]
    if bad or not formats:
        raise ManppError(f"unknown export format {bad[0] if bad else ''!r}: accepted are {choices(FORMATS)}")
    return tuple(dict.fromkeys(formats))


def _paths(text: str, formats: tuple[str, ...]) -> dict[str, Path]:
    """Each format's file: inside ``text`` when it is a folder (or ends with a slash), else beside it
    with the format's suffix."""
    out = Path(text)
    if out.is_dir() or text.endswith(("/", "\\")):
        base = out / "backbone"
    elif out.suffix in (".pt", ".pth", ".safetensors"):
        base = out.with_suffix("")
    else:
        base = out
    paths = {fmt: (out if fmt == "pt" and out.suffix in (".pt", ".pth") else base.with_name(base.name + "." + fmt))
             for fmt in formats}
    for path in paths.values():
        if path.is_dir():
            raise ManppError(f"cannot write '{path}': it is a folder")
    try:
        base.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ManppError(f"cannot create the folder '{base.parent}': {exc.strerror or exc}") from None
    return paths


def _write(state: dict, path: Path, fmt: str) -> str:
    try:
        if fmt == "safetensors":
            save_file = require("safetensors.torch", "export as .safetensors").save_file
            save_file({k: v.detach().contiguous().clone() for k, v in state.items()}, str(path))
        else:
            torch.save(state, path)
    except OSError as exc:
        raise ManppError(f"cannot write '{path}': {exc.strerror or exc}") from None
    return str(path)
