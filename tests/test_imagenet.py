"""ImageNet-scale backbones (torchvision ResNets, ResNeXts, ViTs), their heads, presets, data and export.

Small inputs (32-64 px) and tiny batches keep this fast on a CPU.
"""

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import manpp
from manpp.config import trainconfig as C
from manpp.base.errors import ManppError
from manpp.core.momentum import MomentumAux
from manpp.objectives.infopro import ImageNetAuxClassifier, ImageNetDecoder

ROOT = Path(__file__).resolve().parent.parent


def blocks_per_module(model):
    names = model.backbone.unit_names
    return [sum(1 for i in model.partition.units_of(j) if names[i] not in ("stem", "embed")) for j in range(model.k)]


@pytest.mark.parametrize("arch,blocks", [
    ("resnet101", {2: [4, 29], 4: [6, 10, 8, 9]}), ("resnet152", {2: [9, 41], 4: [10, 15, 12, 13]}),
])
def test_imagenet_paper_presets_match_the_release(arch, blocks):
    torch.manual_seed(0)
    net = manpp.build_backbone(arch, num_classes=10)
    for k, expected in blocks.items():
        model = manpp.local_model(net, method="manpp", k=k, split="paper", objective="dgl", image_size=32)
        assert blocks_per_module(model) == expected  # docs/release.md: module splits; the stem is in module 0
        assert net.unit_names[0] == "stem" and 0 in model.partition.units_of(0)
        # each copied unit is the next module's first block, and keeps channels and resolution
        for j, aux in enumerate(model.aux):
            assert aux.source is net.units[model.partition.bounds[j + 1][0]]
            assert net.unit_stages[model.partition.bounds[j + 1][0]] == net.unit_stages[model.partition.bounds[j][1] - 1]


def test_vit_paper_preset_and_release_head():
    torch.manual_seed(0)
    net = manpp.build_backbone("vit_tiny", num_classes=10, image_size=32)
    model = manpp.local_model(net, method="manpp", k=4, split="paper", objective="dgl")
    assert net.unit_names[0] == "embed" and len(net.units) == 13
    assert [len(model.partition.units_of(j)) for j in range(4)] == [4, 3, 3, 3]  # embedding in group 0
    for j, aux in enumerate(model.aux):
        n = model.partition.bounds[j + 1][0]  # first block of the next group
        assert aux.source is net.units[n]  # EMA and first learnable copy: block n
        assert isinstance(aux.head.block, type(net.units[n + 1]))  # second learnable block: a copy of n + 1
        assert aux.head.block is not net.units[n + 1]
        for p, q in zip(aux.head.block.parameters(), net.units[n + 1].parameters()):
            assert torch.equal(p, q) and p.data_ptr() != q.data_ptr()
    with pytest.raises(ManppError, match="but this backbone gives vit ones: use objective 'dgl'"):
        manpp.local_model(net, method="manpp", k=4, objective="infopro")


def test_imagenet_heads_reproduce_the_release_shapes():
    conv_widths = lambda m: [c.out_channels for c in m.modules() if isinstance(c, nn.Conv2d)]
    kernels = lambda m: [c.kernel_size[0] for c in m.modules() if isinstance(c, nn.Conv2d)]
    d512, d1024 = ImageNetDecoder(512, 28, 224), ImageNetDecoder(1024, 14, 224)
    assert conv_widths(d512) == [128, 32, 12, 3] and kernels(d512) == [1, 3, 3, 3]
    assert conv_widths(d1024) == [192, 64, 32, 12, 3] and kernels(d1024) == [1, 1, 3, 3, 3]
    c512, c1024 = ImageNetAuxClassifier(512, 1000), ImageNetAuxClassifier(1024, 7)
    assert conv_widths(c512) == [128, 256, 512, 2048] and conv_widths(c1024) == [256, 256, 512, 2048]
    assert c1024.fc.out_features == 7
    # any input size: a 64 px image with 8 px features
    image = torch.rand(2, 3, 64, 64)
    loss = ImageNetDecoder(512, 8, 64)(torch.randn(2, 512, 8, 8), image)
    logits_loss = ImageNetAuxClassifier(512, 7)(torch.randn(2, 512, 8, 8), torch.tensor([1, 6]))
    assert loss.ndim == 0 and torch.isfinite(loss) and torch.isfinite(logits_loss)


