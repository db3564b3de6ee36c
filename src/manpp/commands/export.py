"""``manpp export``: the trained backbone alone, as the plain model's state dict.

It is written as a ``.pt`` file and, with the ``safetensors`` extra, as ``.safetensors`` beside it
(tensors only: nothing in it can run code), with ``classes.json`` beside them: the class names in label
order and what ``manpp predict`` needs to prepare an image (model, image size, channels, normalisation);
the safetensors file carries the same in its metadata. The auxiliary networks (heads, learnable and EMA copies,
scales) are dropped. For torchvision backbones (ImageNet ResNets, ResNeXts, ViTs) the keys are
torchvision's, so the file loads with ``strict=True`` into ``torchvision.models.<arch>(num_classes=N)``
for inference or fine-tuning; for CIFAR ResNets it loads into ``manpp.build_backbone(name, ...)``.

What it checks before it writes anything:

- the run finished (its checkpoint trained every epoch, and its ``summary.json``, when there is one, says
  ``finished``) or stopped where its ``max_steps`` asked; a run stopped by a signal, diverged, failed or
  running needs ``allow_unfinished`` (the messages use the summary's word for how it ended);
- every weight is finite (``allow_nonfinite`` overrides it);
- no target is a file of a run (``checkpoint.pt``, ``best.pt``, ``log.csv``, ``config.yaml``,
  ``summary.json``, the lock): those are never written, whatever the flags;
- no target exists, unless ``force``.

Files are written atomically (:mod:`manpp.base.safeio`), with the usual permissions of a new file.
"""

from __future__ import annotations

import io
import json
import warnings
from pathlib import Path

import torch

from ..base.checkpoint import BEST, is_finished, nonfinite, state_dict_mismatch
from ..base.checkpoint import load as load_checkpoint
from ..base.errors import ManppError, choices
from ..base.extras import available, require
from ..base.safeio import make_folder, write_bytes
from ..config import trainconfig as C
from ..models import BACKBONES, build_backbone
from ..run.rundir import RUN_FILES, holds_run, read_summary
from ..run.runlock import LOCK
from ..train.build import data_info

FORMATS = ("pt", "safetensors")


