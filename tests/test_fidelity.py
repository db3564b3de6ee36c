"""fidelity=release and its switches, grayscale storage, and no module without a loss (issue 12)."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

import manpp
from manpp.config import trainconfig as C
from manpp.train.build import EpochBatches, build_model, load_data, seed_everything, steps_per_epoch
from manpp.core.optim import lr_at
from manpp.data import build_datasets, denormalize
from manpp.data.common import RandomCropFlip
from manpp.data.info import CIFAR_MEAN, CIFAR_STD
from manpp.base.errors import ManppError
from manpp.models import build_backbone
from manpp.config.resolve import resolve
from manpp.train.loop import train


def cifar_net(depth: int = 32, channels: int = 3):
    return build_backbone(f"resnet{depth}", num_classes=10, in_channels=channels, image_size=32)


# --- 1. grayscale storage ------------------------------------------------------------------------

def _gradient_ratios(channels: int, decode_gray: str, seed: int, x1, y, pixels) -> list[float]:
    """|d(lambda1 BCE)/dh| / |d(lambda2 CE)/dh| at every module's output h, at initialisation."""
    torch.manual_seed(seed)
    backbone = cifar_net(32, channels)
    model = manpp.local_model(backbone, method="infopro", k=16, in_channels=channels, decode_gray=decode_gray)
    h = x1 if channels == 1 else x1.expand(-1, 3, -1, -1)
    image01 = pixels if channels == 1 else pixels.expand(-1, 3, -1, -1)
    ratios = []
    for j, head in enumerate(model.aux):
        for u in model.partition.units_of(j):
            h = backbone.units[u](h)
        if head.lambda1 == 0:
            continue
        feature = h.detach().requires_grad_(True)
        (g_rec,) = torch.autograd.grad(head.lambda1 * head.decoder(feature, image01), feature)
        (g_cls,) = torch.autograd.grad(head.lambda2 * head.classifier(feature, y), feature)
        ratios.append(float(g_rec.norm() / g_cls.norm()))
    return ratios


def test_grayscale_as_one_channel_gives_the_signal_of_three_channels():
    train_set, _, info = build_datasets("digits", augment=False)
    x1 = torch.stack([train_set[i][0] for i in range(16)])
    y = torch.tensor([train_set[i][1] for i in range(16)])
    pixels = denormalize(x1, info)

    def geomean(channels, decode):
        values = [r for seed in (0, 1) for r in _gradient_ratios(channels, decode, seed, x1, y, pixels)]
        return math.exp(sum(map(math.log, values)) / len(values))

    one, three, old = geomean(1, "rgb"), geomean(3, "rgb"), geomean(1, "gray")
    # the default (decode the grayscale image as 3 channels): the reconstruction-to-classification
    # gradient ratio of a 3-channel copy of the image, module by module (measured within 10%)
    assert abs(math.log(one / three)) < math.log(1.25), (one, three)
    # decoding the single channel (the earlier behaviour) gives about 3x more reconstruction gradient
    assert old / three > 2.2, (old, three)


def test_rgb_decoder_reconstructs_the_replicated_image():
    model = manpp.local_model(cifar_net(32, 1), method="infopro", k=4, in_channels=1)
    head = model.aux[0]
    assert head.decoder.net[-1].out_channels == 3
    h = torch.randn(2, 16, 32, 32)
    gray = torch.rand(2, 1, 32, 32)
    assert torch.allclose(head.decoder(h, gray), head.decoder(h, gray.expand(-1, 3, -1, -1)))
    assert manpp.local_model(cifar_net(32, 1), method="infopro", k=4, in_channels=1,
                             decode_gray="gray").aux[0].decoder.net[-1].out_channels == 1
    with pytest.raises(ManppError, match="unknown decode_gray 'grey': accepted are 'rgb' or 'gray'"):
        manpp.local_model(cifar_net(32, 1), method="infopro", k=4, in_channels=1, decode_gray="grey")


# --- 2. fidelity=release and its switches ---------------------------------------------------------

