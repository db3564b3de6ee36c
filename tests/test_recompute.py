"""Activation checkpointing (checkpointing=units|sqrt) and offload: exact gradients, BN statistics updated
once, RNG replayed, a lower activation peak that the tracker sees, and every way the step runs."""

import contextlib
import copy

import pytest
import torch

import manpp
from manpp.config import trainconfig as C
from manpp.memory import recompute
from manpp.base.errors import ManppError
from manpp.memory.measure import measure_step
from manpp.core.partition import unit_activation_bytes
from manpp.memory.saved import saved_in
from manpp.config.validate import check_config


def _model(method="manpp", k=3, name="resnet8", objective="infopro"):
    torch.manual_seed(0)
    return manpp.local_model(manpp.build_backbone(name, num_classes=10), method=method, k=k,
                             objective=objective if method != "e2e" else None)


def _step(model, x, y, seed=7):
    torch.manual_seed(seed)
    result = model.train_step(x, y)
    return result, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _relative(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    diff = sum(float(((a[n] - b[n]) ** 2).sum()) for n in a) ** 0.5
    return diff / sum(float((a[n] ** 2).sum()) for n in a) ** 0.5


def _checkpointed_pair(model, mode):
    plain, ckpt = copy.deepcopy(model), copy.deepcopy(model)
    ckpt.checkpointing = mode
    return plain, ckpt


def test_segments_and_bad_values():
    assert recompute.segment_bounds(5, "units") == [0, 1, 2, 3, 4, 5]
    assert recompute.segment_bounds(9, "sqrt") == [0, 3, 6, 9]
    assert recompute.segment_bounds(2, "sqrt") == [0, 2]
    assert recompute.segment_bounds(33, "sqrt") == [0, 6, 11, 16, 22, 28, 33]
    assert recompute.segment_bounds(1, "sqrt") == [0, 1]
    assert recompute.segment_bounds(5, "off") is None
    with pytest.raises(ManppError, match="unknown checkpointing 'all': accepted are 'off', 'units' or 'sqrt'"):
        recompute.segment_bounds(5, "all")
    with pytest.raises(ManppError, match="checkpointing.*'layers'"):
        check_config(C.TrainConfig(checkpointing="layers"))
    model = _model()
    with pytest.raises(ManppError, match="checkpointing"):
        model.checkpointing = "every"
    assert model.checkpointing == "off"
    model.checkpointing = None  # None and False are off too
    assert model.checkpointing == "off"


@pytest.mark.parametrize("method,k,objective,mode", [("e2e", 1, None, "units"), ("e2e", 1, None, "sqrt"),
                                                     ("manpp", 3, "infopro", "units"), ("manpp", 4, "dgl", "sqrt"),
                                                     ("dgl", 3, "dgl", "units"), ("man", 2, "infopro", "sqrt")])
def test_same_losses_gradients_and_statistics_as_without(batch, method, k, objective, mode):
    """One step with checkpointing gives the plain step's losses and gradients (to float rounding) and
    leaves every buffer (BatchNorm running statistics and counters, EMA copies) where the plain step does."""
    x, y = batch
    plain, ckpt = _checkpointed_pair(_model(method, k, objective=objective), mode)
    (a, ga), (b, gb) = _step(plain, x, y), _step(ckpt, x, y)
    assert [float(v) for v in a.losses] == pytest.approx([float(v) for v in b.losses], rel=1e-6, abs=1e-7)
    assert _relative(ga, gb) < 1e-5
    for (name, u), v in zip(plain.state_dict().items(), ckpt.state_dict().values()):
        assert torch.allclose(u.float(), v.float(), rtol=1e-5, atol=1e-6), name
        if name.endswith("num_batches_tracked"):
            assert torch.equal(u, v), name  # updated once, not once more by the recomputation


def test_without_restoring_statistics_they_would_be_updated_twice(batch, monkeypatch):
    """The check above can fail: a recomputation that keeps what it writes counts every batch twice."""
    x, y = batch
    monkeypatch.setattr(recompute, "statistics_kept", lambda modules: contextlib.nullcontext())
    plain, ckpt = _checkpointed_pair(_model("e2e", 1), "units")
    _step(plain, x, y), _step(ckpt, x, y)
    counts = [(u, v) for n, u in plain.state_dict().items() if n.endswith("num_batches_tracked")
              for v in [ckpt.state_dict()[n]]]
    assert counts and all(int(v) == 2 * int(u) for u, v in counts)


def _vit_with_dropout():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, num_classes=10, depth=4,
                            drop_rate=0.1, proj_drop_rate=0.1, attn_drop_rate=0.1, drop_path_rate=0.2)
    return manpp.wrap(vit, method="manpp", k=2)


def test_dropout_and_stochastic_depth_replay_their_random_draws(batch):
    """A ViT with dropout and stochastic depth: the recomputation draws the same masks as the first pass
    (the gradients match), and the step leaves the global RNG where the plain step leaves it."""
    x, y = batch
    plain, ckpt = _checkpointed_pair(_vit_with_dropout(), "units")
    (a, ga), after_plain = _step(plain, x, y), torch.get_rng_state()
    (b, gb), after_ckpt = _step(ckpt, x, y), torch.get_rng_state()
    assert torch.equal(after_plain, after_ckpt)
    assert [float(v) for v in a.losses] == pytest.approx([float(v) for v in b.losses], rel=1e-6)
    assert _relative(ga, gb) < 1e-5
    (_, other) = _step(copy.deepcopy(plain), x, y, seed=8)  # other masks: other gradients (dropout is on)
    assert _relative(ga, other) > 1e-3


