"""Memory and FLOPs estimated on fake tensors (manpp.memory.estimate, manpp.commands.forecast) against the real step.

The estimate runs the step that ``measure_step`` measures with the same accounting, so on every case small
enough to run here the two must agree within 2 % of the total footprint (they agree to the byte on most):
E2E, DGL, InfoPro, MAN and MAN++ with ``recompute_ema='auto'`` (settled from two fake steps), checkpointing
both ways, bf16 saved activations, autocast, a ViT, a segmenter. A detector's anchor matching has output
shapes that depend on values: it is measured instead, and says so.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from manpp.config import trainconfig as C
from manpp.commands.cli import main
from manpp.memory.estimate import EstimateUnsupported, FlopCount, estimate_step, fake_batch, fake_model, new_mode
from manpp.commands.forecast import estimate, probe_rate, target_device
from manpp.memory.measure import measure_step
from manpp.config.resolve import data_info, resolve
from manpp.commands.strategies import ESTIMATED, MEASURED, Strategy, measure

CASES = [  # (overrides, strategies): every kind of part the real measurement covers
    ({"model": "resnet8", "dataset": "cifar10", "batch_size": 8, "method": "manpp"},
     [Strategy("e2e"), Strategy("e2e", 1, "units"), Strategy("manpp", 2), Strategy("manpp", 3, "sqrt", "bf16"),
      Strategy("dgl", 2, "units"), Strategy("infopro", 3, "off", "bf16")]),
    ({"model": "resnet8", "dataset": "cifar10", "batch_size": 8, "method": "man", "objective": "dgl",
      "recompute_ema": False}, [Strategy("man", 3), Strategy("man", 2, "units")]),
    ({"model": "vit_tiny", "dataset": "imagenet", "image_size": 32, "batch_size": 4, "method": "manpp"},
     [Strategy("e2e", 1, "sqrt"), Strategy("manpp", 4), Strategy("manpp", 4, "units", "bf16")]),
    pytest.param({"model": "resnet18", "dataset": "imagenet", "image_size": 64, "batch_size": 4, "method": "manpp",
                  "amp": "bf16"}, [Strategy("e2e"), Strategy("manpp", 4, "sqrt")], marks=pytest.mark.slow),
    pytest.param({"model": "deeplabv3_resnet50", "dataset": "shapes", "image_size": 64, "batch_size": 2,
                  "method": "manpp"}, [Strategy("manpp", 4)], marks=pytest.mark.slow),
]


def _cfg(overrides: dict) -> C.TrainConfig:
    return resolve(C.apply(C.TrainConfig(), {"device": "cpu", **overrides}))


def _id(case) -> str:
    overrides = case.values[0] if hasattr(case, "values") else case[0]
    return f"{overrides['model']}-{overrides['method']}"


@pytest.mark.parametrize("overrides,strategies", CASES, ids=[_id(c) for c in CASES])
def test_the_estimate_agrees_with_the_measurement_within_two_percent(overrides, strategies):
    cfg = _cfg(overrides)
    estimated, probe = estimate(cfg, strategies, progress=False, jobs=1, probe=False)
    measured = measure(cfg, strategies, rounds=0, warmup=0, progress=False)
    assert probe is None
    for e, m in zip(estimated, measured):
        assert e["label"] == m["label"] and e["memory_source"] == ESTIMATED and m["memory_source"] == MEASURED
        assert e["state_bytes"] == m["state_bytes"] and e["split"] == m["split"]  # the same model, the same split
        assert e["total_bytes"] == pytest.approx(m["total_bytes"], rel=0.02), e["label"]
        assert e["peak_activation_bytes"] == pytest.approx(m["peak_activation_bytes"], rel=0.02), e["label"]
        assert e["ema_recomputed"] == m["ema_recomputed"], e["label"]  # recompute_ema='auto' settled alike
        assert e["flops"] > 0 and e["step_time_s"] is None


def test_a_detector_is_measured_instead_and_says_why():
    cfg = _cfg({"model": "retinanet_resnet18", "dataset": "shapes", "image_size": 64, "batch_size": 2,
                "method": "dgl"})
    (record,), _ = estimate(cfg, [Strategy("dgl", 2)], progress=False, jobs=1, probe=False)
    assert record["memory_source"].startswith(f"{MEASURED}: the fake step cannot follow it")
    assert "nonzero" in record["memory_source"]  # the operator whose output shape depends on values
    assert record["peak_activation_bytes"] > 0 and record["flops"] > 0


class _Backbone(nn.Module):
    def __init__(self, unit: nn.Module, head: nn.Module):
        super().__init__()
        self.units = nn.ModuleList([unit])
        self.head = head


def _linear_model(n_in: int, hidden: int, n_out: int, **kw):
    from manpp.core.engine import LocalModel
    from manpp.core.partition import Partition

    return LocalModel(_Backbone(nn.Linear(n_in, hidden), nn.Linear(hidden, n_out)), Partition(((0, 1),), "one"), [],
                      **kw)


def test_flops_count_forward_backward_and_the_recomputation():
    """Two linear layers in E2E: forward 2*B*(in*h + h*out), backward twice that less the input's gradient;
    checkpointing each unit adds exactly one more forward pass."""
    b, n_in, hidden, n_out = 8, 16, 32, 4
    model = _linear_model(n_in, hidden, n_out)
    mode = new_mode()
    fake_model(model, "cpu", mode)
    x, y = fake_batch((torch.randn(b, n_in), torch.randint(0, n_out, (b,))), "cpu", mode)
    forward = 2 * b * (n_in * hidden + hidden * n_out)
    backward = 2 * (2 * b * hidden * n_out) + 2 * b * n_in * hidden  # the first layer: its weights' gradient only
    plain = estimate_step(model, x, y, mode)
    assert plain.flops == forward + backward and plain.module_flops == [plain.flops]
    model.checkpointing = "units"
    assert estimate_step(model, x, y, mode).flops == plain.flops + 2 * b * n_in * hidden  # the unit, once more
    real = FlopCount()  # the same count on real tensors
    model_real = _linear_model(n_in, hidden, n_out)
    with real:
        model_real.train_step(torch.randn(b, n_in), torch.randint(0, n_out, (b,)))
    assert real.total == plain.flops


def test_estimating_computes_nothing_and_leaves_no_real_tensor():
    cfg = _cfg({"model": "resnet8", "dataset": "cifar10", "batch_size": 4, "method": "manpp", "k": 2})
    from manpp.train.build import build_model
    from manpp.tasks import task_of

    info = data_info(cfg)
    model = build_model(cfg, info, "cpu")
    x, y = task_of(model.backbone).example_batch(4, info, "cpu")
    mode = new_mode()
    fake_model(model, "cpu", mode)
    fx, fy = fake_batch((x, y), "cpu", mode)
    estimate_step(model, fx, fy, mode)
    from manpp.memory.estimate import is_fake

    assert all(is_fake(t) for t in [*model.parameters(), *model.buffers()])
    assert all(p.grad is None or is_fake(p.grad) for p in model.parameters())


def test_a_value_read_in_the_step_is_reported_not_crashed():
    """A step that needs a value (here ``.item()`` in the loss) cannot run on fake tensors: EstimateUnsupported."""
    def loss(logits, ctx):
        return logits.sum() * float(logits.detach().mean())  # reads a value

    model = _linear_model(4, 4, 2, final_loss=loss)
    mode = new_mode()
    fake_model(model, "cpu", mode)
    x, y = fake_batch((torch.randn(2, 4), torch.zeros(2, dtype=torch.long)), "cpu", mode)
    with pytest.raises(EstimateUnsupported, match="DataDependentOutput"):
        estimate_step(model, x, y, mode)


def test_the_probe_turns_flops_into_seconds_and_says_so():
    cfg = _cfg({"model": "resnet8", "dataset": "cifar10", "batch_size": 64, "method": "dgl"})
    records, probe = estimate(cfg, [Strategy("e2e"), Strategy("dgl", 2, "units")], progress=False, jobs=1)
    assert probe["flops_per_s"] > 0 and 1 <= probe["batch_size"] <= 64 and probe["flops"] > 0
    for r in records:
        assert r["step_time_s"] == pytest.approx(r["flops"] / probe["flops_per_s"])
        assert r["time_source"].startswith(ESTIMATED) and "GFLOP/s" in r["time_source"]
    probed = probe_rate(cfg, data_info(cfg), torch.device("cpu"), records[0]["flops"] / 64)
    assert probed["batch_size"] == probe["batch_size"]


def test_a_plan_for_a_gpu_this_machine_lacks_is_estimated(capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert target_device("cuda") == (torch.device("cuda"), False)
    args = ["plan", "--model", "resnet8", "--dataset", "cifar10", "--method", "dgl", "--batch-size", "16",
            "--device", "cuda", "--max-k", "2", "--jobs", "1"]
    assert main(args) == 2  # no budget and no GPU to read one from
    assert "give --budget" in capsys.readouterr().err
    assert main(args + ["--budget", "1GB", "--json"]) == 0
    import json

    plan = json.loads(capsys.readouterr().out)
    assert plan["device"] == "cuda" and plan["device_here"] is False and plan["probe"] is None
    rows = plan["strategies"]
    assert all(r["memory_source"].startswith(ESTIMATED) and "CPU's operators" in r["memory_source"] for r in rows)
    assert all(r["step_time_s"] is None and r["flops"] > 0 for r in rows)
    assert not any(r["offload"] for r in rows)  # offloading is timed by transfers: left out without a probe
    assert [r["flops"] for r in rows if r["fits"]] == sorted(r["flops"] for r in rows if r["fits"])
    assert main(args + ["--budget", "1GB", "--measure"]) == 2
    assert "--measure runs every strategy on cuda" in capsys.readouterr().err


def test_plan_says_which_figures_are_estimated(capsys):
    args = ["plan", "--model", "resnet8", "--dataset", "cifar10", "--method", "dgl", "--batch-size", "16",
            "--device", "cpu", "--max-k", "2", "--budget", "1GB", "--jobs", "1"]
    assert main(args) == 0
    out = capsys.readouterr().out
    table = [line for line in out.splitlines() if line.startswith(("ok ", "-- "))]
    assert len(table) == 24 and all(line.count("~") == 3 for line in table)  # activations, total, step
    assert "~ memory: estimated" in out and "~ step: estimated" in out and "GFLOP/s" in out
    assert main(args + ["--measure", "--rounds", "1"]) == 0
    table = [line for line in capsys.readouterr().out.splitlines() if line.startswith(("ok ", "-- "))]
    assert len(table) == 24 and not any("~" in line for line in table)  # measured: no mark


def test_no_progress_bar_off_a_terminal(capsys):
    args = ["plan", "--model", "resnet8", "--dataset", "cifar10", "--method", "dgl", "--batch-size", "8",
            "--device", "cpu", "--max-k", "2", "--budget", "1GB", "--jobs", "1"]
    assert main(args) == 0  # pytest's streams are not terminals
    captured = capsys.readouterr()
    assert "%|" not in captured.err and "%|" not in captured.out