def test_fidelity_fills_only_the_switches_left_unset():
    ours = resolve(C.TrainConfig())
    assert (ours.copy_init, ours.gray_to_rgb, ours.augment, ours.normalize, ours.subset_order, ours.drop_last,
            ours.lr_update, ours.allow_zero_loss) == ("copy", False, "dataset", "dataset", "random", True, "step",
                                                      False)
    rel = resolve(C.apply(C.TrainConfig(), {"fidelity": "release"}))
    assert (rel.copy_init, rel.gray_to_rgb, rel.augment, rel.normalize, rel.subset_order, rel.drop_last,
            rel.lr_update, rel.allow_zero_loss) == ("random", True, "release", "release", "first", False, "epoch",
                                                    True)
    mixed = resolve(C.apply(C.TrainConfig(), {"fidelity": "release", "copy_init": "copy", "drop_last": True}))
    assert (mixed.copy_init, mixed.drop_last, mixed.subset_order) == ("copy", True, "first")
    with pytest.raises(ManppError, match="unknown fidelity 'paper': accepted are 'ours' or 'release'"):
        resolve(C.apply(C.TrainConfig(), {"fidelity": "paper"}))


@pytest.mark.parametrize("method,k,split", [("manpp", 8, "paper"), ("manpp", 16, "paper"), ("dgl", 5, "even"),
                                            ("e2e", None, "even")])
def test_release_split_is_the_paper_preset_where_there_is_one(method, k, split):
    cfg = C.apply(C.TrainConfig(), {"fidelity": "release", "method": method, "k": k, "model": "resnet32"})
    assert resolve(cfg).split == split  # by the model's name: no backbone is built to resolve
    assert resolve(C.apply(cfg, {"fidelity": "ours"})).split == "even"


def test_release_gives_the_stem_module_the_1c2f_supcon_head():
    cfg = C.apply(C.TrainConfig(), {"fidelity": "release", "method": "manpp", "k": 8, "dataset": "digits"})
    _, _, info = load_data(cfg)
    model = build_model(cfg, info)
    stem, other = model.aux[0].head.classifier, model.aux[1].head.classifier
    assert model.k == 9  # the release's "K=8": its table plus the stem module
    assert stem.loss == "contrast" and len(stem.convs) == 3  # 1c2f: one conv + BN + ReLU
    assert other.loss == "cross_entropy" and len(other.convs) == 6  # 2c2f
    assert model.aux[0].head.lambda2 == 0.5 and model.aux[-1].head.lambda2 == pytest.approx(0.25)  # ixy_2 = 0
    assert all(not torch.equal(a.ema.conv1.weight, a.source.conv1.weight) for a in model.aux)  # copy_init=random
    # explicit heads settings win over the release's
    explicit = build_model(C.apply(cfg, {"heads.first_loss": "cross_entropy"}), info)
    assert explicit.aux[0].head.classifier.loss == "cross_entropy"
    # DGL has no release settings of its own: its resolved settings are its defaults
    from manpp.objectives.dgl import DGLSettings

    assert resolve(C.apply(cfg, {"objective": "dgl"})).objective_settings == dataclasses.asdict(DGLSettings())


