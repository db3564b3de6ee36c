"""Training a local model through a framework's backward (Lightning), through the ``backward=``
hook of ``LocalModel.train_step`` (plain PyTorch), and in a plain loop; all on real digits."""

from __future__ import annotations

import copy
import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader, Subset

import manpp
from manpp.data import build_datasets

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "lightning_module.py"
ARCH = "resnet8"
BATCH = 32
# MAN++'s default recompute_ema="auto" measures two extra steps' memory before the first step: a
# GPU-memory choice, and slow on a shared CPU; the tests fix it (the EMA branch is kept).
NO_MEMORY_PROBE = {"recompute_ema": False}


def digits_model(method: str = "manpp", k: int = 3) -> manpp.LocalModel:
    net = manpp.build_backbone(ARCH, num_classes=10, in_channels=1)
    return manpp.local_model(net, method=method, k=k, objective="dgl", image_size=32, **NO_MEMORY_PROBE)


@pytest.fixture(scope="module")
def digits():
    """Digits without augmentation: a 256-image training subset and a 128-image test subset."""
    train, test, info = build_datasets("digits", augment=False)
    assert (info.in_channels, info.image_size, info.num_classes) == (1, 32, 10)
    return Subset(train, range(256)), Subset(test, range(128))


def train_loader(dataset, seed: int = 0) -> DataLoader:
    return DataLoader(dataset, batch_size=BATCH, shuffle=True, drop_last=True,
                      generator=torch.Generator().manual_seed(seed))


def mean(values) -> float:
    return sum(values) / len(values)


# --- (a) Lightning, manual optimization --------------------------------------------------------

@pytest.fixture(scope="module")
def example():
    """``examples/lightning_module.py`` imported as a module (it is not part of the package)."""
    pytest.importorskip("lightning")
    spec = importlib.util.spec_from_file_location("manpp_lightning_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


@pytest.mark.filterwarnings("ignore::UserWarning")  # Lightning's hints (few loader workers, log interval)
@pytest.mark.filterwarnings("ignore:.*LeafSpec")  # Lightning's own use of torch's pytree
def test_lightning_module_trains_with_manual_backward(example, digits):
    import lightning as L

    steps, k, lr = 30, 3, 0.1
    train, test = digits
    L.seed_everything(0, verbose=False)
    model = example.build_model(ARCH, "manpp", k=k, **NO_MEMORY_PROBE)
    module = example.LocalLearningModule(model, lr=lr, cosine=True)
    backbone = module.model.backbone
    before = {name: p.detach().clone() for name, p in backbone.named_parameters()}

    # Spy on manual_backward: training_step passes self.manual_backward, which finds this first.
    backward_losses: list[torch.Tensor] = []
    lightning_backward = module.manual_backward

    def spy(loss, *args, **kwargs):
        assert loss.requires_grad and loss.dim() == 0
        backward_losses.append(loss.detach())
        return lightning_backward(loss, *args, **kwargs)

    module.manual_backward = spy

    class Record(L.Callback):
        def __init__(self):
            self.outputs, self.calls = [], []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.outputs.append(outputs)
            self.calls.append(len(backward_losses))

    record = Record()
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[record])
    trainer.fit(module, train_loader(train))

    # One optimizer step per batch, and manual_backward exactly K times in each of them, on the
    # very losses train_step reported (in module order).
    assert trainer.global_step == steps == len(record.outputs)
    per_step = [b - a for a, b in zip([0] + record.calls[:-1], record.calls)]
    assert per_step == [k] * steps
    reported = [loss for out in record.outputs for loss in out["losses"]]
    assert len(reported) == len(backward_losses) == k * steps
    for seen, returned in zip(backward_losses, reported):
        torch.testing.assert_close(seen, returned, rtol=0, atol=0)

    # Per-module and task losses are logged.
    for name in [f"train/loss_{j}" for j in range(k)] + ["train/loss"]:
        assert name in trainer.callback_metrics, name

    # The cosine schedule was stepped by hand once per step.
    assert module.lr_schedulers().last_epoch == steps
    assert module.optimizers().param_groups[0]["lr"] < 0.05 * lr

    # The backbone itself was trained: every parameter moved, in every module.
    after = dict(backbone.named_parameters())
    unchanged = [name for name, p in after.items() if torch.equal(p.detach(), before[name])]
    assert not unchanged, unchanged

    # Training loss went down: mean task loss of the last 5 steps vs the first 5.
    task = [float(out["loss"]) for out in record.outputs]
    assert all(torch.isfinite(torch.tensor(task)))
    assert mean(task[-5:]) < 0.9 * mean(task[:5]), task

    # validation_step: accuracy of the backbone alone.
    metrics = trainer.validate(module, DataLoader(test, batch_size=64), verbose=False)[0]
    assert 0.0 <= metrics["val/acc"] <= 1.0 and metrics["val/loss"] > 0


