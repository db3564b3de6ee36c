"""Building a run from its config: the data, the model, the optimizer, the batch order, the lr.

``manpp train`` (either step strategy), ``compare``, ``bench``, ``describe`` and ``plan`` all
build through these functions, so a config means the same thing everywhere.
"""

from __future__ import annotations

import dataclasses
import random
import warnings

import numpy as np
import torch

from ..base import distributed as D
from ..base.errors import ManppError
from ..config import trainconfig as C
from ..config.resolve import data_info, resolve, resolve_switches  # noqa: F401  (data_info: callers read it here too)
from ..config.validate import check_config, check_value
from ..core.engine import AMP_DTYPES, LocalModel
from ..memory.saved import saved_dtype

RANK_SEED = 1_000_003  # process r > 0 draws its random numbers (augmentation, dropout) from seed + r * RANK_SEED
EPOCH_SEED = 100_003  # the batch order of epoch e comes from the seed seed * EPOCH_SEED + e
SUBSET_SEED = 20261125  # train_subset / test_subset: the same images for every run and seed (seeded: per seed)


def resolve_device(name: str) -> torch.device:
    """``--device`` for a single process (``auto``: CUDA when there is one); clear errors otherwise."""
    return D.process_device(name, None)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# --- data ------------------------------------------------------------------------------------

def load_data(cfg: C.TrainConfig):
    """``(train, test, info)`` of a run: the dataset with its data switches (:mod:`manpp.data.options`),
    cut to ``train_subset`` / ``test_subset``."""
    from ..data import build_datasets
    from ..data.options import adapt, adjusted_info
    from ..models import model_task

    cfg = resolve_switches(cfg)  # a no-op for a resolved config
    check_value("augment", cfg.augment)
    check_value("normalize", cfg.normalize)
    train_set, test_set, own = build_datasets(cfg.dataset, cfg.data_dir, download=cfg.download, seed=cfg.seed,
                                              image_size=cfg.image_size, task=model_task(cfg.model),
                                              augment=cfg.augment != "off", val_fraction=cfg.val_fraction)
    info = adjusted_info(own, cfg.gray_to_rgb, cfg.normalize)
    train_set = adapt(train_set, own, info, cfg.augment, training=True)
    test_set = adapt(test_set, own, info, cfg.augment, training=False)
    return (subset(train_set, cfg.train_subset, "train_subset", cfg.subset_order, cfg.seed),
            subset(test_set, cfg.test_subset, "test_subset", cfg.subset_order, cfg.seed), info)


def with_classes(cfg: C.TrainConfig, info, ckpt: dict | None = None) -> C.TrainConfig:
    """``cfg`` with the data's class names recorded (``classes``); a run that named other classes (in its config,
    or the checkpoint it resumes) is refused: its labels would mean other things."""
    names = info.names()
    for where, given in (("the config", cfg.classes), ("the checkpoint", (ckpt or {}).get("config", {}).get("classes"))):
        if given is not None and list(given) != names:
            differ = sorted(set(map(str, given)) ^ set(names))[:4]
            raise ManppError(f"the data's classes are not those of {where}: {len(names)} classes here, {len(given)} "
                             f"there{f' (differing: {differ})' if differ else ' (in another order)'}; train on the "
                             f"same class folders, or start a new run")
    return dataclasses.replace(cfg, classes=names)


def subset(dataset, n: int | None, name: str, order: str = "random", seed: int = 0):
    """``n`` images of ``dataset``, or the whole set.

    ``order='random'``: a fixed random choice (the same for every run and seed); ``'first'``: the first
    ``n``; ``'seeded'``: a random choice drawn from ``seed`` (the same for every run of one seed, so runs
    of one seed stay paired, and another for each seed).
    """
    check_value("subset_order", order)
    if n is None or n >= len(dataset):
        return dataset
    if n < 1:
        raise ManppError(f"{name} must be a positive number of images, got {n}")
    if order == "first":
        return torch.utils.data.Subset(dataset, range(n))
    draw = SUBSET_SEED + (seed + 1) * EPOCH_SEED if order == "seeded" else SUBSET_SEED
    keep = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(draw))[:n]
    return torch.utils.data.Subset(dataset, keep.sort().values.tolist())