def test_release_data_switches_on_a_grayscale_set():
    ours_train, ours_test, ours_info = load_data(C.apply(C.TrainConfig(), {"dataset": "digits"}))
    cfg = C.apply(C.TrainConfig(), {"dataset": "digits", "fidelity": "release", "train_subset": 100})
    train_set, test_set, info = load_data(cfg)
    assert info.in_channels == 3 and info.mean == CIFAR_MEAN and info.std == CIFAR_STD
    image, label = test_set[0]
    assert image.shape == (3, 32, 32)
    # the same pixels, replicated and normalised with CIFAR's statistics
    assert torch.allclose(denormalize(image, info), denormalize(ours_test[0][0], ours_info).expand(3, -1, -1),
                          atol=1e-5)
    transform = train_set.dataset.transform
    assert isinstance(transform, RandomCropFlip) and transform.reflect and transform.padding == 4 and transform.flip
    assert list(train_set.indices) == list(range(100))  # subset_order=first
    assert list(load_data(C.apply(cfg, {"subset_order": "random"}))[0].indices) != list(range(100))
    # seeded: each seed its own random subset, the same for every run of that seed
    seeded = [list(load_data(C.apply(cfg, {"subset_order": "seeded", "seed": s}))[0].indices) for s in (0, 1, 0)]
    assert seeded[0] == seeded[2] and seeded[0] != seeded[1] and len(set(seeded[1])) == 100
    assert list(load_data(C.apply(cfg, {"subset_order": "random", "seed": 1}))[0].indices) == list(
        load_data(C.apply(cfg, {"subset_order": "random", "seed": 0}))[0].indices)
    # each switch alone
    alone = load_data(C.apply(C.TrainConfig(), {"dataset": "digits", "gray_to_rgb": True}))[2]
    assert alone.in_channels == 3 and alone.mean == ours_info.mean * 3
    assert load_data(C.apply(C.TrainConfig(), {"dataset": "digits", "augment": "off"}))[0].transform is None
    with pytest.raises(ManppError, match="unknown augment 'flip': accepted are 'dataset', 'release' or 'off'"):
        load_data(C.apply(C.TrainConfig(), {"dataset": "digits", "augment": "flip"}))


def test_reflect_crop_is_a_crop_of_the_reflect_padded_image():
    image = torch.arange(2 * 6 * 6, dtype=torch.float32).view(2, 6, 6)
    padded = F.pad(image[None], (4,) * 4, mode="reflect")[0]
    crops = {tuple(padded[:, i:i + 6, j:j + 6].flatten().tolist()) for i in range(9) for j in range(9)}
    torch.manual_seed(0)
    crop = RandomCropFlip(4, flip=False, reflect=True)
    outs = [crop(image) for _ in range(20)]
    assert all(tuple(o.flatten().tolist()) in crops for o in outs)
    assert len({tuple(o.flatten().tolist()) for o in outs}) > 5


def test_keeping_the_last_partial_batch_trains_every_image_once():
    batches = list(EpochBatches(10, 4, seed=0, epoch=0, drop_last=False))
    assert [len(b) for b in batches] == [4, 4, 2] and sorted(i for b in batches for i in b) == list(range(10))
    assert [len(b) for b in EpochBatches(10, 4, seed=0, epoch=0)] == [4, 4]
    assert steps_per_epoch(10, 4, False) == 3 and steps_per_epoch(10, 4) == 2


def test_release_lr_schedule_is_set_once_per_epoch():
    cfg = C.apply(C.TrainConfig(), {"lr": 0.8, "epochs": 400, "warmup_epochs": 10, "warmup_lr": 0.01,
                                    "lr_update": "epoch"})
    spe = 49  # CIFAR-10 at batch 1024
    values = {e: round(lr_at((e - 1) * spe, cfg, spe), 3) for e in (1, 5, 10, 11, 200, 400)}
    assert values == {1: 0.010, 5: 0.326, 10: 0.720, 11: 0.799, 200: 0.400, 400: 0.000}  # docs/release.md: training recipes
    assert lr_at(4 * spe, cfg, spe) == lr_at(5 * spe - 1, cfg, spe)  # constant within an epoch
    step_cfg = C.apply(cfg, {"lr_update": "step"})
    assert lr_at(4 * spe, step_cfg, spe) != lr_at(5 * spe - 1, step_cfg, spe)


