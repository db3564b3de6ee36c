"""Dense tasks: RetinaNet detection and DeepLabV3 segmentation as local modules, their metrics."""

import copy
import json

import pytest
import torch

import manpp
from manpp.config import trainconfig as C
from manpp.commands.cli import main
from manpp.data import ShapesDetection, dataset_info
from manpp.base.errors import ManppError
from manpp.models import build_backbone
from manpp.tasks import coco_map, confusion_matrix, segmentation_metrics, task_of

CPU = torch.device("cpu")
SIZE = {"retinanet_resnet18": 64, "deeplabv3_resnet50": 32}  # small and fast on a CPU


def local(name, method="manpp", k=4, split="paper"):
    torch.manual_seed(0)
    task = "detection" if name.startswith("retinanet") else "segmentation"
    info = dataset_info("shapes", SIZE[name], task=task)
    net = build_backbone(name, num_classes=info.num_classes, image_size=info.image_size)
    model = manpp.local_model(net, method=method, k=k, split=split if k > 1 else "even", objective="dgl",
                              image_size=info.image_size, num_classes=info.num_classes)
    return model, task_of(net).example_batch(2, info, CPU)


def test_paper_cuts_of_the_dense_models():
    for name, ends in [("retinanet_resnet50", ["stem..layer1.2", "layer2.0..layer2.3", "layer3.0..layer3.5",
                                               "layer4.0..layer4.2"]),
                       ("retinanet_resnet101", ["stem..layer1.2", "layer2.0..layer2.3", "layer3.0..layer3.22",
                                                "layer4.0..layer4.2"]),
                       ("deeplabv3_resnet50", ["stem..layer1.2", "layer2.0..layer2.3", "layer3.0..layer3.5",
                                               "layer4.0..layer4.2"])]:
        net = build_backbone(name, num_classes=3, image_size=64)
        part = manpp.core.partition.make_partition(net, 4, "paper")
        assert part.describe(net.unit_names) == ends
    with pytest.raises(ManppError, match="no paper preset"):
        manpp.core.partition.make_partition(build_backbone("retinanet_resnet50", num_classes=3, image_size=64), 3, "paper")


def _grads(model, j):
    return [p.grad.clone() if p.grad is not None else None
            for i in model.partition.units_of(j) for p in model.backbone.units[i].parameters()]


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n.startswith("deeplab") else n
                                  for n in SIZE])
def test_dense_modules_are_gradient_isolated(name):
    """Changing the last module (layer4 + FPN/ASPP + heads) leaves the first three modules' gradients
    unchanged: C3 and C4 reach the FPN detached, as in the release."""
    a, (x, y) = local(name)
    b = copy.deepcopy(a)
    with torch.no_grad():
        for p in b.backbone.head.parameters():
            p.add_(0.05 * torch.randn_like(p))
        for i in b.partition.units_of(3):
            for p in b.backbone.units[i].parameters():
                p.mul_(1.5)
    a.train_step(x, y)
    b.train_step(x, y)
    for j in range(3):
        assert all(g is not None for g in _grads(a, j)), f"module {j} got no gradient from its auxiliary head"
        for ga, gb in zip(_grads(a, j), _grads(b, j)):
            assert torch.equal(ga, gb), f"module {j} changed with the last module"
    assert any(not torch.equal(ga, gb) for ga, gb in zip(_grads(a, 3), _grads(b, 3)))


def test_end_to_end_detection_trains_layer2_through_the_fpn():
    model, (x, y) = local("retinanet_resnet18", "e2e", 1)
    result = model.train_step(x, y)
    assert len(result.losses) == 1 and torch.isfinite(result.losses[0])
    layer2 = [p.grad for i, n in enumerate(model.backbone.unit_names) if n.startswith("layer2")
              for p in model.backbone.units[i].parameters()]
    assert all(g is not None and g.abs().sum() > 0 for g in layer2)


def test_exports_load_into_the_torchvision_models():
    torch.manual_seed(0)
    seg = build_backbone("deeplabv3_resnet50", num_classes=4).eval()
    plain = seg.plain_model().eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(seg(x), plain(x)["out"], atol=1e-5)
    det = build_backbone("retinanet_resnet18", num_classes=3, image_size=64).eval()
    plain = det.plain_model().eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        ours = det(x)
        features = list(plain.backbone(x).values())
        head = plain.head(features)
    assert len(features) == len(ours["features"]) == 5
    for f, g in zip(features, ours["features"]):
        assert torch.allclose(f, g, atol=1e-5)
    assert torch.allclose(head["cls_logits"], ours["cls_logits"], atol=1e-5)