# --- (b) the backward= hook, plain PyTorch ------------------------------------------------------

@pytest.mark.parametrize("method", ["dgl", "manpp"])
def test_backward_hook_matches_plain_backward(method, digits):
    k = 3
    torch.manual_seed(0)
    hooked = digits_model(method, k)
    plain = copy.deepcopy(hooked)
    opts = [torch.optim.SGD(m.parameters_to_optimize(), lr=0.05, momentum=0.9) for m in (hooked, plain)]
    seen: list[torch.Tensor] = []

    def backward(loss):
        assert loss.requires_grad and loss.dim() == 0
        seen.append(loss.detach())
        loss.backward()

    batches = iter(train_loader(digits[0]))
    for step in range(2):
        x, y = next(batches)
        for opt in opts:
            opt.zero_grad(set_to_none=True)
        start = len(seen)
        torch.manual_seed(step)
        hooked_result = hooked.train_step(x, y, backward=backward)
        torch.manual_seed(step)
        plain_result = plain.train_step(x, y)

        # Called K times, with the losses train_step returns.
        assert len(seen) - start == k == len(hooked_result.losses)
        for a, b in zip(seen[start:], hooked_result.losses):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
        for a, b in zip(hooked_result.losses, plain_result.losses):
            torch.testing.assert_close(a, b)

        # The same gradients as loss.backward() gives.
        params = list(zip(hooked.named_parameters(), plain.parameters()))
        assert len(params) == len(list(plain.parameters()))
        for (name, p), q in params:
            assert (p.grad is None) == (q.grad is None), name
            if p.grad is not None:
                torch.testing.assert_close(p.grad, q.grad, msg=lambda m, name=name: f"{name}: {m}")
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in hooked.backbone.parameters())
        for opt in opts:
            opt.step()

    for p, q in zip(hooked.state_dict().values(), plain.state_dict().values()):
        torch.testing.assert_close(p, q)


# --- (c) a plain loop, no framework -------------------------------------------------------------

def test_plain_loop_trains_on_digits(digits):
    steps, k = 24, 2
    torch.manual_seed(0)
    model = digits_model("manpp", k)
    opt = torch.optim.SGD(model.parameters_to_optimize(), lr=0.1, momentum=0.9, nesterov=True)
    losses = []
    while len(losses) < steps:
        for x, y in train_loader(digits[0], seed=len(losses)):
            opt.zero_grad(set_to_none=True)
            result = model.train_step(x, y)
            opt.step()
            assert len(result.losses) == k and result.logits.shape == (BATCH, 10)
            losses.append([float(l) for l in result.losses])
            if len(losses) == steps:
                break
    task = [step[-1] for step in losses]
    first_module = [step[0] for step in losses]
    assert all(torch.isfinite(torch.tensor(losses)).flatten())
    assert mean(task[-5:]) < 0.9 * mean(task[:5]), task
    assert mean(first_module[-5:]) < mean(first_module[:5]), first_module


# --- (d) the caller's autocast is honoured --------------------------------------------------------

def _unit_dtypes(model) -> tuple[list, object]:
    """The dtype of every unit's output, recorded while training (a forward hook on each unit)."""
    seen = []
    hooks = [u.register_forward_hook(lambda _m, _i, out: seen.append(out.dtype)) for u in model.backbone.units]
    return seen, hooks


def test_an_outer_autocast_reaches_every_module(digits):
    model = digits_model("manpp", 3)
    seen, hooks = _unit_dtypes(model)
    x, y = next(iter(train_loader(digits[0])))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model.train_step(x, y)
    for h in hooks:
        h.remove()
    assert seen and set(seen) == {torch.bfloat16}, seen


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.filterwarnings("ignore:.*LeafSpec")
def test_lightning_bf16_mixed_precision_trains_in_bf16(example, digits):
    import lightning as L

    L.seed_everything(0, verbose=False)
    model = example.build_model(ARCH, "manpp", k=3, **NO_MEMORY_PROBE)
    seen, hooks = _unit_dtypes(model)
    trainer = L.Trainer(max_steps=2, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, precision="bf16-mixed")
    trainer.fit(example.LocalLearningModule(model, lr=0.05), train_loader(digits[0]))
    for h in hooks:
        h.remove()
    assert trainer.global_step == 2 and seen and set(seen) == {torch.bfloat16}, set(seen)