def test_a_release_run_records_every_switch_and_trains_the_partial_batch(tmp_path):
    cfg = C.apply(C.TrainConfig(), {"dataset": "digits", "fidelity": "release", "method": "manpp", "k": 4,
                                    "objective": "dgl", "model": "resnet32", "epochs": 1, "batch_size": 64,
                                    "train_subset": 100, "test_subset": 64, "out": str(tmp_path / "run")})
    result = train(cfg, verbose=False)
    saved = C.load_yaml(tmp_path / "run" / "config.yaml")
    assert (saved["fidelity"], saved["copy_init"], saved["drop_last"], saved["lr_update"], saved["gray_to_rgb"],
            saved["subset_order"], saved["split"]) == ("release", "random", False, "epoch", True, "first", "even")
    assert result.summary["history"][-1]["step"] == 2  # 64 + 36 images


# --- 3. no module without a loss --------------------------------------------------------------

@pytest.mark.parametrize("method", ["infopro", "man", "manpp"])
def test_default_infopro_weights_give_every_module_a_loss_on_resnet32(method):
    net = cifar_net(32)
    for k in range(2, 17):
        model = manpp.local_model(net, method=method, k=k)
        for j, aux in enumerate(model.aux):
            weights = getattr(aux, "head", aux).loss_weights()
            assert any(w > 0 for w in weights.values()), (method, k, j, weights)


@pytest.mark.parametrize("k,split", [(2, "even"), (4, "even"), (2, "paper"), (4, "paper")])
def test_default_infopro_weights_give_every_module_a_loss_on_resnet101(k, split):
    net = build_backbone("resnet101", num_classes=10, in_channels=3, image_size=64)
    for method in ("infopro", "manpp"):
        model = manpp.local_model(net, method=method, k=k, split=split, image_size=64)
        assert all(getattr(a, "head", a).lambda2 > 0 for a in model.aux)


def test_explicit_zero_weights_are_refused_unless_allowed():
    net = cifar_net(32)
    with pytest.raises(ManppError, match=r"module 14 gets no local loss: its infopro weights are "
                                         r"lambda1 \(reconstruction\) = 0, lambda2 \(classification\) = 0.*"
                                         r"allow_zero_loss=true"):
        manpp.local_model(net, method="infopro", k=16, ixy_2=0.0)
    with pytest.raises(ManppError, match="module 1 gets no local loss"):  # MAN++ at K=3: r = 1 at module K-2 = 1
        manpp.local_model(net, method="manpp", k=3, ixy_2=0.0)
    with pytest.warns(UserWarning, match="module 14 gets no local loss.*allowed by allow_zero_loss"):
        model = manpp.local_model(net, method="infopro", k=16, ixy_2=0.0, allow_zero_loss=True)
    assert model.aux[14].lambda1 == 0 == model.aux[14].lambda2
    cfg = C.apply(C.TrainConfig(), {"dataset": "digits", "method": "infopro", "k": 16, "heads.ixy_2": 0})
    with pytest.raises(ManppError, match="module 14 gets no local loss"):
        build_model(cfg, load_data(cfg)[2])


# --- 5. the candidates for closing the gap to E2E ---------------------------------------------

def test_scale_init_and_aux_lr_scale():
    from manpp.core.optim import build_optimizer, parameter_groups, set_lr

    model = manpp.local_model(cifar_net(20), method="manpp", k=3, objective="dgl", scale_init=0.5)
    assert all(float(a.scale.detach()) == 0.5 for a in model.aux)
    with pytest.raises(ManppError, match=r"bad scale_init 3.0 .*accepted is a number in \[0, 2\]"):
        manpp.local_model(cifar_net(20), method="manpp", k=3, objective="dgl", scale_init=3.0)
    cfg = C.apply(C.TrainConfig(), {"aux_lr_scale": 2.0, "lr": 0.1})
    optimizer = build_optimizer(cfg, parameter_groups(model, cfg))
    set_lr(optimizer, 0.1)
    backbone, aux = optimizer.param_groups
    assert backbone["lr"] == 0.1 and aux["lr"] == 0.2
    assert {id(p) for p in aux["params"]} == {id(p) for p in model.aux.parameters() if p.requires_grad}
    assert len(parameter_groups(model, C.TrainConfig())) == 1
    with pytest.raises(ManppError, match="bad aux_lr_scale 0.0 .*accepted is a number > 0"):
        build_optimizer(C.apply(cfg, {"aux_lr_scale": 0}), parameter_groups(model, cfg))


