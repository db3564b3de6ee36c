"""What an objective is told about the module whose auxiliary network it builds."""

from __future__ import annotations

from dataclasses import dataclass

FEATURE_DIM = 128  # F, the feature width of the release's DGL and InfoPro heads


@dataclass(frozen=True)
class AuxSpec:
    """Where an auxiliary network sits: the feature it reads and the module it trains."""

    channels: int  # channels of the feature map (width of the tokens on a ViT)
    size: int  # spatial side of the feature map (0 for tokens)
    stage: int  # stage index of the unit that produced the feature (for the release's lambda schedule)
    index: int  # module j (0-based)
    num_modules: int  # true K
    nominal_k: int  # K of the paper preset (the release's "K"), else the true K
    num_classes: int
    in_channels: int  # of the input image
    image_size: int
    family: str = "cifar"  # the backbone's feature family (see manpp.base.registry.FAMILIES)