def export_backbone(checkpoint: str | Path, out: str | Path, *, best: bool = False, allow_unfinished: bool = False,
                    allow_nonfinite: bool = False, force: bool = False,
                    formats: tuple[str, ...] | None = None) -> dict:
    """Write the backbone of a run's checkpoint to ``out``; returns what was written.

    ``out``: a file name (``NAME.pt``; the safetensors file is ``NAME.safetensors``) or a folder
    (``backbone.pt`` and ``backbone.safetensors`` in it). ``formats``: some of :data:`FORMATS`;
    None writes ``.pt``, and ``.safetensors`` when the safetensors package is installed. See the
    module docstring for what is refused, and the flags that allow it.
    """
    source = Path(checkpoint)
    folder = source if source.is_dir() else source.parent
    ckpt = load_checkpoint(checkpoint, purpose="weights")
    if ckpt.get("kind") == "best":
        raise ManppError(f"'{checkpoint}' is a best.pt: export the run folder '{folder}' with --best")
    stopped_by = _check_finished(ckpt, folder, checkpoint, allow_unfinished)
    if best:
        if not (folder / BEST).is_file():
            raise ManppError(f"run '{checkpoint}' has no {BEST} (runs of manpp before 0.2 keep only the last "
                             f"checkpoint): export without --best")
        ckpt = dict(ckpt, model=load_checkpoint(folder / BEST, purpose="weights")["model"])
    paths = _paths(str(out), _formats(formats))
    _check_targets(paths, folder, source, force)
    cfg = C.saved_config(ckpt["config"], source=f"checkpoint '{checkpoint}'")
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
    bad = nonfinite(plain)
    if bad is not None:
        if not allow_nonfinite:
            raise ManppError(f"the weights of '{checkpoint}' are not finite ('{bad}' holds a NaN or an infinity): "
                             f"nothing was written; export them anyway with --allow-nonfinite")
        warnings.warn(f"exporting weights that are not finite ('{bad}')", stacklevel=2)
    meta = export_meta(cfg, info, int(num_classes), int(stem.shape[1]))
    classes_path = next(iter(paths.values())).parent / CLASSES_FILE
    if classes_path.exists() and not force and json.loads(classes_path.read_text() or "{}") != meta:
        raise ManppError(f"'{classes_path}' already exists with other classes: export into another folder, or "
                         f"replace it with --force")
    encoded = {path: _encode(plain, fmt, meta) for fmt, path in paths.items()}  # before any file is touched
    make_folder(next(iter(paths.values())).parent)
    written = [str(write_bytes(path, data)) for path, data in encoded.items()]
    written.append(str(write_bytes(classes_path, (json.dumps(meta, indent=1) + "\n").encode())))
    target = BACKBONES.find(cfg.model).export  # the registration says what an export loads into
    loader = (target(cfg.model, int(num_classes), info.image_size) if target is not None
              else f"manpp.build_backbone('{cfg.model}', ...)")
    return {"path": written[0], "paths": written, "best": best, "classes": meta["classes"], "stopped_by": stopped_by, "model": cfg.model, "num_classes": int(num_classes),
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


def _check_finished(ckpt: dict, folder: Path, checkpoint, allow_unfinished: bool) -> str | None:
    """A finished run, or one that stopped where its ``max_steps`` asked (returns ``"max_steps"``): its
    summary's word for how it ended (without a summary: finished when its checkpoint trained every epoch,
    else stopped)."""
    summary = read_summary(folder) if (folder / "summary.json").exists() else None
    status = (summary or {}).get("status") or ("finished" if is_finished(ckpt) else "stopped")
    if status == "finished" and is_finished(ckpt):
        return None
    if status == "stopped" and str((summary or {}).get("reason") or "").startswith("max_steps"):
        return "max_steps"  # it ended where the user asked it to
    done = f"{ckpt.get('epoch', 0)} of {ckpt['config'].get('epochs')} epochs"
    reason = (summary or {}).get("reason")
    why = f"not finished ({status}, {done}{': ' + reason if reason else ''})"
    if not allow_unfinished:
        raise ManppError(f"run '{checkpoint}' is {why}: resume it with manpp train --resume, or export it anyway "
                         f"with --allow-unfinished")
    warnings.warn(f"exporting a run that is {why}", stacklevel=3)
    return None


def _paths(text: str, formats: tuple[str, ...]) -> dict[str, Path]:
    """Each format's file: inside ``text`` when it is a folder (or ends with a slash), else beside it
    with the format's suffix. Nothing is created here."""
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
    return paths


def _check_targets(paths: dict[str, Path], folder: Path, source: Path, force: bool) -> None:
    """Never a file of a run (whatever the flags); an existing file only with ``force``."""
    protected = {(folder / name).resolve() for name in (*RUN_FILES, LOCK)} | {source.resolve()}
    for path in paths.values():
        target = path.resolve()
        if target in protected or (path.name in (*RUN_FILES, LOCK) and holds_run(path.parent)):
            raise ManppError(f"'{path}' is a file of the run in '{path.parent}': export never writes onto a run's "
                             f"files; give --out another name (e.g. {path.parent / 'backbone.pt'})")
    existing = [str(p) for p in paths.values() if p.exists()]
    if existing and not force:
        raise ManppError(f"{' and '.join(existing)} already exist{'s' if len(existing) == 1 else ''}: export writes "
                         f"{' and '.join(str(p) for p in paths.values())}; replace "
                         f"{'it' if len(existing) == 1 else 'them'} with --force, or choose another --out")


CLASSES_FILE = "classes.json"  # beside the exported weights


def export_meta(cfg, info, num_classes: int, in_channels: int) -> dict:
    """What an export says of itself: its classes in label order, and how to prepare an image for it."""
    names = list(cfg.classes) if cfg.classes is not None and len(cfg.classes) == num_classes else \
        [str(i) for i in range(num_classes)]
    return {"classes": names, "model": cfg.model, "dataset": cfg.dataset, "image_size": info.image_size,
            "in_channels": in_channels, "mean": list(info.mean), "std": list(info.std), "task": info.task}


def _encode(state: dict, fmt: str, meta: dict | None = None) -> bytes:
    """The file's bytes: ``torch.save``'s, or safetensors' (tensors only; ``meta`` as its metadata)."""
    if fmt == "safetensors":
        save = require("safetensors.torch", "export as .safetensors").save
        return save({k: v.detach().contiguous().clone() for k, v in state.items()},
                    metadata={"manpp": json.dumps(meta)} if meta else None)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()