@pytest.mark.parametrize("method,k,bound", [("e2e", 1, 0.6), ("manpp", 4, 0.85), ("dgl", 4, 0.85)])
def test_the_activation_peak_falls_and_the_recomputation_is_counted(batch, method, k, bound):
    x, y = batch
    plain = _model(method, k, name="resnet32", objective="dgl")
    plain.run_first_step_hooks(x, y)
    peaks = {}
    for mode in ("off", "units", "sqrt"):
        plain.checkpointing = mode
        peaks[mode] = measure_step(plain, x, y).peak_activation_bytes
    assert peaks["units"] < bound * peaks["off"] and peaks["sqrt"] < bound * peaks["off"], peaks
    # what the recomputation holds is counted: the largest unit's whole forward is alive at once
    largest_unit = max(unit_activation_bytes(plain.backbone, x.shape[0], 3, 32))
    assert peaks["units"] > largest_unit


def test_under_autocast_and_bf16_saved_activations(batch):
    x, y = batch
    for setting in ("amp", "saved"):
        model = _model("manpp", 3)
        if setting == "amp":
            model.amp_dtype = torch.bfloat16
        else:
            model.saved_dtype = torch.bfloat16
        plain, ckpt = _checkpointed_pair(model, "units")
        (a, ga), (b, gb) = _step(plain, x, y), _step(ckpt, x, y)
        assert [float(v) for v in a.losses] == pytest.approx([float(v) for v in b.losses], rel=1e-3)
        # bf16 rounding on both sides (the recomputation starts from the exact segment inputs)
        assert _relative(ga, gb) < 2e-2, setting


def test_offloaded_activations_give_exact_gradients_and_leave_the_device(batch):
    """offload: every saved activation is copied out (here a host copy, on a GPU pinned host memory) and
    back; the gradients are exactly the plain step's, and the tracker sees none of them on the device."""
    x, y = batch
    for mode in ("off", "units"):
        plain, moved = _checkpointed_pair(_model("manpp", 3), mode)
        plain.checkpointing = mode
        moved.offload = True
        (a, ga), (b, gb) = _step(plain, x, y), _step(moved, x, y)
        assert [float(v) for v in a.losses] == [float(v) for v in b.losses]
        assert all(torch.equal(ga[n], gb[n]) for n in ga)
        assert measure_step(moved, x, y).peak_activation_bytes < 0.05 * measure_step(plain, x, y).peak_activation_bytes


def test_saved_in_offload_copies_and_restores_each_tensor():
    w = torch.randn(64, 64, requires_grad=True)
    x = torch.randn(32, 64)
    with saved_in(None, offload=True):
        h = torch.tanh(x @ w)
        loss = (h * h).sum()
    loss.backward()
    g = w.grad.clone()
    w.grad = None
    (torch.tanh(x @ w) ** 2).sum().backward()
    assert torch.equal(g, w.grad)


def test_the_settings_reach_the_model(recwarn):
    from manpp.train.build import build_model, data_info

    cfg = C.apply(C.TrainConfig(), {"model": "resnet8", "k": 2, "checkpointing": "sqrt", "offload_activations": True})
    model = build_model(cfg, data_info(cfg))
    assert model.checkpointing == "sqrt" and model.offload is True
    assert all(m.segments == recompute.segment_bounds(len(m.units), "sqrt") for m in model.plain_modules)
    assert any("offload_activations" in str(w.message) and "no memory is saved" in str(w.message) for w in recwarn)


def test_bf16_autocast_on_a_cpu_without_native_bf16_says_it_is_slower(monkeypatch):
    import warnings

    from manpp.train import build

    cfg = C.apply(C.TrainConfig(), {"model": "resnet8", "k": 2, "amp": "bf16"})
    for native, warned in ((False, True), (True, False), (None, False)):  # None: this torch cannot tell
        monkeypatch.setattr(build, "cpu_has_native_bf16", lambda native=native: native)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            build.build_model(cfg, build.data_info(cfg))
        assert any("without native bf16" in str(w.message) and "leave amp unset" in str(w.message)
                   for w in caught) is warned
    assert build.cpu_has_native_bf16() in (True, False, None)


@pytest.mark.slow  # compiling takes about a minute on 2 CPU cores
def test_compiled_modules_with_checkpointing_match_compiled_without(batch):
    x, y = batch
    model = _model("manpp", 3)
    model.run_first_step_hooks(x, y)
    compiled = copy.deepcopy(model).compile_parts()
    both = copy.deepcopy(model).compile_parts()
    both.checkpointing = "units"  # set after compiling: the units are compiled one by one instead
    assert all(m.unit_calls is not None for m in both.plain_modules)
    (a, ga), (b, gb) = _step(compiled, x, y), _step(both, x, y)
    assert [float(v) for v in a.losses] == pytest.approx([float(v) for v in b.losses], rel=1e-5)
    assert _relative(ga, gb) < 1e-4
    with both.uncompiled():
        assert all(m.unit_calls is None for m in both.plain_modules)
    assert all(m.unit_calls is not None for m in both.plain_modules)