@pytest.mark.parametrize("arch,size,objective", [("resnet18", 32, "infopro"), ("vit_tiny", 32, "dgl")])
def test_gradient_isolation_on_imagenet_backbones(arch, size, objective):
    torch.manual_seed(0)
    net = manpp.build_backbone(arch, num_classes=5, image_size=size)
    a = manpp.local_model(net, method="manpp", k=4, objective=objective, image_size=size)
    b = copy.deepcopy(a)
    with torch.no_grad():
        for i in b.partition.units_of(3):
            for p in b.backbone.units[i].parameters():
                p.add_(torch.randn_like(p))
        b.backbone.head.fc.weight.add_(torch.randn_like(b.backbone.head.fc.weight))  # torchvision's ViT head starts at 0
    x, y = torch.randn(4, 3, size, size), torch.randint(0, 5, (4,))
    ra, rb = a.train_step(x, y), b.train_step(x, y)
    assert not torch.equal(ra.losses[3], rb.losses[3])
    for j in range(3):
        assert torch.equal(ra.losses[j], rb.losses[j])
        for i in a.partition.units_of(j):
            for p, q in zip(a.backbone.units[i].parameters(), b.backbone.units[i].parameters()):
                assert p.grad is not None and torch.equal(p.grad, q.grad)


@pytest.mark.parametrize("arch,size", [("resnext50_32x4d", 32), ("vit_small", 32)])
def test_export_loads_into_the_plain_torchvision_model(arch, size):
    torch.manual_seed(0)
    net = manpp.build_backbone(arch, num_classes=7, image_size=size)
    model = manpp.local_model(net, method="manpp", k=2, objective="dgl", image_size=size)
    opt = torch.optim.SGD(model.parameters_to_optimize(), lr=0.05)
    x, y = torch.randn(4, 3, size, size), torch.randint(0, 7, (4,))
    model.train_step(x, y)
    opt.step()
    plain = net.plain_model()  # a fresh torchvision model, load_state_dict(strict=True) inside
    assert type(plain).__module__.startswith("torchvision.models")
    net.eval()
    plain.eval()
    assert torch.allclose(plain(x), net(x), atol=1e-5)
    # and back: weights saved from the plain model load into the backbone
    other = manpp.build_backbone(arch, num_classes=7, image_size=size)
    other.load_plain_state_dict(plain.state_dict())
    assert all(torch.equal(p, q) for p, q in zip(other.state_dict().values(), net.state_dict().values()))


def test_cifar_names_stay_cifar_and_torchvision_names_are_imagenet():
    assert type(manpp.build_backbone("resnet32")).__name__ == "CifarResNet"
    resnet50 = manpp.build_backbone("resnet50")  # torchvision's, cut by the cutter manpp.wrap uses
    assert type(resnet50).__name__ == "WrappedBackbone" and (resnet50.arch, resnet50.aux_family) == ("resnet50",
                                                                                                  "imagenet")
    cifar50 = manpp.build_backbone("cifar_resnet50")
    assert type(cifar50).__name__ == "CifarResNet" and len(cifar50.units) == 25
    with pytest.raises(ManppError, match="paper preset"):
        manpp.make_partition(cifar50, 4, "paper")  # the ImageNet ResNet-50 presets do not apply
    with pytest.raises(ManppError, match="divisible by its patch size"):
        manpp.build_backbone("vit_tiny", image_size=40)


def make_folder(root: Path, classes=("ant", "bee", "cow"), n_train=4, n_val=2, size=(40, 48)):
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    for split, n in (("train", n_train), ("val", n_val)):
        for c in classes:
            (root / split / c).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                pixels = torch.randint(0, 256, (*size, 3), generator=g, dtype=torch.uint8).numpy()
                Image.fromarray(pixels).save(root / split / c / f"{i}.png")
    return root


def test_imagenet_folder_reads_any_class_count_at_any_size(tmp_path):
    from manpp.data import build_datasets

    root = make_folder(tmp_path / "in", classes=("a", "b", "c", "d", "e"))
    train, test, info = build_datasets("imagenet", root, image_size=48)
    assert info.num_classes == 5 and info.image_size == 48 and len(train) == 20 and len(test) == 10
    x, y = train[0]
    assert x.shape == (3, 48, 48) and x.dtype == torch.float32 and 0 <= y < 5
    assert test[3][0].shape == (3, 48, 48)