class EpochBatches(torch.utils.data.Sampler):
    """Shuffled index batches for one epoch, fixed by (seed, epoch), optionally from a batch offset.

    The order does not depend on any global RNG, so a resumed run sees the same batches. With
    ``world`` processes, ``batch_size`` is the global batch and process ``rank`` gets the
    contiguous slice ``[rank * b, (rank + 1) * b)`` of each one, ``b = batch_size / world``: the
    shards of one step together are exactly the single-process batch. (The seed and epoch play
    the part of ``DistributedSampler.set_epoch``.)
    """

    def __init__(self, n: int, batch_size: int, seed: int, epoch: int, start: int = 0, *, rank: int = 0,
                 world: int = 1, drop_last: bool = True):
        D.check_batch_size(batch_size, world)
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} is not one of the {world} processes")
        self.n, self.batch_size, self.seed, self.epoch, self.start = n, batch_size, seed, epoch, start
        self.rank, self.world, self.drop_last = rank, world, drop_last

    def __len__(self) -> int:
        return steps_per_epoch(self.n, self.batch_size, self.drop_last) - self.start

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * EPOCH_SEED + self.epoch)
        perm = torch.randperm(self.n, generator=g).tolist()
        for b in range(self.start, steps_per_epoch(self.n, self.batch_size, self.drop_last)):
            batch = perm[b * self.batch_size:(b + 1) * self.batch_size]
            lo, hi = D.shard_bounds(len(batch), self.rank, self.world)
            yield batch[lo:hi]


def steps_per_epoch(n: int, batch_size: int, drop_last: bool = True) -> int:
    """Training steps in an epoch of ``n`` images: full batches only, or with the last partial one."""
    return n // batch_size if drop_last else -(-n // batch_size)


def epoch_loader(dataset, cfg: C.TrainConfig, epoch: int, start: int = 0, *, rank: int = 0, world: int = 1,
                 **loader_kw) -> torch.utils.data.DataLoader:
    """The training batches of ``epoch`` (from batch ``start``), with worker seeds of their own:
    making the iterator draws nothing from the global RNG, so a resumed run continues exactly."""
    sampler = EpochBatches(len(dataset), cfg.batch_size, cfg.seed, epoch, start, rank=rank, world=world,
                           drop_last=resolve_switches(cfg).drop_last)
    worker_seed = torch.Generator().manual_seed(cfg.seed * EPOCH_SEED + epoch + 1 + rank * RANK_SEED)
    return torch.utils.data.DataLoader(dataset, batch_sampler=sampler, generator=worker_seed, **loader_kw)


def test_loader(dataset, cfg: C.TrainConfig, **loader_kw) -> torch.utils.data.DataLoader:
    """The evaluation batches, in order, with a generator of their own: evaluating draws nothing from the
    global RNG, so a run evaluated between epochs continues exactly as one resumed there (every trainer
    evaluates through this loader)."""
    return torch.utils.data.DataLoader(dataset, batch_size=cfg.eval_batch_size,
                                       generator=torch.Generator().manual_seed(cfg.seed), **loader_kw)


# --- model -----------------------------------------------------------------------------------