def test_scale_lr_scale_trains_the_scales_at_their_own_lr():
    """scale_lr_scale puts MAN++'s scales in a group of their own at aux_lr_scale * scale_lr_scale: at 0
    they hold at scale_init while everything else trains; at 1 (the default) they move; a method without
    learnable scales refuses it, as does a bad value."""
    from manpp.core.optim import parameter_groups

    def trained(scale_lr_scale: float):
        torch.manual_seed(0)
        model = manpp.local_model(cifar_net(20), method="manpp", k=3, objective="dgl", scale_lr_scale=scale_lr_scale)
        optimizer = torch.optim.SGD(parameter_groups(model, lr=0.5), lr=0.5, momentum=0.9)
        copies = [a.lb for a in model.aux]
        before = [p.detach().clone() for c in copies for p in c.parameters()]
        for _ in range(3):
            optimizer.zero_grad(set_to_none=True)
            model.train_step(torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,)))
            optimizer.step()
        moved = any(not torch.equal(b, p) for b, p in zip(before, (p for c in copies for p in c.parameters())))
        return model, optimizer, [float(a.scale.detach()) for a in model.aux], moved

    model, optimizer, held, moved = trained(0.0)
    assert model.scale_lr_scale == 0.0 and held == [1.0, 1.0] and moved
    scales = {id(a.scale) for a in model.aux}
    assert [(g["lr"], {id(p) for p in g["params"]} == scales) for g in optimizer.param_groups] == [
        (0.5, False), (0.5, False), (0.0, True)]
    _, _, free, _ = trained(1.0)
    assert all(s != 1.0 for s in free)
    slow = manpp.local_model(cifar_net(20), method="manpp", k=3, scale_lr_scale=0.1)  # InfoPro's heads: aux at 2
    assert sorted(g["lr"] for g in parameter_groups(slow, lr=0.1)) == pytest.approx([0.02, 0.1, 0.2])
    with pytest.raises(ManppError, match="scale_lr_scale=0.5 sets the lr of MAN\\+\\+'s learnable scales, and method "
                                         "'man' has none"):
        manpp.local_model(cifar_net(20), method="man", k=3, scale_lr_scale=0.5)
    with pytest.raises(ManppError, match="bad scale_lr_scale -1"):
        manpp.local_model(cifar_net(20), method="manpp", k=3, scale_lr_scale=-1)


def test_aux_lr_scale_defaults_to_the_heads_own():
    """InfoPro's heads train at twice the backbone's lr under fidelity=ours, whichever local method trains
    them (InfoPro, MAN, MAN++: a method and its MAN++ variant compare at the same head settings); DGL's and
    PredSim's at the backbone's, as every method under fidelity=release; a run's own value wins."""
    def scale(**values) -> float:
        return resolve(C.apply(C.TrainConfig(), {"model": "resnet8", "dataset": "digits", **values})).aux_lr_scale

    assert C.TrainConfig().aux_lr_scale is None  # open until resolved
    assert scale(method="manpp", k=2) == 2.0 and scale(method="manpp", objective="infopro", k=2) == 2.0
    assert scale(method="manpp", objective="dgl", k=2) == 1.0  # measured on InfoPro's heads only
    assert scale(method="manpp", k=2, fidelity="release") == 1.0
    assert [scale(method=m, k=2) for m in ("man", "dgl", "infopro", "predsim")] == [2.0, 1.0, 2.0, 1.0]
    assert scale(method="man", objective="dgl", k=2) == scale(method="dgl", k=2) == 1.0
    assert scale(method="e2e") == 1.0
    assert scale(method="manpp", k=2, aux_lr_scale=1) == 1.0
    assert scale(method="dgl", k=2, fidelity="release", aux_lr_scale=3) == 3.0
    resolved = resolve(C.apply(C.TrainConfig(), {"model": "resnet8", "dataset": "digits", "method": "manpp", "k": 2}))
    assert resolve(resolved) == resolved


