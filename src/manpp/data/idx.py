"""A small reader for IDX files, the format of MNIST and Fashion-MNIST (gzipped or not)."""

from __future__ import annotations

import gzip
import math
from pathlib import Path

import numpy as np

from ..base.errors import ManppError

IMAGES_MAGIC = 0x00000803  # unsigned bytes, 3 dimensions (N, H, W)
LABELS_MAGIC = 0x00000801  # unsigned bytes, 1 dimension (N,)
_GZIP_MAGIC = b"\x1f\x8b"


def _read_bytes(path: Path) -> bytes:
    """The file's content, decompressed when it is gzipped (whatever its name)."""
    try:
        raw = path.read_bytes()
        if raw[:2] == _GZIP_MAGIC:
            raw = gzip.decompress(raw)
    except (OSError, EOFError) as exc:  # gzip.BadGzipFile is an OSError
        raise ManppError(f"cannot read IDX file '{path}': {exc}") from exc
    return raw


def _read_idx(path: str | Path, magic: int, ndim: int, what: str) -> np.ndarray:
    path = Path(path)
    raw = _read_bytes(path)
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ManppError(
            f"IDX file '{path}' is too short ({len(raw)} bytes); an IDX {what} file starts with a {header}-byte header"
        )
    found = int.from_bytes(raw[:4], "big")
    if found != magic:
        raise ManppError(
            f"IDX file '{path}' has magic number 0x{found:08X}; expected 0x{magic:08X} for an IDX {what} file"
        )
    dims = tuple(int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
    size = math.prod(dims)
    if len(raw) - header != size:
        raise ManppError(
            f"IDX file '{path}' holds {len(raw) - header} data bytes; its header {'x'.join(map(str, dims))} "
            f"needs exactly {size}"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def read_idx_images(path: str | Path) -> np.ndarray:
    """Images of an IDX file (magic 0x00000803) as a read-only uint8 array (N, H, W)."""
    return _read_idx(path, IMAGES_MAGIC, 3, "images")


def read_idx_labels(path: str | Path) -> np.ndarray:
    """Labels of an IDX file (magic 0x00000801) as a read-only uint8 array (N,)."""
    return _read_idx(path, LABELS_MAGIC, 1, "labels")
