"""Memory-balanced splits and the memory planner (manpp.wrap's own tests are in test_wrap.py)."""

import itertools
import json
import random

import pytest
import torch

import manpp
from manpp.cli import main
from manpp.errors import ManppError
from manpp.memory import measure_step
from manpp.partition import balanced_ends, unit_activation_bytes
from manpp.plan import parse_bytes


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
    e2e = manpp.local_model(net, method="e2e")
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