def test_infopro_heads_are_weighted_alike_under_every_method():
    """By default (lambda_schedule=shared) InfoPro, MAN and MAN++ weight InfoPro's heads by module, module for
    module the same, so a method and its MAN/MAN++ variant compare at the same loss weights; the release (and
    lambda_schedule=auto) keeps each method's own: by the stage of the copied unit under MAN/MAN++. ImageNet's
    heads keep constant weights either way. Python and the command line build the same weights."""
    def weights(model) -> list[tuple[float, float]]:
        return [(round(a.lambda1, 6), round(a.lambda2, 6)) for a in (getattr(a, "head", a) for a in model.aux)]

    net = cifar_net(32)
    base = weights(manpp.local_model(net, method="infopro", k=16))
    assert base[0] == (5.0, 0.5) and base[14] == (0.0, 0.5)  # 5 -> 0 over the modules, j / (K - 2)
    assert len({l1 for l1, _ in base}) == 15  # one step a module
    assert weights(manpp.local_model(net, method="manpp", k=16)) == base
    assert weights(manpp.local_model(net, method="man", k=16, objective="infopro")) == base
    by_stage = weights(manpp.local_model(net, method="manpp", k=16, lambda_schedule="auto"))
    assert by_stage != base and sorted({round(l1, 2) for l1, _ in by_stage}) == [3.93, 4.29, 4.64, 5.0]
    assert weights(manpp.local_model(net, method="infopro", k=16, lambda_schedule="auto")) == base
    assert weights(manpp.local_model(net, method="infopro", k=16, lambda_schedule="stage")) != base

    def cli(**values) -> list[tuple[float, float]]:
        cfg = resolve(C.apply(C.TrainConfig(), {"model": "resnet32", "dataset": "digits", "k": 16, **values}))
        return weights(build_model(cfg, load_data(cfg)[2]))

    assert cli(method="manpp") == cli(method="infopro")
    with pytest.warns(UserWarning, match="module 14 gets no local loss"):  # the release's end weights 0 / 0
        release_base = cli(method="infopro", fidelity="release")
    assert cli(method="manpp", fidelity="release") != release_base
    assert resolve(C.apply(C.TrainConfig(), {"method": "manpp", "fidelity": "release", "model": "resnet32",
                                             "dataset": "digits"})).objective_settings["lambda_schedule"] == "auto"
    big = build_backbone("resnet101", num_classes=10, in_channels=3, image_size=64)
    for method in ("infopro", "manpp"):
        assert set(weights(manpp.local_model(big, method=method, k=4, image_size=64))) == {(5.0, 0.5)}
    with pytest.raises(ManppError, match="unknown lambda_schedule 'depth': accepted are 'shared', 'auto'"):
        manpp.local_model(net, method="infopro", k=16, lambda_schedule="depth")


@pytest.mark.slow  # a training run
def test_a_run_saved_with_the_releases_weights_resumes_with_them(tmp_path):
    """A run whose config says lambda_schedule=auto (every run saved before 'shared' became the default) is
    continued from its checkpoint with the weights it trained with, by stage under MAN++."""
    from manpp.run.rundir import resume_source

    cfg = C.apply(C.TrainConfig(), {"dataset": "digits", "model": "resnet32", "method": "manpp", "k": 16,
                                    "heads.lambda_schedule": "auto", "epochs": 1, "max_steps": 1, "batch_size": 16,
                                    "train_subset": 32, "test_subset": 16, "out": str(tmp_path / "run")})
    train(cfg, verbose=False)
    ckpt, saved = resume_source(tmp_path / "run")
    assert ckpt is not None and saved["objective_settings"]["lambda_schedule"] == "auto"
    again = resolve(C.saved_config(saved))  # what `manpp train --resume` builds from
    lambdas = sorted({round(a.head.lambda1, 2) for a in build_model(again, load_data(again)[2]).aux})
    assert lambdas == [3.93, 4.29, 4.64, 5.0]  # by stage, not by module


