"""Cutting a backbone's ordered units into K consecutive, gradient-isolated modules.

Three ways (docs/method.md):

- ``"even"``: K modules of (nearly) equal unit count, any K from 1 to the number of units;
- ``"paper"``: the module sets of the authors' release for a paper setting. The CIFAR tables
  list the last unit of every module and the release adds the stem as its own module, so
  "ResNet-32 K=8" really has 9 modules and "ResNet-110 K=32" has 33. We reproduce those
  sets and report the true count. ImageNet ResNets (K = 2, 4) and ViTs (K = 4) keep the stem
  or embedding in module 0;
- an explicit list: the last unit (index or name) of every module but the final one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from ..base.errors import ManppError, choices
from ..memory.measure import ActivationTracker

# Release tables: the last unit of each module as (stage, unit), stage 1-based, unit 0-based, final
# module included. CIFAR: the stem (unit 0) is always an extra module of its own (the release adds
# it), so "K=8" has 9 modules. ImageNet (torchvision ResNets, docs/method.md, paper settings): the stem
# belongs to module 0.
_R110_K32 = [
    (1, 1), (1, 2), (1, 4), (1, 5), (1, 7), (1, 9), (1, 11), (1, 13), (1, 14), (1, 16), (1, 17),
    (2, 1), (2, 2), (2, 4), (2, 5), (2, 7), (2, 9), (2, 11), (2, 13), (2, 14), (2, 16), (2, 17),
    (3, 1), (3, 3), (3, 4), (3, 6), (3, 7), (3, 9), (3, 11), (3, 13), (3, 15), (3, 17),
]
_R101 = {2: [(2, 0), (4, 2)], 4: [(2, 2), (3, 8), (3, 16), (4, 2)]}
_BLOCKS = {"resnet18": (2, 2, 2, 2), "resnet34": (3, 4, 6, 3), "resnet50": (3, 4, 6, 3), "resnet101": (3, 4, 23, 3),
           "resnet152": (3, 8, 36, 3)}  # blocks per stage


@dataclass(frozen=True)
class Preset:
    ends: tuple[str, ...]  # the last unit (by name) of every module, the final one included
    stem_module: bool = False  # the release's extra stem module (CIFAR)


def _layers(pairs, stem_module: bool = False) -> Preset:
    return Preset(tuple(f"layer{s}.{u}" for s, u in pairs), stem_module)


PAPER_PRESETS: dict[str, dict[int, Preset]] = {
    "resnet32": {
        8: _layers([(1, 0), (1, 2), (1, 4), (2, 1), (2, 3), (3, 0), (3, 2), (3, 4)], True),
        16: _layers([(s, u) for s in (1, 2, 3) for u in range(5)], True),
    },
    "resnet110": {
        32: _layers(_R110_K32, True),
        55: _layers([(s, u) for s in (1, 2, 3) for u in range(18)], True),
    },
    "resnet101": {k: _layers(v) for k, v in _R101.items()},
    "resnext101_32x8d": {k: _layers(v) for k, v in _R101.items()},
    "resnet152": {2: _layers([(2, 5), (4, 2)]), 4: _layers([(2, 6), (3, 13), (3, 25), (4, 2)])},
    # COCO RetinaNet, K = 4 (docs/release.md: module splits): stem+layer1 | layer2 | layer3 | layer4 + FPN + heads;
    # DeepLabV3 (our design, the release has none): the same stage cuts, K = 2 after layer2
    **{f"{task}_{net}": {4: _layers([(1, b[0] - 1), (2, b[1] - 1), (3, b[2] - 1), (4, b[3] - 1)]),
                         **({2: _layers([(2, b[1] - 1), (4, b[3] - 1)])} if task == "deeplabv3" else {})}
       for task in ("retinanet", "deeplabv3") for net, b in _BLOCKS.items()
       if not (task == "deeplabv3" and net not in ("resnet50", "resnet101"))},
    # ViT, depth 12: four groups of three blocks, the embedding in group 0 (docs/release.md: module splits)
    **{f"vit_{size}": {4: Preset(("blocks.2", "blocks.5", "blocks.8", "blocks.11"))}
       for size in ("tiny", "small", "base")},
}

SPLITS = ("even", "paper", "memory")
DEFAULT_K = 4  # the paper's K for ImageNet ResNets, ViTs and COCO; CIFAR ResNets declare 16 (``default_k``)


@dataclass(frozen=True)
class Partition:
    """Module j holds units ``bounds[j][0] <= i < bounds[j][1]``; the last module also holds the head."""

    bounds: tuple[tuple[int, int], ...]
    label: str
    nominal: int | None = None  # the release's "K" for a paper preset (may differ from the true K)

    @property
    def k(self) -> int:
        return len(self.bounds)

    @property
    def nominal_k(self) -> int:
        return self.nominal or self.k

    def units_of(self, j: int) -> range:
        return range(*self.bounds[j])

    def describe(self, unit_names: Sequence[str]) -> list[str]:
        out = []
        for start, stop in self.bounds:
            out.append(unit_names[start] if stop - start == 1 else f"{unit_names[start]}..{unit_names[stop - 1]}")
        return out


def _arch(backbone) -> str:
    return getattr(backbone, "arch", None) or type(backbone).__name__.lower()


def paper_presets(backbone) -> dict[int, Preset]:
    """The release tables known for this backbone (nominal K -> module ends)."""
    return PAPER_PRESETS.get(_arch(backbone), {})


def _preset_summary(backbone) -> str:
    presets = paper_presets(backbone)
    if not presets:
        return "no paper presets for this model"
    items = [f"K={k} ({_preset_modules(backbone, k)} modules)" for k in sorted(presets)]
    return "paper presets: " + ", ".join(items)


def _preset_modules(backbone, k: int) -> int:
    ends = _preset_ends(backbone, k)
    return len(ends)


def _preset_ends(backbone, k: int) -> list[int]:
    names = list(backbone.unit_names)
    preset = PAPER_PRESETS[_arch(backbone)][k]
    ends = [0] if preset.stem_module else []
    return ends + [names.index(name) for name in preset.ends]


def _from_ends(ends: Sequence[int], n_units: int, label: str) -> Partition:
    bounds, start = [], 0
    for end in ends:
        bounds.append((start, end + 1))
        start = end + 1
    if start < n_units:
        bounds.append((start, n_units))
    return Partition(tuple(bounds), label)


def even_split(n_units: int, k: int) -> Partition:
    """K modules of n_units // K units; the remainder goes to the last modules."""
    base, extra = divmod(n_units, k)
    sizes = [base + (1 if j >= k - extra else 0) for j in range(k)]
    ends, acc = [], 0
    for size in sizes:
        acc += size
        ends.append(acc - 1)
    return _from_ends(ends, n_units, f"even K={k}")


