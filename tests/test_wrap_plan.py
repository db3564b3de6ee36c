"""Memory-balanced splits and the memory planner (manpp.wrap's own tests are in test_wrap.py)."""

import itertools
import json
import random

import pytest
import torch

import manpp
from manpp.config import trainconfig as C
from manpp.commands.cli import main
from manpp.base.errors import ManppError
from manpp.memory.measure import measure_step
from manpp.core.partition import balanced_ends, unit_activation_bytes
from manpp.commands.plan import parse_bytes, rank


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


@pytest.mark.slow  # 11 s: a real plan over every strategy
def test_plan_estimates_every_strategy_ranks_them_and_says_when_checkpointing_alone_wins(capsys, tmp_path):
    result_file = tmp_path / "accuracy.json"  # an accuracy benchmark's result: E2E and DGL at K=2 (a CIFAR ResNet)
    result_file.write_text(json.dumps({"setup": {"dataset": "fashion-mnist", "model": "resnet32", "steps": 5000},
                                       "runs": [{"method": "e2e", "k": 1, "fidelity": "ours", "test_accuracy": a}
                                                for a in (0.90, 0.92)]
                                       + [{"method": "dgl", "k": 2, "fidelity": "ours", "test_accuracy": a}
                                          for a in (0.88, 0.89)]}))
    common = ["plan", "--model", "resnet8", "--dataset", "cifar10", "--method", "dgl", "--batch-size", "16",
              "--device", "cpu", "--max-k", "2", "--rounds", "1", "--accuracy", str(result_file)]
    assert main(common + ["--budget", "1KB", "--json"]) == 1  # nothing fits 1 KiB
    measured = json.loads(capsys.readouterr().out)
    rows = {r["label"]: r for r in measured["strategies"]}
    assert measured["chosen"] is None and "nothing fits" in measured["advice"]
    # E2E and DGL at K=2 (max-k), each plain, checkpointed two ways, bf16, and both
    assert len(rows) == 24 and {r["k"] for r in rows.values()} == {1, 2}
    assert rows["E2E"]["gradients"] == "exact" and rows["dgl K=2"]["gradients"] == "local"
    assert rows["E2E + ckpt(units) + bf16"]["gradients"] == "exact, bf16-rounded"
    assert rows["E2E + ckpt(units)"]["peak_activation_bytes"] < rows["E2E"]["peak_activation_bytes"]
    assert rows["dgl K=2"]["peak_activation_bytes"] < rows["E2E"]["peak_activation_bytes"]
    assert rows["dgl K=2"]["state_bytes"] > rows["E2E"]["state_bytes"]  # the auxiliary networks' weights
    assert all(r["total_bytes"] == r["step_peak_bytes"] + r["state_bytes"] for r in rows.values())
    assert all(r["step_peak_bytes"] >= r["peak_activation_bytes"] for r in rows.values())  # gradients on top
    # stepping inside the backward frees each module's gradients before the next module runs: never more memory
    for label, r in rows.items():
        if r["early_step"]:
            twin = rows[label.removesuffix(" + early step")]
            assert r["peak_activation_bytes"] == twin["peak_activation_bytes"]
            assert r["total_bytes"] <= twin["total_bytes"] and r["settings"].endswith("step_in_backward=true")
    cost = rows["dgl K=2"]["accuracy_cost"]  # measured at this K on a network of this family (a CIFAR ResNet)
    assert cost["k"] == 2 and cost["points"] == pytest.approx(2.5) and cost["seeds"] == 2
    assert rows["E2E"]["accuracy_cost"] is None
    assert rows["dgl K=2 + ckpt(sqrt)"]["settings"] == "method=dgl k=2 split=memory checkpointing=sqrt"

    # the ranking for any budget, from the same measurements
    strategies = measured["strategies"]
    budget = sorted(r["total_bytes"] for r in strategies)[5]
    plan = rank(strategies, budget, {})
    fitting = [r for r in plan["strategies"] if r["fits"]]
    assert [r["label"] for r in fitting] == [r["label"] for r in sorted(
        (r for r in strategies if r["total_bytes"] <= budget), key=lambda r: (r["step_time_s"], r["total_bytes"]))]
    assert plan["strategies"][len(fitting):] == sorted(plan["strategies"][len(fitting):],
                                                       key=lambda r: (r["total_bytes"], r["step_time_s"]))
    assert plan["chosen"] == fitting[0]
    assert plan["fastest_exact"] == next((r for r in fitting if r["gradients"].startswith("exact")), None)

    # honesty: when an exact strategy fits and is the fastest, the plan says local learning buys nothing
    fast = dict(rows["E2E + ckpt(units)"], step_time_s=0.1)
    slow = dict(rows["dgl K=2 + ckpt(units)"], step_time_s=0.3)
    plan = rank([fast, slow], 10**12, {})
    assert plan["chosen"]["label"] == "E2E + ckpt(units)"
    assert "local learning buys nothing" in plan["advice"] and "3.00x" in plan["advice"]
    plan = rank([dict(fast, step_time_s=0.6), slow], 10**12, {})
    assert plan["chosen"]["label"] == "dgl K=2 + ckpt(units)" and "2.00x the speed" in plan["advice"]
    assert "accuracy -2.50 points vs E2E (fashion-mnist, resnet32, K=2, 2 seed(s), 5000 steps)" in plan["advice"]
    plan = rank([dict(fast, total_bytes=10**13), slow], 10**12, {})
    assert "no strategy with E2E's gradients fits" in plan["advice"]
    # a time difference smaller than what the measurement can tell apart decides nothing: the smaller one wins
    a = dict(fast, step_time_s=0.100, times_s=[0.09, 0.11], time_source="measured", total_bytes=900)
    b = dict(slow, step_time_s=0.105, times_s=[0.10, 0.12], time_source="measured", total_bytes=500)
    plan = rank([a, b], 10**12, {})
    assert plan["chosen"]["label"] == b["label"] and a["label"] in plan["tied"]
    plan = rank([a, dict(b, step_time_s=0.2, times_s=[0.2, 0.2])], 10**12, {})
    assert plan["chosen"]["label"] == a["label"] and not plan["tied"]  # 0.1 s apart, spreads of 0.02: not a tie
    # nothing fits: the advice names what dominates
    huge_state = rank([dict(slow, state_bytes=10**9, total_bytes=2 * 10**9)], 10**8, {})["advice"]
    assert "parameters and optimizer state alone" in huge_state and "smaller batch cannot help" in huge_state
    activations = rank([dict(slow, state_bytes=10**6, step_peak_bytes=10**9, total_bytes=10**9 + 10**6)], 10**8, {})
    assert "mostly activations and gradients" in activations["advice"] and "lower the batch" in activations["advice"]

    assert main(common + ["--budget", "1GB"]) == 0  # everything fits: the text table
    out = capsys.readouterr().out
    assert "train it with: method=" in out and "-2.50 points vs E2E" in out and out.count("\nok ") == 24


