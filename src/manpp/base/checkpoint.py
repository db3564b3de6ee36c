"""Checkpoint files and random-generator state: what a run saves to continue exactly, and how it is read.

A run's ``checkpoint.pt`` (``kind: checkpoint``) holds everything needed to continue: the model
(backbone, auxiliary networks, EMA copies), the optimizer(s), the loss scale, the position (epoch,
step, batch in the epoch), the running sums of an epoch cut short, every process's random
generators and the history. ``best.pt`` (``kind: best``) holds only the weights of the best
evaluation. Both carry the identity of the run that wrote them (``run``: a random id drawn at the
run's start, its seed and the hash of its starting config) and a checksum of everything in them
(``checksum``: SHA-256 over every tensor's bytes and every value, in order), checked on every read, so a
file damaged on disk or in a copy is refused instead of resumed. Both are written atomically
(:mod:`manpp.base.safeio`) and read with ``weights_only=True``, so a checkpoint from someone else cannot run
code here. Reading names what is wrong with a bad file: missing, empty, corrupt, damaged (checksum),
unsafe, or not a manpp checkpoint.
"""

from __future__ import annotations

import errno
import hashlib
import pickle
import random
import uuid
from pathlib import Path

import numpy as np
import torch

from . import distributed as D
from .errors import ManppError
from .safeio import first_line, io_error, save_torch

CHECKPOINT = "checkpoint.pt"
BEST = "best.pt"
CHECKPOINT_VERSION = 4  # 2: RNG states as tensors (weights_only loads); 3: kind, partial epoch sums, stage
# optimizers; 4: run identity and checksum
KINDS = ("checkpoint", "best")
_ZIP, _PICKLE = b"PK\x03\x04", b"\x80"


