"""step_in_backward: the optimizer steps inside the backward passes, exactly as one step at the end.

Exact means bitwise here: the same parameters, EMA copies, BatchNorm statistics and optimizer state after
several steps, for MAN++ (whose EMA update reads the next module's first unit between the two), DGL,
InfoPro, E2E (a parameter at a time), SGD and AdamW, bf16 autocast, and a run stopped and resumed. And it
does what it is for: each module's gradients are freed before the next module runs.
"""

from __future__ import annotations

import copy

import pytest
import torch

from manpp.config import trainconfig as C
from manpp.train.build import build_model, load_data, seed_everything
from manpp.memory.earlystep import StepInBackward
from manpp.base.errors import ManppError
from manpp.memory.measure import measure_step
from manpp.core.optim import build_optimizer, parameter_groups
from manpp.config.resolve import resolve
from manpp.tasks import task_of
from manpp.train.loop import train

BASE = dict(model="resnet8", dataset="synthetic", batch_size=8, device="cpu", seed=3, lr=0.05, warmup_epochs=0.0,
            epochs=1, eval_batch_size=64)


def _trained(overrides: dict, early: bool, steps: int = 3):
    cfg = resolve(C.apply(C.TrainConfig(), {**BASE, **overrides}))
    seed_everything(cfg.seed)
    train_set, _, info = load_data(cfg)
    model = build_model(cfg, info)
    params = model.parameters_to_optimize()
    optimizer = build_optimizer(cfg, parameter_groups(model, cfg, params))
    stepper = StepInBackward(model, optimizer, params) if early else None
    task = task_of(model.backbone)
    loader = torch.utils.data.DataLoader(train_set, batch_size=cfg.batch_size, collate_fn=task.collate)
    for _, batch in zip(range(steps), loader):
        x, y = task.prepare(batch, "cpu")
        optimizer.zero_grad(set_to_none=True)
        if stepper is None:
            model.train_step(x, y)
            optimizer.step()
        else:
            stepper.begin_step()
            model.train_step(x, y, after_module=stepper.after_module)
            stepper.end_step()
    return model, optimizer


def _same(a, b) -> None:
    (ma, oa), (mb, ob) = a, b
    sa, sb = ma.state_dict(), mb.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert torch.equal(sa[name], sb[name]), f"{name} differs"
    da, db = oa.state_dict()["state"], ob.state_dict()["state"]
    assert da.keys() == db.keys() and da  # the same parameters hold optimizer state
    for i in da:
        for key in da[i]:
            assert torch.equal(torch.as_tensor(da[i][key]), torch.as_tensor(db[i][key])), f"state {i}.{key} differs"


@pytest.mark.parametrize("overrides", [
    {"method": "manpp", "k": 3},  # InfoPro's heads, the EMA copies moved between the modules' steps
    {"method": "manpp", "objective": "dgl", "k": 4, "optimizer": "adamw"},
    {"method": "dgl", "k": 2, "checkpointing": "units"},
    {"method": "e2e"},  # each parameter steps in its post-accumulate-grad hook
    {"method": "e2e", "optimizer": "adamw"},
    pytest.param({"method": "manpp", "k": 3, "amp": "bf16"}, marks=pytest.mark.slow),  # bf16 autocast: slow on a CPU
], ids=["manpp-infopro", "manpp-dgl-adamw", "dgl-ckpt", "e2e", "e2e-adamw", "manpp-bf16"])
def test_stepping_in_backward_is_bitwise_the_step_at_the_end(overrides):
    end, early = _trained(overrides, early=False), _trained(overrides, early=True)
    _same(end, early)
    untrained = _trained(overrides, early=False, steps=2)  # the comparison can fail: one step fewer differs
    assert any(not torch.equal(v, untrained[0].state_dict()[n]) for n, v in end[0].state_dict().items())