def test_plan_refuses_bad_input_in_one_line(tmp_path, capsys):
    (tmp_path / "bad.json").write_text("{}")
    common = ["plan", "--model", "resnet8", "--dataset", "cifar10", "--device", "cpu", "--budget", "1GB"]
    for extra, words in ((["--max-k", "0"], "--max-k must be at least 1, got 0"),
                         (["--rounds", "0"], "--rounds must be at least 1, got 0"),
                         (["--accuracy", str(tmp_path / "none.json")], "no accuracy result at"),
                         (["--accuracy", str(tmp_path / "bad.json")], "not a result of benchmarks/accuracy.py")):
        assert main(common + extra) == 2
        err = capsys.readouterr().err
        assert words in err and err.count("\n") == 1


def test_the_accuracy_cost_compares_with_e2e_on_the_same_seeds():
    from manpp.commands.accuracycost import accuracy_cost, describe_cost

    def run(method, seed, acc, k=16):
        return {"method": method, "k": k, "seed": seed, "fidelity": "ours", "test_accuracy": acc, "steps": 626}

    # E2E has seeds 0 and 1 (90% and 80%), DGL only seed 0: its cost is against E2E's seed 0, not the mean
    doc = {"setup": {"dataset": "fashion-mnist", "model": "resnet32"},
           "runs": [run("e2e", 0, 0.90, k=1), run("e2e", 1, 0.80, k=1), run("dgl", 0, 0.87),
                    run("dgl", 0, 0.70, k=4) | {"fidelity": "release"}, run("dgl@scale_init=2", 0, 0.10)]}
    cost = accuracy_cost(doc, "dgl", None, None, 16)
    assert cost["points"] == pytest.approx(3.0) and cost["seeds"] == 1 and cost["k"] == 16
    assert "accuracy -3.00 points vs E2E (fashion-mnist, resnet32, K=16, 1 seed(s), 626 steps)" == describe_cost(cost)
    doc["runs"].append(run("dgl", 1, 0.79))
    assert accuracy_cost(doc, "dgl", None, None, 16)["points"] == pytest.approx(2.0)  # (3 + 1) / 2
    assert accuracy_cost(doc, "infopro", None, None, 16) is None and describe_cost(None) == "accuracy cost not measured"


