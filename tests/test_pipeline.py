"""Update-unlocked parallel training of modules: one pipelined stage per torchrun process."""

import csv
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from manpp.config import trainconfig as C
from manpp.base.errors import ManppError
from manpp.train.pipeline import stage_modules
from manpp.train.build import check_options
from torchrun_launch import clean_env, launch

RUN = ["model=resnet8", "dataset=synthetic", "method=manpp", "objective=dgl", "k=3", "batch_size=8", "epochs=1",
       "max_steps=4", "device=cpu", "seed=5", "lr=0.05", "warmup_epochs=0", "copy_init=random", "eval_batch_size=64"]


def _run(out, *extra, stages=None, timeout=240, fault=None, env=None):
    """``manpp train`` alone or on ``stages`` torchrun processes; ``fault`` (tests/fault_runner.py) injected.
    A fresh torchrun launch that gloo aborts in C++ runs once more (tests/torchrun_launch.py); a resume or
    a fault does not."""
    program = ["-m", "manpp"] if fault is None else [str(Path(__file__).with_name("fault_runner.py")), fault, "--"]
    program = [*program, "train", "--quiet", "--out", str(out), *RUN, *extra]
    env = clean_env(**(env or {}))
    if stages is None:
        return subprocess.run([sys.executable, *program], capture_output=True, text=True, env=env, timeout=timeout)
    return launch(stages, program, out, env, timeout, retry_abort=fault is None and "--resume" not in extra)


def _model(out):
    return torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=False)["model"]


def test_stages_take_contiguous_groups_of_modules():
    assert stage_modules(4, 2) == [range(0, 2), range(2, 4)]
    assert stage_modules(5, 2) == [range(0, 2), range(2, 5)]
    assert stage_modules(3, 3) == [range(0, 1), range(1, 2), range(2, 3)]
    with pytest.raises(ManppError, match="2 modules"):
        stage_modules(2, 3)


@pytest.mark.slow
def test_two_stage_pipeline_equals_sequential_local_training(tmp_path):
    """Stage 0 and stage 1 run concurrently, each stepping its own optimizer; with the EMA source
    sent every step, every parameter and EMA copy after 4 steps equals sequential training."""
    seq = _run(tmp_path / "seq")
    assert seq.returncode == 0, seq.stderr[-2000:]
    par = _run(tmp_path / "par", "parallel=modules", stages=2)
    assert par.returncode == 0, par.stderr[-2000:]
    a, b = _model(tmp_path / "seq"), _model(tmp_path / "par")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key].float(), b[key].float(), atol=1e-6), key
    # K=3 on 2 stages: modules 0 | 1, 2. With the unit sent every 2nd step, the EMA copy of module 0's
    # auxiliary net (following module 1's first unit, on stage 1) lags: the check can fail
    lag = _run(tmp_path / "lag", "parallel=modules", "ema_sync_every=2", stages=2)
    assert lag.returncode == 0, lag.stderr[-2000:]
    c = _model(tmp_path / "lag")
    ema = [k for k in a if k.startswith("aux.0.ema.")]
    assert ema and any(not torch.allclose(a[k].float(), c[k].float(), atol=1e-6) for k in ema)
    # the pipelined run shares the run lifecycle: SIGTERM to rank 0 at step 2 travels down the pipeline,
    # both stages stop after step 2 with one checkpoint, and a resume on 2 stages ends exactly as `par`
    cut = tmp_path / "cut"
    stop = _run(cut, "parallel=modules", stages=2, fault="SIGTERM@step:2", env={"FAULT_RANK": "0"})
    assert stop.returncode != 0 and "SIGTERM received" in stop.stderr
    saved = torch.load(cut / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert saved["step"] == 2 and len(saved["optimizers"]) == 2 and saved["partial"]["batches"] == 2
    assert len(saved["rng_ranks"]) == 2
    summary = json.loads((cut / "summary.json").read_text())
    assert summary["status"] == "stopped" and summary["signal"] == 15
    again = _run(cut, "parallel=modules", "--resume", str(cut), stages=2)
    assert again.returncode == 0, again.stderr[-2000:]
    d = _model(cut)
    for key in b:
        assert torch.equal(b[key], d[key]), key
    # the log row of the stopped epoch: each stage carried on its own modules' loss sums (module 0's were
    # counted once per stage before)
    rows = [[{k: v for k, v in row.items() if k.startswith("loss_") or k in ("steps", "train_loss")}
             for row in csv.DictReader((out / "log.csv").open())] for out in (tmp_path / "par", cut)]
    assert rows[0] == rows[1]
    assert (cut / "best.pt").exists() and json.loads((cut / "summary.json").read_text())["steps"] == 4


@pytest.mark.slow
def test_a_checkpointed_pipeline_equals_checkpointed_sequential_training(tmp_path):
    """--parallel modules with activation checkpointing inside every stage's modules: the same weights and
    EMA copies after 4 steps as sequential training with it. (Against training without checkpointing only
    the first step is compared: the gradients agree to float rounding, which this tiny-batch DGL run
    amplifies over steps, as it amplifies a change of thread count.)"""
    seq = _run(tmp_path / "seq", "checkpointing=sqrt")
    assert seq.returncode == 0, seq.stderr[-2000:]
    par = _run(tmp_path / "par", "parallel=modules", "checkpointing=sqrt", stages=2)
    assert par.returncode == 0, par.stderr[-2000:]
    a, b = _model(tmp_path / "seq"), _model(tmp_path / "par")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key].float(), b[key].float(), atol=1e-6), key
    one = [_run(tmp_path / name, *extra, "max_steps=1", stages=2)
           for name, extra in (("plain1", ["parallel=modules"]), ("ckpt1", ["parallel=modules", "checkpointing=units"]))]
    assert all(run.returncode == 0 for run in one), one[-1].stderr[-2000:]
    a, b = _model(tmp_path / "plain1"), _model(tmp_path / "ckpt1")
    for key in a:
        assert torch.allclose(a[key].float(), b[key].float(), atol=1e-6), key