def rng_state(device: torch.device | None = None) -> dict:
    """This process's random generators (Python, NumPy, torch, and its CUDA device), as tensors and numbers."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    numpy_state = (name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached))
    state = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}
    if D.is_initialized() and device is not None and device.type == "cuda":
        state["cuda_device"] = torch.cuda.get_rng_state(device)  # one GPU per process: only its own generator
    elif torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict, device: torch.device | None = None) -> None:
    random.setstate(state["python"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    keys = keys.numpy() if isinstance(keys, torch.Tensor) else np.asarray(keys)
    np.random.set_state((name, keys.astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda_device" in state and device is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda_device"], device)
    elif "cuda" in state and torch.cuda.is_available() and not D.is_initialized():
        torch.cuda.set_rng_state_all(state["cuda"])


def run_identity(seed: int, config_text: str) -> dict:
    """The identity a run keeps for its whole life: a random id (from the OS, so drawing it moves no
    generator of the run), its seed and the SHA-256 of the config it started with."""
    return {"id": uuid.uuid4().hex, "seed": int(seed),
            "config_sha256": hashlib.sha256(config_text.encode()).hexdigest()}


def checksum(payload: dict) -> str:
    """SHA-256 over ``payload`` without its ``checksum`` entry: every tensor's dtype, shape and bytes and
    every other value's ``repr``, in the payload's order (which saving and loading keep)."""
    digest = hashlib.sha256()
    _feed(digest, {k: v for k, v in payload.items() if k != "checksum"})
    return "sha256:" + digest.hexdigest()


def _feed(digest, value) -> None:
    if isinstance(value, torch.Tensor):
        tensor = value.detach().cpu().contiguous()
        digest.update(f"T{tensor.dtype}{tuple(tensor.shape)}".encode())
        if tensor.numel():
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    elif isinstance(value, dict):
        digest.update(f"{{{len(value)}".encode())
        for key, item in value.items():
            digest.update(repr(key).encode())
            _feed(digest, item)
    elif isinstance(value, (list, tuple)):
        digest.update(f"{type(value).__name__[0]}{len(value)}".encode())
        for item in value:
            _feed(digest, item)
    else:
        digest.update(repr(value).encode())


def save(payload: dict, path: str | Path, kind: str = "checkpoint") -> Path:
    """Write a checkpoint (``kind`` one of :data:`KINDS`) atomically, with its checksum."""
    if kind not in KINDS:
        raise ValueError(f"unknown checkpoint kind {kind!r}: one of {KINDS}")
    payload = {**payload, "kind": kind, "version": CHECKPOINT_VERSION}
    return save_torch({**payload, "checksum": checksum(payload)}, path)


def _verified(ckpt, path: Path):
    """``ckpt`` when its checksum matches (or it has none: written before version 4), else one line."""
    if isinstance(ckpt, dict) and isinstance(ckpt.get("checksum"), str) and checksum(ckpt) != ckpt["checksum"]:
        raise ManppError(f"cannot read checkpoint '{path}': it is damaged (its contents do not match the checksum "
                         f"written with them: bytes changed on disk or in a copy); use another copy of it, or "
                         f"start the run again")
    return ckpt


def _read(path: Path):
    """``torch.load`` of a file that exists, with every way it can fail named."""
    try:
        with path.open("rb") as f:
            magic = f.read(4)
    except OSError as exc:
        raise io_error(exc, path, "read") from None
    if not magic:
        raise ManppError(f"cannot read checkpoint '{path}': it is empty (0 bytes), so it is corrupt: its write was cut "
                         f"short, or it is not a checkpoint")
    if not magic.startswith((_ZIP, _PICKLE)):
        raise ManppError(f"cannot read checkpoint '{path}': it is not a PyTorch file, so it is corrupt or another kind "
                         f"of file")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)  # tensors and plain values only
    except pickle.UnpicklingError as exc:
        if "Unsupported global" not in str(exc):
            raise ManppError(f"cannot read checkpoint '{path}': it is corrupt ({_inner(exc)})") from None
        raise ManppError(f"cannot read checkpoint '{path}' safely: it holds objects other than tensors and plain values "
                         f"({_inner(exc)}), and manpp reads checkpoints with weights_only=True so that a file cannot "
                         f"run code (checkpoints of manpp before 0.2 held NumPy arrays; this version does not read "
                         f"them)") from None
    except OSError as exc:  # the file opened and read above: a seek past its end is a cut-short file
        if exc.errno in (errno.EIO, errno.EACCES, errno.EPERM, errno.ENOENT):
            raise io_error(exc, path, "read") from None
        raise ManppError(f"cannot read checkpoint '{path}': it is corrupt or cut short ({first_line(exc)})") from None
    except (EOFError, RuntimeError, ValueError, KeyError, IndexError, AttributeError, TypeError) as exc:
        raise ManppError(f"cannot read checkpoint '{path}': it is corrupt or cut short ({type(exc).__name__}: "
                         f"{first_line(exc)[:120]})") from None
    return _verified(ckpt, path)


def _inner(exc: BaseException) -> str:
    """torch's one useful line in a weights-only failure (the rest is advice about weights_only=False)."""
    for line in str(exc).splitlines():
        if "WeightsUnpickler error:" in line:
            inner = line.split("WeightsUnpickler error:", 1)[1].split(". Please")[0].strip()
            return inner[:160] or "unreadable"
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    for i, line in enumerate(lines):
        if line.endswith("WeightsUnpickler error:") and i + 1 < len(lines):
            return lines[i + 1][:160]
    return first_line(exc)[:160]