def test_the_accuracy_cost_of_manpp_is_read_at_its_own_aux_lr_scale():
    """MAN++'s default aux_lr_scale is 2: its cost comes from the run labelled @aux_lr_scale=2 (the
    plain label is the benchmark's run at 1), never from a variant that changes something else too."""
    from manpp.config import trainconfig as C
    from manpp.commands.accuracycost import accuracy_cost, describe_cost
    from manpp.config.resolve import resolve

    def run(method, acc, k=16):
        return {"method": method, "k": k, "seed": 0, "fidelity": "ours", "test_accuracy": acc, "steps": 626}

    doc = {"setup": {"dataset": "fashion-mnist", "model": "resnet32"},
           "runs": [run("e2e", 0.90, k=1), run("manpp:infopro", 0.84), run("manpp:infopro@aux_lr_scale=2", 0.86),
                    run("manpp:infopro@aux_lr_scale=2+scale_init=0.5", 0.50), run("manpp:infopro@aux_lr_scale=x", 0.5)]}
    scale = resolve(C.apply(C.TrainConfig(), {"model": "resnet32", "dataset": "digits", "method": "manpp"})).aux_lr_scale
    cost = accuracy_cost(doc, "manpp", "infopro", "infopro", 16, scale)
    assert scale == 2.0 and cost["points"] == pytest.approx(4.0) and cost["accuracy"] == pytest.approx(0.86)
    assert "K=16, aux_lr_scale=2, 1 seed(s)" in describe_cost(cost)
    assert accuracy_cost(doc, "manpp", "infopro", "infopro", 16, 1.0)["points"] == pytest.approx(6.0)
    assert accuracy_cost(doc, "manpp", "infopro", "infopro", 16, 3.0) is None  # not measured at 3


def test_an_accuracy_cost_is_shown_only_for_the_k_and_family_it_was_measured_on():
    from manpp.commands.accuracycost import accuracy_cost, describe_cost
    from manpp.commands.plan import measure_command

    doc = {"setup": {"dataset": "fashion-mnist", "model": "resnet32"}, "path": "x.json",
           "runs": [{"method": m, "k": k, "seed": s, "fidelity": "ours", "test_accuracy": a}
                    for m, k, a in (("e2e", 1, 0.9), ("dgl", 16, 0.87)) for s in (0, 1)]}
    assert accuracy_cost(doc, "dgl", None, None, 16, family="cifar")["points"] == pytest.approx(3.0)
    assert accuracy_cost(doc, "dgl", None, None, 8, family="cifar") is None  # another K: not carried over
    assert accuracy_cost(doc, "dgl", None, None, 16, family="imagenet") is None  # another kind of network
    cfg = C.apply(C.TrainConfig(), {"model": "resnet18", "dataset": "folder", "data_dir": "imgs"})
    how = measure_command(cfg, {"method": "manpp", "objective": "infopro", "k": 4})
    assert how.startswith("python benchmarks/accuracy.py --model resnet18 --dataset folder --data-dir imgs --ks 4 "
                          "--methods e2e,manpp:infopro")
    assert describe_cost(None, how) == f"accuracy cost not measured (measure it: {how})"
