"""``manpp export``: the trained backbone alone, as the plain model's state dict.

The auxiliary networks (heads, learnable and EMA copies, scales) are dropped. For torchvision
backbones (ImageNet ResNets, ResNeXts, ViTs) the keys are torchvision's, so the file loads with
``strict=True`` into ``torchvision.models.<arch>(num_classes=N)`` for inference or fine-tuning;
for CIFAR ResNets it loads into ``manpp.build_backbone(name, ...)``.
"""

from __future__ import annotations

from pathlib import Path

import torch

from . import config as C
from .build import data_info
from .errors import ManppError
from .models import build_backbone
from .rundir import load_checkpoint


def export_backbone(checkpoint: str | Path, out: str | Path) -> dict:
    """Write the backbone of a run's checkpoint to ``out``; returns what was written."""
    ckpt = load_checkpoint(checkpoint)
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
    backbone.load_state_dict(state)
    plain = backbone.export_state_dict() if hasattr(backbone, "export_state_dict") else backbone.state_dict()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(plain, out)
    loader = (f"torchvision.models.{backbone.arch}" if hasattr(backbone, "export_state_dict")
              else f"manpp.build_backbone('{cfg.model}', ...)")
    if cfg.model.startswith("vit_"):
        loader = "torchvision.models.vision_transformer.VisionTransformer"
    elif cfg.model.startswith("retinanet_"):
        loader = "torchvision.models.detection.RetinaNet (ResNet-FPN body, P6 from C5; see the README)"
    elif cfg.model.startswith("deeplabv3_"):
        loader = f"torchvision.models.segmentation.{cfg.model}(aux_loss=False)"
    return {"path": str(out), "model": cfg.model, "num_classes": int(num_classes),
            "tensors": len(plain), "params": sum(v.numel() for k, v in plain.items() if "running_" not in k and "num_batches" not in k),
            "loads_into": loader}
