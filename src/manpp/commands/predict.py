"""``manpp predict``: a trained classifier's top classes for new images, by name.

The model comes from a run folder (its last checkpoint, or ``best.pt`` with ``best``) or from an export
(``manpp export``'s ``.pt`` or ``.safetensors``, with the ``classes.json`` written beside it). The images are
files, or folders searched for image files (every suffix of :data:`manpp.data.IMAGE_EXTENSIONS`). Each is
prepared as the run's evaluation prepares its data: read as RGB (or grey for a one-channel model), resized so
its shorter side is ``image_size * 256/224`` and centre-cropped to ``image_size`` for the datasets of
photographs (``folder``, ``imagenet``), resized to ``image_size`` for the small fixed-size ones (digits,
Fashion-MNIST, CIFAR, ...), then normalised with the dataset's mean and standard deviation. The model runs in
evaluation mode, without its auxiliary networks.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..base.errors import ManppError

CROPPED = ("folder", "imagenet")  # photographs: resize the shorter side, then centre-crop (the evaluation's)


def image_files(paths) -> list[Path]:
    """The image files among ``paths``: files as given, folders searched (sorted)."""
    from ..data import IMAGE_EXTENSIONS

    suffixes = {s.lower() for s in IMAGE_EXTENSIONS}
    out = []
    for text in paths:
        path = Path(text).expanduser()
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in suffixes
                           and not any(part.startswith(".") for part in p.relative_to(path).parts))
            if not found:
                raise ManppError(f"folder '{path}' holds no image ({', '.join(sorted(suffixes)[:5])}, ...)")
            out += found
        elif path.is_file():
            out.append(path)
        else:
            raise ManppError(f"'{text}' is neither an image file nor a folder")
    return out


def _from_run(source: Path, best: bool) -> tuple[torch.nn.Module, dict]:
    from ..config import trainconfig as C
    from ..train.build import data_info
    from ..base.checkpoint import BEST
    from ..base.checkpoint import load as load_checkpoint
    from .export import export_meta
    from ..models import build_backbone

    folder = source if source.is_dir() else source.parent
    ckpt = load_checkpoint(source, purpose="weights")
    if best:
        if not (folder / BEST).is_file():
            raise ManppError(f"run '{source}' has no {BEST}: predict without --best")
        ckpt = dict(ckpt, model=load_checkpoint(folder / BEST, purpose="weights")["model"])
    cfg = C.saved_config(ckpt["config"], source=f"checkpoint '{source}'")
    state = {k[len("backbone."):]: v for k, v in ckpt["model"].items() if k.startswith("backbone.")}
    info = data_info(cfg)
    head = [v for k, v in state.items() if k.startswith("head.") and k.endswith("weight")]
    stem = next(v for v in state.values() if v.dim() == 4)
    meta = export_meta(cfg, info, int(head[-1].shape[0]), int(stem.shape[1]))
    backbone = build_backbone(cfg.model, num_classes=len(meta["classes"]), in_channels=meta["in_channels"],
                              image_size=meta["image_size"])
    backbone.load_state_dict(state)
    return backbone, meta


def _plain_keys(backbone: torch.nn.Module) -> dict[str, str]:
    """The export's key of each of ``backbone``'s state-dict keys (its ``export_state_dict`` renames them):
    every tensor is filled with its index, exported, and read back."""
    own = backbone.state_dict()
    export = getattr(backbone, "export_state_dict", None)
    if export is None:
        return {k: k for k in own}
    with torch.no_grad():
        for i, value in enumerate(own.values()):
            value.fill_(i)
        plain = export()
    mapping = {}
    names = list(own)
    for key, value in plain.items():
        index = int(value.flatten()[0].item()) if value.numel() else -1
        if 0 <= index < len(names):
            mapping[names[index]] = key
    return mapping


def _from_export(source: Path) -> tuple[torch.nn.Module, dict]:
    from ..base.checkpoint import load_weights
    from .export import CLASSES_FILE
    from ..models import build_backbone

    meta_path = source.parent / CLASSES_FILE
    if not meta_path.is_file():
        raise ManppError(f"'{source}' has no {CLASSES_FILE} beside it: predict needs the classes and the image "
                         f"preparation that manpp export writes there (export the run again, or predict from its "
                         f"run folder)")
    try:
        meta = json.loads(meta_path.read_text())
        meta["classes"], meta["model"], meta["image_size"]  # noqa: B018 - the keys it needs
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ManppError(f"'{meta_path}' is not a classes file of manpp export ({type(exc).__name__})") from None
    state = load_weights(source)
    backbone = build_backbone(meta["model"], num_classes=len(meta["classes"]), in_channels=meta["in_channels"],
                              image_size=meta["image_size"])
    mapping = _plain_keys(backbone)
    wanted = {plain: own for own, plain in mapping.items()}
    missing = sorted(set(wanted) - set(state))[:3]
    if missing:
        raise ManppError(f"'{source}' does not fit {meta['model']} with {len(meta['classes'])} classes (it lacks "
                         f"{missing}): was it exported by manpp with this {CLASSES_FILE}?")
    backbone.load_state_dict({wanted[k]: v for k, v in state.items() if k in wanted}, strict=True)
    return backbone, meta


def load_classifier(source: str | Path, *, best: bool = False) -> tuple[torch.nn.Module, dict]:
    """The backbone of a run folder or checkpoint, or of an export, in evaluation mode, and its ``meta``
    (classes, model, image size, channels, normalisation)."""
    path = Path(source).expanduser()
    if not path.exists():
        raise ManppError(f"'{source}' does not exist: give a run folder, a checkpoint or an exported .pt/.safetensors")
    if path.is_dir() or path.name in ("checkpoint.pt", "best.pt"):
        model, meta = _from_run(path, best)
    else:
        if best:
            raise ManppError("--best picks a run's best.pt: give the run folder, not an export")
        model, meta = _from_export(path)
    if meta.get("task", "classification") != "classification":
        raise ManppError(f"predict names classes of whole images; {meta['model']} does {meta['task']}")
    return model.eval(), meta


def prepare(path: Path, meta: dict) -> torch.Tensor:
    """One image file as the model's evaluation input (see the module docstring)."""
    from PIL import Image
    from torchvision.transforms import v2

    size = int(meta["image_size"])
    try:
        with Image.open(path) as image:
            image = image.convert("L" if meta["in_channels"] == 1 else "RGB")
    except (OSError, ValueError) as exc:
        raise ManppError(f"cannot read image '{path}': {exc}") from None
    crop = ([v2.Resize(round(size * 256 / 224), antialias=True), v2.CenterCrop(size)]
            if meta.get("dataset") in CROPPED else [v2.Resize((size, size), antialias=True)])
    pipeline = v2.Compose([v2.ToImage(), *crop, v2.ToDtype(torch.float32, scale=True),
                           v2.Normalize(list(meta["mean"]), list(meta["std"])), v2.ToPureTensor()])
    x = pipeline(image)
    if x.shape[0] != meta["in_channels"]:  # a one-channel dataset read as grey for a three-channel model
        x = x.expand(meta["in_channels"], -1, -1)
    return x


@torch.no_grad()
def predict(source: str | Path, images, *, top: int = 3, best: bool = False, batch_size: int = 32) -> list[dict]:
    """For each image: its ``top`` classes with their probabilities, most likely first."""
    if top < 1:
        raise ManppError(f"--top must be at least 1, got {top}")
    model, meta = load_classifier(source, best=best)
    files = image_files(images)
    classes = meta["classes"]
    out = []
    for start in range(0, len(files), batch_size):
        chunk = files[start:start + batch_size]
        probs = torch.softmax(model(torch.stack([prepare(p, meta) for p in chunk])).float(), dim=1)
        values, indices = probs.topk(min(top, len(classes)), dim=1)
        for path, p, i in zip(chunk, values.tolist(), indices.tolist()):
            out.append({"image": str(path), "top": [{"class": classes[j], "label": j, "probability": q}
                                                    for q, j in zip(p, i)]})
    return out


def format_predictions(rows: list[dict]) -> str:
    lines = []
    for row in rows:
        best = ", ".join(f"{t['class']} {t['probability']:.1%}" for t in row["top"])
        lines.append(f"{row['image']}: {best}")
    return "\n".join(lines)


__all__ = ["format_predictions", "image_files", "load_classifier", "predict", "prepare"]
