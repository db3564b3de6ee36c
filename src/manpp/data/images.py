"""Reading image files (JPEG, PNG) as tensors with torchvision, imported only when an image is read."""

from __future__ import annotations

import warnings
from pathlib import Path

from torch import Tensor

from ..base.errors import ManppError
from .common import describe_exception


def decode_image_file(path: Path | str, mode: str) -> Tensor:
    """Decode an image file as uint8 (C, H, W); ``mode`` is 'RGB' or 'GRAY'."""
    from torchvision.io import ImageReadMode, decode_image, read_file

    with warnings.catch_warnings():  # torchvision 0.29 deprecates its decoders in favour of torchcodec
        warnings.filterwarnings("ignore", message=".*TorchVision are deprecated", category=DeprecationWarning)
        # the file's bytes, then decode: torchvision before 0.20 decodes only bytes, not a path
        return decode_image(read_file(str(path)), mode=getattr(ImageReadMode, mode))


def read_rgb(path: Path | str) -> Tensor:
    """An image file as float (3, H, W) in [0, 1]."""
    try:
        image = decode_image_file(path, "RGB")
    except (OSError, RuntimeError, ValueError) as exc:
        raise ManppError(f"cannot read image '{path}': {describe_exception(exc)}; "
                         f"expected a readable JPEG or PNG file") from exc
    return image.float().div_(255.0)