def test_each_module_s_gradients_are_freed_before_the_next_module_runs():
    cfg = resolve(C.apply(C.TrainConfig(), {**BASE, "method": "manpp", "k": 4}))
    train_set, _, info = load_data(cfg)
    model = build_model(cfg, info)
    optimizer = build_optimizer(cfg, parameter_groups(model, cfg))
    stepper = StepInBackward(model, optimizer)
    x, y = task_of(model.backbone).example_batch(8, info, "cpu")
    model.run_first_step_hooks(x, y)  # recompute_ema='auto' settles first, on measured steps of its own
    holding = []
    handles = [m.register_forward_pre_hook(
        lambda *_: holding.append(sum(p.grad is not None for p in model.parameters()))) for m in model.local_modules]
    optimizer.zero_grad(set_to_none=True)
    stepper.begin_step()
    model.train_step(x, y, after_module=stepper.after_module)
    stepper.end_step()
    assert holding == [0, 0, 0, 0]  # when module j starts, no gradient of an earlier module is alive
    assert all(p.grad is None for p in model.parameters()) and optimizer.state  # stepped, and freed
    for h in handles:
        h.remove()
    # the tracker's view: gradients on top of the activations; early, module j no longer holds the earlier ones
    report = measure_step(model, x, y)
    assert report.peak_activation_bytes <= report.peak_step_early_bytes <= report.peak_step_bytes
    end, early = report.module_step_peak_bytes, report.module_step_early_peak_bytes
    assert all(e < n for e, n in zip(early[1:], end[1:])) and early[0] == end[0]


def test_a_parameter_of_two_modules_is_refused():
    cfg = resolve(C.apply(C.TrainConfig(), {**BASE, "method": "dgl", "k": 2}))
    _, _, info = load_data(cfg)
    model = build_model(cfg, info)
    shared = model.backbone.units[0]
    model.aux[0].extra = shared  # module 0's auxiliary network now also holds module 0's first unit: fine
    StepInBackward(model, torch.optim.SGD(model.parameters_to_optimize(), lr=0.1))
    model.aux[0].extra = model.backbone.units[-1]  # ... but the last module's unit belongs to module 1
    with pytest.raises(ManppError, match="belongs to modules 0 and 1"):
        StepInBackward(model, torch.optim.SGD(model.parameters_to_optimize(), lr=0.1))


def test_what_cannot_step_early_is_refused_in_one_line():
    from manpp.config.validate import check_config

    for extra, words in (({"amp": "fp16"}, "cannot use amp=fp16"), ({"grad_clip": 1.0}, "cannot clip"),
                         ({"parallel": "modules"}, "not available with parallel=modules")):
        with pytest.raises(ManppError, match=words):
            check_config(C.TrainConfig(**{**BASE, "step_in_backward": True, **extra}))


def test_a_run_stepping_in_backward_equals_one_stepping_at_the_end_and_resumes_exactly(tmp_path):
    common = {**BASE, "method": "manpp", "k": 3, "epochs": 2, "train_subset": 64}
    plain = train(C.TrainConfig(**common, out=str(tmp_path / "plain")), verbose=False)
    early = train(C.TrainConfig(**common, step_in_backward=True, out=str(tmp_path / "early")), verbose=False)
    for name, value in plain.model.state_dict().items():
        assert torch.equal(value, early.model.state_dict()[name]), name
    assert [r["train_loss"] for r in plain.summary["history"]] == [r["train_loss"] for r in early.summary["history"]]
    assert early.summary["status"] == "finished" and len(early.summary["history"]) == 2
    # stopped after 5 of its 16 steps, then resumed: the same end
    e2e = {**common, "method": "e2e", "k": None}  # E2E: its first step is measured with the hooks in place
    e2e_plain = train(C.TrainConfig(**e2e, out=str(tmp_path / "e2e")), verbose=False).model.state_dict()
    e2e_early = train(C.TrainConfig(**e2e, step_in_backward=True, out=str(tmp_path / "e2e-early")),
                      verbose=False).model.state_dict()
    assert all(torch.equal(value, e2e_early[name]) for name, value in e2e_plain.items())
    part = C.TrainConfig(**common, step_in_backward=True, out=str(tmp_path / "part"), max_steps=5)
    train(part, verbose=False)
    resumed = train(C.TrainConfig(**common, step_in_backward=True), resume=str(tmp_path / "part"), verbose=False)
    for name, value in plain.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[name]), name