def _resolve_unit(backbone, ref, n_units: int) -> int:
    names = list(backbone.unit_names)
    if isinstance(ref, str) and not ref.strip().lstrip("-").isdigit():
        if ref not in names:
            raise ManppError(f"unknown unit '{ref}' in split: units are {names[0]}, {names[1]}, ..., {names[-1]}")
        return names.index(ref)
    idx = int(ref)
    if not 0 <= idx < n_units - 1:
        raise ManppError(
            f"split boundary {idx} is out of range: a module may end after unit 0 to {n_units - 2} "
            f"(the model has {n_units} units and the last belongs to the final module)"
        )
    return idx


def capped_k(k: int, units: int) -> int:
    """A default K, at most the backbone's unit count (the one place the cap is written)."""
    return max(1, min(int(k), int(units)))


def default_k(backbone) -> int:
    """K when none is given: the backbone's ``default_k`` (else :data:`DEFAULT_K`), at most its unit count."""
    return capped_k(getattr(backbone, "default_k", DEFAULT_K), len(backbone.units))


def make_partition(backbone, k: int | None = None, split: str | Sequence = "even") -> Partition:
    """Cut ``backbone.units`` into modules. See the module docstring for ``split``."""
    n_units = len(backbone.units)
    if isinstance(split, str) and "," in split:
        split = [s.strip() for s in split.split(",") if s.strip()]
    if not isinstance(split, str):
        ends = [_resolve_unit(backbone, ref, n_units) for ref in split]
        if any(b <= a for a, b in zip(ends, ends[1:])):
            raise ManppError(f"split boundaries must be strictly increasing, got {list(split)}")
        part = _from_ends(ends, n_units, f"explicit K={len(ends) + 1}")
        if k is not None and k != part.k:
            raise ManppError(f"split {list(split)} makes {part.k} modules but K={k} was asked for")
        return part
    if k is None:
        k = 1
    if split == "paper":
        presets = paper_presets(backbone)
        if k not in presets:
            where = _preset_summary(backbone)
            raise ManppError(
                f"no paper preset for {_arch(backbone)} with K={k} ({where}); use split=even for any K "
                f"from 1 to {n_units}"
            )
        ends = _preset_ends(backbone, k)
        part = _from_ends(ends[:-1], n_units, f"paper K={k}")
        return Partition(part.bounds, f"paper K={k} ({part.k} modules)", nominal=k)
    if split == "memory":
        raise ManppError("split 'memory' is measured on the input: use memory_balanced_ends(backbone, k, in_channels, "
                         "image_size) for the module ends, or manpp.local_model / manpp.wrap, which do it")
    if split != "even":
        raise ManppError(f"unknown split '{split}': accepted are {choices(SPLITS)} or a list of module end units")
    if not isinstance(k, int) or not 1 <= k <= n_units:
        raise ManppError(
            f"K={k} is not possible for {_arch(backbone)} ({n_units} units): choose K from 1 to {n_units} "
            f"for an even split; {_preset_summary(backbone)}"
        )
    return even_split(n_units, k)