def load(path: str | Path, *, purpose: str = "resume") -> dict:
    """A manpp checkpoint file, or a run folder's ``checkpoint.pt``.

    ``purpose='resume'`` needs a full training checkpoint (optimizer, position, RNG); ``'weights'``
    takes ``best.pt`` too. Every failure is one :class:`ManppError` line saying what the file is.
    """
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT
    if not path.exists():
        raise ManppError(f"checkpoint '{path}' does not exist")
    if path.is_dir():
        raise ManppError(f"checkpoint '{path}' is a folder, not a file")
    ckpt = _read(path)
    if not isinstance(ckpt, dict) or "model" not in ckpt or "config" not in ckpt:
        raise ManppError(f"'{path}' is not a manpp checkpoint (no model state or config in it)")
    kind = ckpt.get("kind") or ("best" if "score" in ckpt and "optimizer" not in ckpt else "checkpoint")
    if purpose == "resume":
        if kind == "best":
            raise ManppError(f"'{path}' holds only the weights of the best evaluation (best.pt), not what resuming "
                             f"needs: resume the run folder '{path.parent}' (its {CHECKPOINT})")
        missing = [k for k in ("step", "epoch", "history") if k not in ckpt]
        if missing or not ("optimizer" in ckpt or "optimizers" in ckpt):
            raise ManppError(f"'{path}' cannot be resumed: it lacks {', '.join(missing) or 'the optimizer state'} "
                             f"(a checkpoint written by manpp train has them)")
    return ckpt


def load_weights(path: str | Path) -> dict:
    """A weights file (``pretrained=``): a state dict of tensors, or one inside ``state_dict`` / ``model``;
    read safely, each way it can fail named."""
    path = Path(path)
    if not path.is_file():
        raise ManppError(f"pretrained weights file '{path}' does not exist" if not path.exists()
                         else f"pretrained weights '{path}' is a folder, not a file")
    if path.suffix == ".safetensors":  # manpp export's other format: tensors only
        from .extras import require

        load_file = require("safetensors.torch", "read .safetensors weights").load_file
        try:
            return load_file(str(path))
        except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
            raise ManppError(f"weights '{path}' are not a readable safetensors file ({type(exc).__name__}: "
                             f"{' '.join(str(exc).split())[:160]})") from None
    state = _read(path)
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ManppError(f"pretrained weights '{path}' hold no state dict (a mapping of names to tensors)")
    return state


def is_finished(ckpt: dict) -> bool:
    """Whether the checkpoint's run trained all its epochs."""
    epochs = ckpt["config"].get("epochs", 0)
    return ckpt.get("epoch", 0) >= epochs and ckpt.get("status", "finished") != "diverged"


def nonfinite(state: dict) -> str | None:
    """The first floating-point tensor of a state dict holding a NaN or an infinity, else None."""
    for name, tensor in state.items():
        if isinstance(tensor, torch.Tensor) and tensor.is_floating_point() and not torch.isfinite(tensor).all():
            return name
    return None


def state_dict_mismatch(exc: RuntimeError, limit: int = 3) -> str:
    """What ``load_state_dict`` found wrong, in one line: the first few missing, unexpected and
    misshapen entries (torch puts them on the lines after its first)."""
    parts = []
    for line in str(exc).splitlines()[1:]:
        line = line.strip().rstrip(".")
        if not line:
            continue
        head, colon, rest = line.partition(": ")
        if colon and rest.startswith('"'):  # Missing key(s) / Unexpected key(s): a list of quoted names
            names = [n.strip().strip('"') for n in rest.split(",")]
            more = f" and {len(names) - limit} more" if len(names) > limit else ""
            parts.append(f"{head.lower()}: {', '.join(names[:limit])}{more}")
        else:
            parts.append(line)
    if not parts:
        return first_line(exc)
    shown = parts[:2 * limit]
    return "; ".join(shown) + (f"; and {len(parts) - len(shown)} more problems" if len(parts) > len(shown) else "")


def load_model_state(model: torch.nn.Module, ckpt: dict) -> None:
    """The checkpoint's weights into ``model``, or one line naming what does not fit."""
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as exc:
        raise ManppError(f"checkpoint does not fit this model: {state_dict_mismatch(exc)}") from None


__all__ = ["BEST", "CHECKPOINT", "CHECKPOINT_VERSION", "KINDS", "checksum", "is_finished", "load",
           "load_model_state", "load_weights", "run_identity",
           "nonfinite", "rng_state", "save", "set_rng_state", "state_dict_mismatch"]