def test_imagenet_folder_errors_name_the_layout(tmp_path):
    from manpp.data import build_datasets

    root = make_folder(tmp_path / "in")
    (root / "val" / "cow").rename(root / "val" / "cat")
    with pytest.raises(ManppError, match="class folders of train/ and val/ differ"):
        build_datasets("imagenet", root)
    (root / "val" / "cat").rename(root / "val" / "cow")
    (root / "val" / "empty").mkdir()
    (root / "train" / "empty").mkdir()
    with pytest.raises(ManppError, match="every class folder needs images"):
        build_datasets("imagenet", root)
    with pytest.raises(ManppError, match="must hold train/<class>/<image> and val/<class>/<image>"):
        build_datasets("imagenet", tmp_path)
    with pytest.raises(ManppError, match="fixed image size"):
        build_datasets("cifar10", tmp_path, image_size=64)


IMAGENET_CONFIGS = sorted(ROOT.glob("src/manpp/configs/imagenet_*.yaml"))


@pytest.mark.parametrize("path", IMAGENET_CONFIGS, ids=lambda p: p.stem)
def test_imagenet_paper_configs_load_and_cut(path):
    cfg = C.from_dict(C.load_yaml(path))
    assert cfg.dataset == "imagenet" and cfg.split == "paper" and cfg.epochs == 90 and cfg.batch_size == 1024
    assert cfg.image_size == 224 and cfg.warmup_epochs == 0
    vit = cfg.model.startswith("vit_")
    assert (cfg.optimizer, cfg.lr) == (("adamw", 1e-3) if vit else ("sgd", 0.4))
    # checked at the partition level: the backbone alone (at 32 px; the cut does not depend on the size)
    net = manpp.build_backbone(cfg.model, num_classes=10, image_size=32)
    assert manpp.make_partition(net, cfg.k, cfg.split).k == cfg.k
    if not vit:  # the release's constant ImageNet weights (one full build checks them: see below)
        settings = cfg.objective_settings
        assert (settings["ixx_1"], settings["ixy_1"], settings["lambda_schedule"]) == (5.0, 0.75, "constant")


def test_an_imagenet_paper_config_builds_the_release_heads():
    from manpp.train.build import build_model
    from manpp.data import dataset_info

    cfg = C.from_dict(C.load_yaml(ROOT / "src/manpp/configs/imagenet_resnet101_k4_infopro_manpp.yaml"))
    model = build_model(C.apply(cfg, {"image_size": 32}), dataset_info("imagenet", image_size=32))
    assert model.k == cfg.k and len(model.aux) == cfg.k - 1
    assert all(isinstance(a, MomentumAux) for a in model.aux)
    assert all((a.head.lambda1, a.head.lambda2) == (5.0, 0.75) for a in model.aux)


@pytest.mark.slow
def test_a_paper_config_trains_and_exports_from_an_imagenet_folder(tmp_path):
    root = make_folder(tmp_path / "in", n_train=2, n_val=1)
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "manpp", "train", "-c", str(ROOT / "src/manpp/configs/imagenet_resnet101_k4_infopro_manpp.yaml"),
           "--data-dir", str(root), "--image-size", "64", "--batch-size", "2", "--max-steps", "2",
           "--device", "cpu", "--out", str(out), "--quiet", "eval_batch_size=3", "workers=0",
           "lr=0.01"]  # the paper's 0.4 is for batch 1024, and at 32 px layer4 is 1x1: either diverges
           # at batch 2 (the test loss is not finite, and the run says so)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "4 module" in (out / "summary.json").read_text() or '"modules": 4' in (out / "summary.json").read_text()
    proc = subprocess.run([sys.executable, "-m", "manpp", "export", str(out), "--out", str(tmp_path / "r101.pt"),
                           "--allow-unfinished"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    import torchvision

    plain = torchvision.models.resnet101(num_classes=3)
    plain.load_state_dict(torch.load(tmp_path / "r101.pt"))  # strict
    ckpt = torch.load(out / "checkpoint.pt", weights_only=False)
    assert torch.equal(plain.layer3[9].conv2.weight, ckpt["model"]["backbone.units.17.conv2.weight"])
    assert not any(k.startswith(("aux", "ema", "lb")) for k in torch.load(tmp_path / "r101.pt"))


def test_describe_and_bench_work_for_imagenet_backbones():
    from manpp.commands.cli import main

    assert main(["describe", "--model", "vit_tiny", "--method", "manpp", "--objective", "dgl", "--k", "4",
                 "--split", "paper", "--dataset", "imagenet", "--image-size", "32", "--batch-size", "2",
                 "--device", "cpu"]) == 0
    assert main(["bench", "--model", "resnet18", "--methods", "e2e,manpp", "--k", "4", "--dataset", "imagenet",
                 "--image-size", "32", "--batch-size", "2", "--steps", "1", "--warmup", "0", "--device", "cpu"]) == 0
