"""saved_activations=bf16: what autograd saves is stored in bf16; forward exact, gradients within rounding."""

import copy

import pytest
import torch

import manpp
from manpp.config import trainconfig as C
from manpp.base.errors import ManppError
from manpp.memory.measure import measure_step
from manpp.config.validate import check_config


def _pair(method: str, k: int):
    torch.manual_seed(0)
    model = manpp.local_model(manpp.build_backbone("resnet8", num_classes=10), method=method, k=k, objective="infopro"
                              if method != "e2e" else None)
    narrow = copy.deepcopy(model)
    narrow.saved_dtype = torch.bfloat16
    return model, narrow


@pytest.mark.parametrize("method,k", [("e2e", 1), ("manpp", 3)])
def test_losses_are_exact_and_gradients_within_bf16_rounding(batch, method, k):
    x, y = batch
    full, narrow = _pair(method, k)
    a, b = full.train_step(x, y), narrow.train_step(x, y)
    assert [float(v) for v in a.losses] == [float(v) for v in b.losses]  # the forward pass is untouched
    pairs = [(name, p.grad, q.grad) for (name, p), q in zip(full.named_parameters(), narrow.parameters())
             if p.grad is not None or q.grad is not None]
    assert all(g is not None and h is not None for _, g, h in pairs)
    for name, g, h in pairs:  # bf16 keeps 8 bits of mantissa: about 0.4% per saved value
        # a bias before BatchNorm, and MAN++'s scale while both copies are equal (copy init: LB(h) = EMA(h)),
        # have gradients of rounding noise only: compare them absolutely
        assert (g - h).norm() <= 0.05 * g.norm() + 1e-4, (name, float((g - h).norm()), float(g.norm()))
    flat = torch.cat([g.flatten() for _, g, _ in pairs])
    diff = torch.cat([(g - h).flatten() for _, g, h in pairs])
    relative = float(diff.norm() / flat.norm())
    assert 0 < relative < 0.02  # close, and not equal: the saved tensors really were stored in bf16


def test_activation_memory_is_about_halved(batch):
    x, y = batch
    for method, k, bound in (("e2e", 1, 0.55), ("manpp", 3, 0.75)):
        full, narrow = _pair(method, k)
        before = measure_step(full, x, y).peak_activation_bytes
        after = measure_step(narrow, x, y).peak_activation_bytes
        assert after < bound * before, (method, after / before)


def test_the_setting_is_validated_and_reaches_the_model():
    with pytest.raises(ManppError, match="unknown saved_activations 'fp8'"):
        check_config(C.TrainConfig(saved_activations="fp8"))
    from manpp.train.build import build_model, data_info

    cfg = C.apply(C.TrainConfig(), {"model": "resnet8", "k": 2, "saved_activations": "bf16"})
    assert build_model(cfg, data_info(cfg)).saved_dtype == torch.bfloat16


def test_weights_and_expanded_tensors_are_never_copied():
    """A batched matmul saves its weight expanded over the batch (stride 0): stored as a copy, it would
    hold every repetition (a ViT's qkv weight over 197 tokens: 166 MiB instead of 1.7 MiB). Weights,
    their views and expanded tensors stay as they are; the activations are stored narrower."""
    from manpp.memory.measure import ActivationTracker
    from manpp.memory.saved import saved_in

    weight = torch.nn.Parameter(torch.randn(96, 32))
    x = torch.randn(8, 50, 32, requires_grad=True).transpose(0, 1)  # (50, 8, 32), not contiguous

    def peak(dtype):
        with ActivationTracker(exclude=[weight]) as tracker, saved_in(dtype):
            out = torch.relu(torch.matmul(x, weight.t().expand(50, -1, -1)))  # weight saved expanded
            loss = out.square().sum()
        grads = torch.autograd.grad(loss, [x, weight])
        return tracker.peak, grads

    plain, exact = peak(None)
    narrow, approx = peak(torch.bfloat16)
    assert 0 < narrow <= 0.6 * plain  # the activations halved, nothing materialised
    assert all(torch.allclose(a, e, rtol=0.05, atol=0.05 * e.abs().max().item()) for a, e in zip(approx, exact))