def build_model(cfg: C.TrainConfig, info, device: torch.device | str = "cpu") -> LocalModel:
    """Backbone + method from a config (resolved here if it is not: :func:`manpp.config.resolve.resolve`) and a
    dataset's :class:`~manpp.data.DatasetInfo`. Nothing is chosen here: K, the split, the objective
    and its settings are the config's."""
    from ..data import denormalize
    from ..objectives.methods import build_local_model
    from ..models import build_backbone
    from ..models.library import is_library_name
    from ..tasks import task_of

    cfg = resolve(cfg)
    library = is_library_name(cfg.model)
    backbone = build_backbone(cfg.model, num_classes=info.num_classes, in_channels=info.in_channels,
                              image_size=info.image_size, anchor_base=cfg.anchor_base,
                              pretrained=cfg.pretrained if library else None)
    if cfg.pretrained and not library:
        load_pretrained(backbone, cfg)
    model = build_local_model(backbone, cfg.local_settings(), num_classes=info.num_classes,
                              in_channels=info.in_channels, image_size=info.image_size,
                              denormalize=lambda x: denormalize(x, info), task=task_of(backbone),
                              aux_lr_scale=cfg.aux_lr_scale)
    model.amp_dtype = amp_dtype(cfg)
    model.saved_dtype = saved_dtype(cfg.saved_activations)
    model.offload = cfg.offload_activations
    if cfg.offload_activations and torch.device(device).type != "cuda":
        warnings.warn(f"offload_activations moves saved activations from a GPU to host memory; on {device} they are "
                      f"already there, so it only copies them (no memory is saved)", stacklevel=2)
    if cfg.amp == "bf16" and torch.device(device).type == "cpu" and cpu_has_native_bf16() is False:
        warnings.warn("amp=bf16 on a CPU without native bf16 arithmetic (no AVX512-BF16, no AMX): its bf16 "
                      "convolutions are emulated and slower than fp32 here (MAN++ K=16 on ResNet-32, batch 128: 7.9 s "
                      "a step against 3.0 s in fp32, measured on such a CPU); leave amp unset for speed",
                      stacklevel=2)
    model.checkpointing = cfg.checkpointing
    model = model.to(device, memory_format=memory_format(cfg))
    if not cfg.compile:
        return model
    return model.compile_parts(**({"mode": cfg.compile_mode} if cfg.compile_mode else {}))


def cpu_has_native_bf16() -> bool | None:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX tiles), where bf16 autocast is faster than
    fp32; None where this torch cannot tell."""
    probes = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    if any(probe is None for probe in probes):
        return None
    return any(probe() for probe in probes)


def check_buildable(cfg: C.TrainConfig) -> None:
    """Every setting checked and the model built once on the CPU (and dropped), reading no data: what
    a run would refuse (K, the objective's settings, the backbone, pretrained weights) is refused now."""
    check_config(cfg)
    build_model(dataclasses.replace(cfg, compile=False, offload_activations=False), data_info(cfg), "cpu")


def load_pretrained(backbone, cfg: C.TrainConfig) -> None:
    """``pretrained``: a state dict file of the backbone's own keys (``manpp export`` of a CIFAR ResNet, say), or
    a plain torchvision ResNet's, loaded into the backbone's ResNet units (a library model, ``timm/...`` or
    ``torchvision/...``, loads its own when it is built). The classifier may have another number of classes:
    it then keeps its own initialisation."""
    from ..base.checkpoint import load_weights
    from ..models.imagenet import load_resnet_weights

    state = load_weights(cfg.pretrained)
    own = backbone.state_dict()
    if set(state) <= set(own):  # the backbone's own keys
        other = [k for k, v in state.items() if v.shape != own[k].shape]
        if any(not k.startswith("head.") for k in other):
            raise ManppError(f"pretrained weights '{cfg.pretrained}' do not fit model '{cfg.model}': '{other[0]}' is "
                             f"{tuple(state[other[0]].shape)} there but {tuple(own[other[0]].shape)} here")
        missing = sorted(k for k in set(own) - set(state) if not k.startswith("head."))
        if missing:
            raise ManppError(f"pretrained weights '{cfg.pretrained}' lack {missing[:3]} of model '{cfg.model}'")
        backbone.load_state_dict({**own, **{k: v for k, v in state.items() if k not in other}})
        return
    arch = str(getattr(backbone, "arch", "")).replace("retinanet_", "").replace("deeplabv3_", "")
    if not hasattr(backbone, "unit_names") or not arch.startswith(("resnet", "resnext", "wide_resnet")):
        raise ManppError(f"pretrained weights '{cfg.pretrained}' are neither a state dict of model '{cfg.model}' nor "
                         f"of a torchvision ResNet")
    load_resnet_weights(backbone, state)


def memory_format(cfg: C.TrainConfig) -> torch.memory_format:
    return torch.channels_last if cfg.channels_last else torch.contiguous_format


def amp_dtype(cfg: C.TrainConfig) -> torch.dtype | None:
    """The autocast dtype of ``cfg.amp`` (None: full precision)."""
    if cfg.amp is None:
        return None
    check_value("amp", cfg.amp)
    return AMP_DTYPES[cfg.amp]


# --- optimizer -------------------------------------------------------------------------------

def check_options(cfg: C.TrainConfig) -> None:
    """Every config field checked up front (:func:`manpp.config.validate.check_config`): one clear error,
    before any work."""
    check_config(cfg)