@pytest.mark.slow
def test_a_failing_stage_ends_the_run_with_a_clear_error(tmp_path):
    started = time.perf_counter()
    proc = _run(tmp_path / "boom", "parallel=modules", "lr=1e30", "max_steps=20", stages=2, timeout=180)
    assert proc.returncode != 0
    assert time.perf_counter() - started < 120  # no hang: the other stage is stopped too
    assert "training diverged" in proc.stderr


def test_parallel_mode_bad_input():
    with pytest.raises(ManppError, match="unknown parallel 'stages': accepted are 'modules' or none"):
        check_options(C.TrainConfig(parallel="stages"))
    from manpp.train.loop import train

    with pytest.raises(ManppError, match="needs a local method"):
        train(C.TrainConfig(parallel="modules", method="e2e", device="cpu", dataset="synthetic", model="resnet8"))
    with pytest.raises(ManppError, match=r"cannot clip the global gradient norm \(grad_clip=1.0\)"):
        train(C.TrainConfig(parallel="modules", grad_clip=1.0, device="cpu", dataset="synthetic", model="resnet8"))
    with pytest.raises(ManppError, match="ema_sync_every"):
        train(C.TrainConfig(parallel="modules", ema_sync_every=0, device="cpu", dataset="synthetic", model="resnet8"))


ONE_STAGE = dict(model="resnet8", dataset="digits", method="manpp", objective="dgl", k=3, train_subset=64,
                 test_subset=32, batch_size=16, epochs=3, seed=3, device="cpu", warmup_epochs=0)
ROW_KEYS = ("epoch", "step", "lr", "train_loss", "test_accuracy", "loss_0", "loss_1", "loss_2", "steps")


def _trained(tmp_path, name, resume=False, **extra):
    from manpp.train.loop import train

    pytest.importorskip("sklearn")  # digits: random crops draw from the global RNG, which an evaluation must not
    cfg = C.TrainConfig(**{**ONE_STAGE, **extra}, out=str(tmp_path / name))
    return train(cfg, verbose=False, resume=str(tmp_path / name) if resume else None)


def _same_run(a, b):
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert sa.keys() == sb.keys()
    assert [k for k in sa if not torch.equal(sa[k], sb[k])] == []
    rows = [[[row[k] for k in ROW_KEYS] for row in csv.DictReader((run.out / "log.csv").open())] for run in (a, b)]
    assert rows[0] == rows[1] and len(rows[0]) == ONE_STAGE["epochs"]


def test_one_pipelined_stage_trains_exactly_as_the_sequential_loop_over_epochs(tmp_path, monkeypatch):
    """parallel=modules in one process is the sequential run, bit for bit, across every epoch boundary
    (it left it at the first one when its evaluation drew from the global RNG), and a SIGTERM at the epoch
    boundary or inside an epoch, then a resume, ends as the run never stopped, log rows included."""
    sys.path.insert(0, str(Path(__file__).parent))
    from fault_runner import install

    sequential = _trained(tmp_path, "seq")
    with pytest.warns(UserWarning, match="one stage"):
        pipelined = _trained(tmp_path, "par", parallel="modules")
    _same_run(sequential, pipelined)
    for cut in (4, 6):  # the last step of epoch 1 (4 steps an epoch), and a step inside epoch 2
        with monkeypatch.context() as m, pytest.warns(UserWarning, match="one stage"):
            install(f"SIGTERM@step:{cut}", patch=m.setattr)
            stopped = _trained(tmp_path, f"cut{cut}", parallel="modules")
        assert stopped.signal == 15 and stopped.summary["steps"] == cut
        with pytest.warns(UserWarning, match="one stage"):
            resumed = _trained(tmp_path, f"cut{cut}", resume=True, parallel="modules")
        _same_run(pipelined, resumed)
