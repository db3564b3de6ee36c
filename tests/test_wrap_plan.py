"""manpp.wrap on torchvision classifiers, memory-balanced splits and the memory planner."""

import copy
import itertools
import json
import random

import pytest
import torch
import torchvision
from torch import nn

import manpp
from manpp.cli import main
from manpp.errors import ManppError
from manpp.memory import measure_step
from manpp.plan import balanced_ends, parse_bytes, unit_activation_bytes


def _vit():
    return torchvision.models.vision_transformer.VisionTransformer(32, 16, 4, 2, 32, 64, num_classes=10)


MODELS = {
    "resnet18": lambda: torchvision.models.resnet18(num_classes=10),
    "vgg11": lambda: torchvision.models.vgg11(num_classes=10),
    "mobilenet_v2": lambda: torchvision.models.mobilenet_v2(num_classes=10),
    "convnext_tiny": lambda: torchvision.models.convnext_tiny(num_classes=10),
    "vit": _vit,
}


@pytest.mark.parametrize("name", list(MODELS))
def test_wrap_cuts_torchvision_models_and_trains_them(name):
    torch.manual_seed(0)
    model = MODELS[name]()
    local = manpp.wrap(model, k=3, method="manpp", objective="dgl", image_size=32)
    assert local.k == 3 and len(local.backbone.units) >= 3
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([1, 2])
    model.eval()
    local.eval()
    with torch.no_grad():
        assert torch.allclose(local(x), model(x), atol=1e-5)  # the same network, cut into units
    local.train()
    before = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.SGD(local.parameters_to_optimize(), lr=0.1)
    result = local.train_step(x, y)
    opt.step()
    assert len(result.losses) == 3 and all(torch.isfinite(v) for v in result.losses)
    changed = sum(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert changed > len(before) // 2  # the user's model itself was trained


def test_wrapped_modules_are_gradient_isolated():
    torch.manual_seed(0)
    a = manpp.wrap(torchvision.models.resnet18(num_classes=10), k=3, image_size=32)
    b = copy.deepcopy(a)
    with torch.no_grad():
        for p in b.backbone.head.parameters():
            p.mul_(3.0)
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    a.train_step(x, y)
    b.train_step(x, y)
    for i in a.partition.units_of(0):
        for pa, pb in zip(a.backbone.units[i].parameters(), b.backbone.units[i].parameters()):
            assert torch.equal(pa.grad, pb.grad)


def test_wrap_names_what_it_cannot_cut():
    with pytest.raises(ManppError, match="cannot cut Sequential into units: none of its modules \\(0, 1\\)"):
        manpp.wrap(nn.Sequential(nn.Flatten(), nn.Linear(4, 2)), k=2)
    with pytest.raises(ManppError, match="channels-last"):
        manpp.wrap(torchvision.models.swin_t(num_classes=10), k=2)


def test_balanced_ends_is_the_best_contiguous_split():
    assert balanced_ends([1, 1, 1, 10, 1, 1], 2) == [2]
    assert balanced_ends([1, 1, 1, 10, 1, 1], 3) == [2, 3]
    assert balanced_ends([5, 5, 5, 5], 4) == [0, 1, 2]
    rng = random.Random(0)
    for _ in range(20):
        costs = [rng.randint(1, 20) for _ in range(7)]
        for k in (2, 3, 4):
            def worst(ends):
                bounds = [0, *[e + 1 for e in ends], len(costs)]
                return max(sum(costs[a:b]) for a, b in zip(bounds, bounds[1:]))
            best = min(worst(list(c)) for c in itertools.combinations(range(len(costs) - 1), k - 1))
            assert worst(balanced_ends(costs, k)) == best
    with pytest.raises(ManppError, match="K=9 is not possible for 6 units"):
        balanced_ends([1] * 6, 9)


def test_unit_bytes_add_up_to_the_end_to_end_graph():
    torch.manual_seed(0)
    net = manpp.build_backbone("resnet20")
    per_unit = unit_activation_bytes(net, 8, 3, 32)
    assert len(per_unit) == len(net.units) and all(b > 0 for b in per_unit)
    e2e = manpp.local_model(net, "e2e")
    peak = measure_step(e2e, torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))).peak_activation_bytes
    assert sum(per_unit) <= peak <= 1.05 * sum(per_unit)


def test_memory_split_balances_better_than_even():
    torch.manual_seed(0)
    net = manpp.build_backbone("resnet20")
    per_unit = unit_activation_bytes(net, 4, 3, 32)  # early units are 4x larger than late ones

    def largest(part):
        return max(sum(per_unit[i] for i in part.units_of(j)) for j in range(part.k))

    memory = manpp.make_partition(net, 3, balanced_ends(per_unit, 3))
    even = manpp.make_partition(net, 3, "even")
    assert largest(memory) < largest(even)


def test_parse_bytes():
    assert parse_bytes("8GB") == 8 * 2**30 and parse_bytes("512 MiB") == 512 * 2**20 and parse_bytes(1024) == 1024
    for bad in ("eight GB", "8 parsecs", "-1GB", "0"):
        with pytest.raises(ManppError):
            parse_bytes(bad)


def test_plan_command_finds_the_smallest_k_or_says_none_fits(capsys):
    common = ["plan", "--model", "resnet20", "--dataset", "cifar10", "--method", "dgl", "--batch-size", "32",
              "--device", "cpu", "--max-k", "2"]
    assert main(common + ["--budget", "1MB", "--json"]) == 1  # nothing fits 1 MiB
    rows = json.loads(capsys.readouterr().out)["rows"]
    assert [r["k"] for r in rows] == [1, 2] and rows[1]["total_bytes"] < rows[0]["total_bytes"]
    assert rows[1]["peak_activation_bytes"] < rows[0]["peak_activation_bytes"]
    assert main(common + ["--budget", str(rows[1]["total_bytes"]), "--json"]) == 0  # K=2 fits exactly, K=1 not
    chosen = json.loads(capsys.readouterr().out)["chosen"]
    assert chosen["k"] == 2 and chosen["total_bytes"] == rows[1]["total_bytes"]
    assert main(common + ["--budget", "1GB"]) == 0
    out = capsys.readouterr().out
    assert "smallest K that fits: K=1" in out
