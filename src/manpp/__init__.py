"""manpp: supervised local learning for vision networks, built around MAN++.

Quick start::

    import manpp
    net = manpp.build_backbone("resnet32", num_classes=10)
    model = manpp.local_model(net, method="manpp", k=16, objective="infopro")
    opt = torch.optim.SGD(model.parameters_to_optimize(), lr=0.1, momentum=0.9, nesterov=True)
    for x, y in loader:
        opt.zero_grad(set_to_none=True)
        model.train_step(x, y)        # K local forward/backward passes
        opt.step()
    print(manpp.evaluate(model, test_loader))
"""

from __future__ import annotations

from .engine import LocalModel, StepResult, evaluate, local_step
from .errors import ManppError
from .methods import METHODS, LocalSettings, build_local_model
from .models import build_backbone
from .objectives import ObjectiveConfig
from .partition import Partition, make_partition

__version__ = "0.1.0"

__all__ = [
    "LocalModel", "LocalSettings", "ManppError", "METHODS", "ObjectiveConfig", "Partition", "StepResult",
    "build_backbone", "build_local_model", "evaluate", "local_model", "local_step", "make_partition", "wrap",
]


def local_model(backbone, method: str = "manpp", k: int | None = None, *, split="even", objective: str = "infopro",
                ema_momentum: float = 0.995, copy_init: str = "copy", recompute_ema: bool | str = "auto",
                image_size: int | None = None, image_channels: int | None = None, num_classes: int | None = None,
                denormalize=None, **head_options) -> LocalModel:
    """Cut ``backbone`` into ``k`` modules and attach the local objectives of ``method``.

    ``head_options`` are :class:`ObjectiveConfig` fields (``aux_config``, ``ixx_1``, ...).
    ``image_size`` is the input side (default: the backbone's own, else 32).
    """
    settings = LocalSettings(method=method, k=k, split=split, objective=objective, ema_momentum=ema_momentum,
                             copy_init=copy_init, recompute_ema=recompute_ema, heads=ObjectiveConfig(**head_options))
    return build_local_model(
        backbone, settings,
        num_classes=num_classes or backbone.num_classes,
        image_channels=image_channels or backbone.in_channels,
        image_size=image_size or getattr(backbone, "image_size", 32), denormalize=denormalize,
    )


def wrap(model, k: int | None = 4, method: str = "manpp", objective: str = "dgl", split="even", **options):
    """Cut a torchvision classifier (ResNet, ResNeXt, VGG, MobileNet, EfficientNet, ConvNeXt, ViT) into
    units and return a local model that trains it; see :func:`manpp.wrapping.wrap`."""
    from .wrapping import wrap as _wrap

    return _wrap(model, k, method, objective, split, **options)