@pytest.mark.parametrize("method,objective,scale_lr", [("manpp", "infopro", 1.0), ("manpp", "dgl", 1.0),
                                                       ("man", "infopro", 1.0), ("infopro", None, 1.0),
                                                       ("dgl", None, 1.0), ("e2e", None, 1.0),
                                                       ("manpp", "infopro", 0.25), ("manpp", "dgl", 0.25)])
def test_python_and_the_command_line_build_the_same_optimizer_groups(method, objective, scale_lr):
    """local_model and wrap resolve aux_lr_scale (and take scale_lr_scale) as manpp train does: the same
    groups, the same lr per group."""
    from manpp.core.optim import build_optimizer, parameter_groups, set_lr

    values = {"model": "resnet8", "dataset": "digits", "method": method, "lr": 0.1,
              **({"k": 2} if method != "e2e" else {}), **({"objective": objective} if objective else {}),
              **({"scale_lr_scale": scale_lr} if scale_lr != 1 else {})}
    cfg = resolve(C.apply(C.TrainConfig(), values))
    info = load_data(cfg)[2]
    cli_model = build_model(cfg, info)
    cli = build_optimizer(cfg, parameter_groups(cli_model, cfg))
    set_lr(cli, cfg.lr)  # what manpp train does before each step (here at the peak lr)
    net = build_backbone("resnet8", num_classes=info.num_classes, in_channels=info.in_channels)
    py_model = manpp.local_model(net, method=method, **({"k": 2} if method != "e2e" else {}),
                                 **({"objective": objective} if objective else {}),
                                 **({"scale_lr_scale": scale_lr} if scale_lr != 1 else {}))
    py = torch.optim.SGD(manpp.parameter_groups(py_model, lr=0.1), lr=0.1, momentum=0.9)
    assert py_model.aux_lr_scale == cli_model.aux_lr_scale == cfg.aux_lr_scale

    def groups(model, optimizer):
        names = {id(p): n for n, p in model.named_parameters()}
        return sorted((g["lr"], sorted(names[id(p)] for p in g["params"])) for g in optimizer.param_groups)

    assert groups(cli_model, cli) == groups(py_model, py)
    heads = 2 if method != "e2e" and objective in (None, "infopro") and method != "dgl" else 1  # InfoPro's heads
    lrs = sorted(g["lr"] for g in py.param_groups)
    if scale_lr == 1:
        assert lrs == pytest.approx([0.1] if heads == 1 else [0.1, 0.2])
    else:  # the scales apart, at the heads' lr times scale_lr
        assert lrs == pytest.approx(sorted([0.1, 0.1 * heads, 0.1 * heads * scale_lr]))


def test_wrap_resolves_the_aux_lr_scale_as_the_command_line_does():
    import torchvision

    wrapped = manpp.wrap(torchvision.models.resnet18(num_classes=10), method="manpp", k=2, image_size=32)
    cfg = resolve(C.apply(C.TrainConfig(), {"model": "torchvision/resnet18", "dataset": "cifar10", "method": "manpp",
                                            "k": 2}))
    assert wrapped.objective == cfg.objective and wrapped.aux_lr_scale == cfg.aux_lr_scale
    assert len(manpp.parameter_groups(wrapped)) == (2 if cfg.aux_lr_scale != 1 else 1)
    assert manpp.wrap(torchvision.models.resnet18(num_classes=10), method="manpp", k=2, image_size=32,
                      aux_lr_scale=3).aux_lr_scale == 3.0  # a value of one's own wins