# --- memory-balanced splits ------------------------------------------------------------------

def unit_activation_bytes(backbone, batch_size: int, in_channels: int, image_size: int,
                          device: torch.device | str | None = None) -> list[int]:
    """Bytes autograd saves during each unit's forward (the head counts with the last unit), for one
    batch of random images on ``device`` (default: the backbone's, the meta device included); this is
    what each unit adds to an end-to-end graph."""
    p = next(backbone.parameters())
    x = torch.randn(batch_size, in_channels, image_size, image_size, device=device or p.device, dtype=p.dtype)
    tracker = ActivationTracker(list(backbone.parameters()) + list(backbone.buffers()))
    marks: list[int] = []
    handles = [u.register_forward_hook(lambda *_: marks.append(tracker.current)) for u in backbone.units]
    was_training = backbone.training
    backbone.train()
    try:
        with tracker:
            out = backbone(x)
            total = tracker.current
        del out
    finally:
        for h in handles:
            h.remove()
        backbone.train(was_training)
    marks[-1] = total
    return [b - a for a, b in zip([0] + marks[:-1], marks)]


def balanced_ends(costs: Sequence[float], k: int) -> list[int]:
    """The last unit of each of the first ``k - 1`` modules of the contiguous split of ``costs`` into
    ``k`` parts whose largest sum is smallest (exact dynamic programme; ties: earlier cuts)."""
    n = len(costs)
    if not 1 <= k <= n:
        raise ManppError(f"K={k} is not possible for {n} units: choose K from 1 to {n}")
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + float(c))
    inf = float("inf")
    best = [[inf] * (n + 1) for _ in range(k + 1)]  # best[j][i]: first i units in j modules
    cut = [[0] * (n + 1) for _ in range(k + 1)]
    best[0][0] = 0.0
    for j in range(1, k + 1):
        for i in range(j, n - (k - j) + 1):
            for s in range(j - 1, i):
                value = max(best[j - 1][s], prefix[i] - prefix[s])
                if value < best[j][i]:
                    best[j][i], cut[j][i] = value, s
    ends, i = [], n
    for j in range(k, 0, -1):
        s = cut[j][i]
        if j > 1:
            ends.append(s - 1)
        i = s
    return sorted(ends)


def memory_balanced_ends(backbone, k: int, in_channels: int, image_size: int, batch_size: int = 2) -> list[int]:
    """``split="memory"``: the module ends whose largest activation sum is smallest, from each unit's
    activation bytes measured on one batch of random images."""
    per_unit = unit_activation_bytes(backbone, batch_size, in_channels, image_size)
    return balanced_ends(per_unit, k)
