"""Optional dependencies: each feature that needs one imports it here, or fails naming the extra.

``pip install 'manpp[NAME]'`` installs an extra; ``manpp[all]`` installs every one.
"""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType

from .errors import ManppError

# import name -> (the pip package, the manpp extra that installs it)
PACKAGES = {
    "sklearn": ("scikit-learn", "digits"),
    "matplotlib": ("matplotlib", "plot"),
    "pycocotools": ("pycocotools", "coco"),
    "scipy": ("scipy", "svhn"),
    "safetensors": ("safetensors", "safetensors"),
    "tensorboard": ("tensorboard", "tensorboard"),
    "timm": ("timm", "timm"),
    "lightning": ("lightning", "lightning"),
}


def require(module: str, purpose: str) -> ModuleType:
    """Import ``module`` (a dotted name under one of :data:`PACKAGES`), or raise a
    :class:`~manpp.base.errors.ManppError` that says which extra to install for ``purpose``."""
    top = module.split(".")[0]
    package, extra = PACKAGES[top]
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ManppError(f"{purpose} needs {package}, which is not installed: pip install 'manpp[{extra}]' "
                         f"(or pip install {package})") from None


def available(module: str) -> bool:
    """Whether ``module`` can be imported (without importing more than its spec)."""
    return importlib.util.find_spec(module.split(".")[0]) is not None


__all__ = ["PACKAGES", "available", "require"]