def test_aux_warmup_trains_only_the_auxiliary_networks_first(tmp_path):
    """aux_warmup_epochs: the backbone's lr is 0 for those epochs, the heads train; then both do."""
    from manpp.core.optim import holds_backbone
    from manpp.train.loop import train

    settings = {"model": "resnet8", "dataset": "digits", "method": "manpp", "objective": "dgl", "k": 2,
                "batch_size": 64, "train_subset": 256, "test_subset": 64, "log_every": 0, "device": "cpu"}
    cfg = C.apply(C.TrainConfig(), {**settings, "epochs": 2, "aux_warmup_epochs": 1, "out": str(tmp_path / "w")})
    assert [holds_backbone(s, cfg, 4) for s in (0, 3, 4)] == [True, True, False]
    first = train(C.apply(cfg, {"max_steps": 4}), verbose=False).model  # the whole warm-up epoch
    resolved = resolve(cfg)
    seed_everything(resolved.seed)  # as train builds it
    info = load_data(resolved)[2]
    fresh_state = {k: v.clone() for k, v in build_model(resolved, info).state_dict().items()}
    start = {k: v for k, v in fresh_state.items() if k.startswith("backbone.") and v.is_floating_point()}
    after = first.state_dict()
    weights = [k for k in start if "running" not in k and "num_batches" not in k]
    # the backbone's weights never moved; the heads' did
    assert weights and all(torch.equal(after[k], start[k]) for k in weights)
    assert any(not torch.equal(after[k], fresh_state[k]) for k in after if k.startswith("aux.") and ".head." in k
               and "running" not in k)
    done = train(C.apply(cfg, {"out": str(tmp_path / "w")}), resume=str(tmp_path / "w"), verbose=False).model
    assert any(not torch.equal(done.state_dict()[k], start[k]) for k in weights)  # then the backbone trains
    with pytest.raises(ManppError, match="aux_warmup_epochs=1.0 trains only the auxiliary networks first, and "
                                         "method 'e2e' has none"):
        train(C.apply(cfg, {"method": "e2e", "k": None, "objective": None, "out": str(tmp_path / "e")}), verbose=False)


@pytest.mark.parametrize("model,method,extra", [("resnet32", "manpp", {}), ("resnet32", "dgl", {}),
                                                ("resnet8", "man", {"k": 3}), ("resnet8", "e2e", {}),
                                                ("vit_tiny", "manpp", {}), ("resnet18", "infopro", {})])
def test_python_resolves_every_open_choice_as_the_command_line(model, method, extra):
    """Nothing left open by local_model is chosen otherwise than by manpp train's resolution: K, split,
    objective and its full settings, copy_init, aux_lr_scale (one rule: resolve.resolve_local)."""
    dataset = "synthetic"
    cfg = resolve(C.apply(C.TrainConfig(), {"model": model, "dataset": dataset, "method": method, "image_size": 32,
                                            **extra}))
    info = load_data(dataclasses.replace(cfg, train_subset=8, test_subset=8))[2]
    cli = build_model(cfg, info)
    net = build_backbone(model, num_classes=info.num_classes, in_channels=info.in_channels, image_size=32)
    py = manpp.local_model(net, method=method, image_size=32, **extra)
    assert py.partition.bounds == cli.partition.bounds and py.aux_lr_scale == cli.aux_lr_scale
    assert getattr(py, "objective", None) == getattr(cli, "objective", None)
    assert getattr(py, "objective_settings", None) == getattr(cli, "objective_settings", None)
    assert [type(a).__name__ for a in py.aux] == [type(a).__name__ for a in cli.aux]


def test_the_model_builder_refuses_open_choices():
    from manpp.objectives.methods import LocalSettings, build_local_model

    net = build_backbone("resnet8", num_classes=10)
    with pytest.raises(ManppError, match=r"k, split, copy_init, allow_zero_loss, aux_lr_scale are open .*"
                                         r"manpp.local_model"):
        build_local_model(net, LocalSettings(method="manpp", objective="dgl"), num_classes=10, in_channels=3,
                          image_size=32, aux_lr_scale=None)
    with pytest.raises(ManppError, match="objective is open"):
        build_local_model(net, LocalSettings(method="manpp", k=2, split="even", copy_init="copy",
                                             allow_zero_loss=False), num_classes=10, in_channels=3, image_size=32,
                          aux_lr_scale=1.0)