def test_miou_on_known_masks():
    target = torch.tensor([[0, 0, 1, 1], [0, 0, 1, 255], [2, 2, 2, 2]])
    pred = torch.tensor([[0, 1, 1, 1], [0, 0, 1, 0], [2, 2, 0, 0]])
    m = confusion_matrix(pred, target, 3)
    assert m.sum() == 11  # the ignored pixel is left out
    out = segmentation_metrics(m)
    # class 0: tp 3, fp 2, fn 1 -> 3/6; class 1: tp 3, fp 1, fn 0 -> 3/4; class 2: tp 2, fn 2 -> 2/4
    assert out["iou_0"] == pytest.approx(0.5) and out["iou_1"] == pytest.approx(0.75) and out["iou_2"] == 0.5
    assert out["miou"] == pytest.approx((0.5 + 0.75 + 0.5) / 3)
    assert out["pixel_accuracy"] == pytest.approx(8 / 11)


def test_pixel_loss_ignores_255_and_stays_finite_when_everything_is_ignored():
    from manpp.tasks import pixel_cross_entropy

    logits = torch.randn(2, 3, 4, 4, requires_grad=True)
    target = torch.randint(0, 3, (2, 4, 4))
    target[0, :2] = 255
    expected = torch.nn.functional.cross_entropy(logits, target, ignore_index=255)
    assert torch.allclose(pixel_cross_entropy(logits, target), expected)
    empty = pixel_cross_entropy(logits, torch.full((2, 4, 4), 255))
    assert empty.item() == 0.0
    empty.backward()  # a crop of ignored pixels only gives no gradient, not NaN
    assert torch.isfinite(logits.grad).all()


def test_coco_ap_of_perfect_shifted_and_no_detections():
    data = ShapesDetection(6, image_size=64, seed=1)
    gt = data.coco_ground_truth()
    perfect = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0}
               for a in gt["annotations"]]
    assert coco_map(gt, perfect)["map"] == pytest.approx(1.0)
    assert coco_map(gt, perfect, image_ids=[0, 1])["map"] == pytest.approx(1.0)  # a shard of the images
    shifted = [dict(r, bbox=[r["bbox"][0] + r["bbox"][2] / 2, r["bbox"][1], r["bbox"][2], r["bbox"][3]])
               for r in perfect]
    assert coco_map(gt, shifted)["map"] < 0.2
    assert coco_map(gt, [])["map"] == 0.0


@pytest.mark.parametrize("model,metric", [("retinanet_resnet18", "map"),
                                          pytest.param("deeplabv3_resnet50", "miou", marks=pytest.mark.slow)])
def test_train_command_on_shapes(tmp_path, model, metric, capsys):
    out = tmp_path / "run"
    code = main(["train", "--model", model, "--dataset", "shapes", "--method", "manpp", "--objective", "dgl",
                 "--k", "4", "--split", "paper", "--epochs", "1", "--max-steps", "2", "--batch-size", "2",
                 "--device", "cpu", "--out", str(out), "--quiet", f"image_size={SIZE[model]}", "test_subset=4",
                 "eval_batch_size=4", "grad_clip=1.0"])
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["metric"] == metric and 0.0 <= summary["test_score"] <= 1.0
    assert metric in summary["test_metrics"] and summary["modules"] == 4
    assert (f"test {'AP' if metric == 'map' else 'mIoU'}") in capsys.readouterr().out
    exported = tmp_path / "plain.pt"
    assert main(["export", str(out), "--out", str(exported), "--allow-unfinished"]) == 0  # stopped by max_steps
    state = torch.load(exported, weights_only=True)
    assert not any("aux" in k for k in state)


@pytest.mark.slow
def test_bench_shows_lower_memory_for_k4_on_both_tasks():
    from manpp.commands.bench import bench

    for model, size in SIZE.items():
        cfg = C.apply(C.TrainConfig(), {"model": model, "dataset": "shapes", "image_size": size, "k": 4,
                                        "split": "paper", "objective": "dgl", "batch_size": 2, "device": "cpu"})
        records = bench(cfg, ["e2e", "manpp"], steps=1, warmup=0)
        assert records[1]["modules"] == 4
        assert records[1]["peak_activation_bytes"] < records[0]["peak_activation_bytes"], model


def test_pretrained_resnet_weights_load_into_dense_backbones(tmp_path):
    import torchvision

    from manpp.models.imagenet import load_resnet_weights

    plain = torchvision.models.resnet50(weights=None)
    for name in ("retinanet_resnet50", "deeplabv3_resnet50"):
        net = build_backbone(name, num_classes=3, image_size=64)
        assert load_resnet_weights(net, plain.state_dict()) == len(plain.state_dict()) - 2  # all but fc
        unit = net.unit_names.index("layer3.1")
        block = getattr(net.units[unit], "block", net.units[unit])
        assert torch.equal(block.conv2.weight, plain.layer3[1].conv2.weight)
    with pytest.raises(ManppError, match="tensors missing"):
        load_resnet_weights(build_backbone("retinanet_resnet101", num_classes=3, image_size=64), plain.state_dict())


def test_dense_bad_input():
    with pytest.raises(ManppError, match="use objective 'dgl'"):
        local_model = build_backbone("retinanet_resnet50", num_classes=3, image_size=64)
        manpp.local_model(local_model, method="manpp", k=4, split="paper", objective="infopro", image_size=64)
    with pytest.raises(ManppError, match="the model does segmentation"):
        dataset_info("cifar10", task="segmentation")
