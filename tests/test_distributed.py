"""Data-parallel training under torchrun: sharding, gradient averaging of every module, fp16 scaling."""

import copy
import os
import subprocess
import sys

import pytest
import torch

import manpp
from manpp.config import trainconfig as C
from manpp.base import distributed as D
from manpp.base.errors import ManppError
from manpp.train.build import EpochBatches, build_model, load_data, seed_everything
from manpp.core.optim import build_optimizer, lr_at, parameter_groups, set_lr
from manpp.config.resolve import resolve
from manpp.train.loop import train
from torchrun_launch import clean_env, free_port, launch


def test_shards_of_a_step_are_the_single_process_batch():
    single = list(EpochBatches(40, 8, seed=3, epoch=1))
    shards = [list(EpochBatches(40, 8, seed=3, epoch=1, rank=r, world=2)) for r in range(2)]
    assert len(shards[0]) == len(shards[1]) == len(single) == 5
    for step, batch in enumerate(single):
        assert shards[0][step] + shards[1][step] == batch
        assert len(shards[0][step]) == 4
    assert single != list(EpochBatches(40, 8, seed=3, epoch=2))  # the epoch reshuffles (set_epoch)


def test_global_batch_must_split_evenly():
    assert D.check_batch_size(12, 4) == 3
    with pytest.raises(ManppError, match="multiple of 4"):
        D.check_batch_size(10, 4)
    with pytest.raises(ManppError, match="multiple of 3"):
        D.check_batch_size(2, 3)


def test_without_a_group_helpers_are_single_process(monkeypatch):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert (D.rank(), D.world_size(), D.is_main(), D.launch_env()) == (0, 1, True, None)
    assert D.shard_bounds(10) == (0, 10)
    t = torch.ones(3)
    D.all_reduce_sum(t)
    assert torch.equal(t, torch.ones(3))
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "two")
    with pytest.raises(ManppError, match="RANK='two'"):
        D.launch_env()


def test_bad_backend_and_optimizer_are_clear_errors(tmp_path):
    from manpp.train.build import check_options

    with pytest.raises(ManppError, match="unknown dist_backend 'mpi'"):
        check_options(C.TrainConfig(dist_backend="mpi"))
    with pytest.raises(ManppError, match="unknown optimizer 'lamb'"):
        check_options(C.TrainConfig(optimizer="lamb"))
    with pytest.raises(ManppError, match="adamw_betas"):
        check_options(C.TrainConfig(optimizer="adamw", adamw_betas=[0.9]))
    with pytest.raises(ManppError, match="unknown amp 'fp8'"):
        check_options(C.TrainConfig(amp="fp8"))


CFG = dict(model="resnet8", dataset="synthetic", method="manpp", batch_size=8, epochs=1,
           max_steps=3, device="cpu", seed=5, lr=0.05, warmup_epochs=0.0, eval_batch_size=64, copy_init="random")


def _reference(cfg: C.TrainConfig, world: int) -> torch.nn.Module:
    """What rank 0 of ``world`` processes computes, in one process.

    Each shard of the global batch runs its own local step from the same starting state (BatchNorm
    uses the shard's statistics, as in a process of its own); the gradients are averaged over the
    shards; buffers (BatchNorm statistics, EMA copies) end as rank 0's. It uses one thread, like
    the processes (OMP_NUM_THREADS=1), so that float sums run in the same order: DGL's BatchNorm1d
    over 4 images would otherwise amplify rounding differences.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _reference_steps(cfg, world)
    finally:
        torch.set_num_threads(threads)


def _reference_steps(cfg: C.TrainConfig, world: int) -> torch.nn.Module:
    cfg = resolve(cfg)  # a loop of one's own resolves the config once, as manpp train does
    seed_everything(cfg.seed)
    train_set, _, info = load_data(cfg)
    model = build_model(cfg, info)
    params = model.parameters_to_optimize()
    optimizer = build_optimizer(cfg, parameter_groups(model, cfg, params))  # MAN++: the heads at 2x the lr
    steps_per_epoch = len(train_set) // cfg.batch_size
    for step, batch in enumerate(EpochBatches(len(train_set), cfg.batch_size, cfg.seed, 0)):
        if step == cfg.max_steps:
            break
        x = torch.stack([train_set[i][0] for i in batch])
        y = torch.tensor([train_set[i][1] for i in batch])
        start = copy.deepcopy(model.state_dict())
        grads, after_rank0 = [], None
        for r in range(world):
            model.load_state_dict(start)
            model.zero_grad(set_to_none=True)
            lo, hi = D.shard_bounds(len(batch), r, world)
            model.train_step(x[lo:hi], y[lo:hi])
            grads.append([p.grad.clone() if p.grad is not None else None for p in params])
            if r == 0:
                after_rank0 = copy.deepcopy(model.state_dict())
        model.load_state_dict(after_rank0)
        for i, p in enumerate(params):
            shard = [g[i] for g in grads if g[i] is not None]
            p.grad = sum(shard) / world if shard else None
        set_lr(optimizer, lr_at(step, cfg, steps_per_epoch))
        optimizer.step()
    return model


@pytest.mark.slow  # the fast tier starts torchrun in tests/test_run_safety.py (ranks stopping together)
@pytest.mark.parametrize("optimizer,objective,k,overlap,checkpointing,extra", [
    ("sgd", "dgl", 3, True, "off", {}), ("sgd", "dgl", 3, False, "off", {}), ("adamw", "infopro", 2, False, "off", {}),
    ("sgd", "infopro", 3, True, "units", {}),
    ("sgd", "infopro", 3, False, "off", {"step_in_backward": True}),  # each module averaged, then stepped, early
    ("adamw", None, None, False, "off", {"step_in_backward": True, "method": "e2e"})])  # each parameter
def test_two_gloo_processes_equal_single_process_training(tmp_path, optimizer, objective, k, overlap, checkpointing,
                                                          extra):
    """torchrun with 2 CPU processes: every module's parameters (and the EMA copies) after 3 steps
    equal one process that averages the two shards' gradients of each global batch, with each
    module's all-reduce overlapped with the next module's compute (overlap_comm) or all at the end,
    or (step_in_backward) each module's, E2E's each parameter's, averaged and stepped inside the backward.
    The processes may checkpoint activations; the reference never does (the gradients are exact)."""
    out = tmp_path / "run"
    settings = dict(CFG, optimizer=optimizer, objective=objective, k=k, overlap_comm=overlap,
                    checkpointing=checkpointing, **extra)
    settings = {key: value for key, value in settings.items() if value is not None}
    cli = [f"{key}={value}" for key, value in settings.items()]
    proc = launch(2, ["-m", "manpp", "train", "--quiet", "--out", str(out), *cli], out, clean_env(), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=False)
    assert ckpt["world_size"] == 2 and ckpt["step"] == 3 and len(ckpt["rng_ranks"]) == 2
    assert sorted(p.name for p in out.iterdir()) == ["best.pt", "checkpoint.pt", "config.yaml", "log.csv",
                                                     "summary.json"]

    cfg = C.TrainConfig(**dict(settings, checkpointing="off", step_in_backward=False))
    reference = _reference(cfg, world=2).state_dict()
    saved = ckpt["model"]
    assert saved.keys() == reference.keys()
    trained = [k for k in saved if "backbone.units.0." in k and k.endswith("weight")]
    assert trained
    for name, value in reference.items():
        if name.endswith("num_batches_tracked"):
            continue
        assert torch.allclose(saved[name], value, atol=1e-5, rtol=1e-4), f"{name} differs from the reference"
    # ... and a reference that ignores one of the shards does not match: the check can fail
    lonely = _reference(cfg, world=1).state_dict()
    assert any(not torch.allclose(saved[n], lonely[n], atol=1e-5, rtol=1e-4) for n in trained)


def test_a_mismatched_global_batch_fails_before_any_work(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(ManppError, match="cannot be split evenly across 3 processes"):
        train(C.TrainConfig(**CFG, k=2))


def test_loss_scaling_leaves_gradients_unchanged(batch):
    """fp16 path of the engine: every local loss scaled by one factor, gradients unscaled once."""
    x, y = batch
    torch.manual_seed(0)
    model = manpp.local_model(manpp.build_backbone("resnet8", num_classes=10), method="manpp", k=3, objective="dgl")
    twin = copy.deepcopy(model)
    model.train_step(x, y)
    twin.train_step(x, y, scaler=lambda loss: loss * 1024.0)
    for p, q in zip(model.parameters_to_optimize(), twin.parameters_to_optimize()):
        if p.grad is None:
            assert q.grad is None
            continue
        assert torch.allclose(p.grad, q.grad / 1024.0, atol=1e-6, rtol=1e-4)
    for a, b in zip(model.buffers(), twin.buffers()):  # EMA copies and BN statistics are not scaled
        assert torch.equal(a, b)


HANG = """
import os, sys, time, torch
from manpp import distributed as D
D.setup(torch.device('cpu'), 'gloo', timeout_s=float(sys.argv[1]))
if D.rank() == 1:
    time.sleep(60)  # alive, but never joins the collective
started = time.perf_counter()
try:
    D.all_reduce_sum(torch.ones(3))
except Exception as exc:
    print(f"failed after {time.perf_counter() - started:.1f} s: {type(exc).__name__}", flush=True)
    os._exit(3)
os._exit(0)
"""


@pytest.mark.slow
def test_a_hung_process_makes_the_others_fail_after_dist_timeout():
    """Rank 1 stays alive but never reaches the all-reduce: rank 0 fails after dist_timeout seconds
    (torch's default would be 30 minutes)."""
    port = str(free_port())
    procs = []
    for rank in (0, 1):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=port, OMP_NUM_THREADS="1")
        procs.append(subprocess.Popen([sys.executable, "-c", HANG, "3"], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.DEVNULL, text=True))
    try:
        out, _ = procs[0].communicate(timeout=45)
    finally:
        procs[1].kill()
        procs[1].wait()
    assert procs[0].returncode == 3, out
    seconds = float(out.split("failed after ")[1].split(" s")[0])
    assert 2.0 <= seconds < 30.0, out


def test_dist_timeout_reaches_the_process_group(monkeypatch):
    """The trainer passes the config's dist_timeout to init_process_group."""
    import datetime

    import torch.distributed as dist

    seen = {}
    monkeypatch.setattr(dist, "init_process_group", lambda **kw: seen.update(kw))
    for name, value in dict(WORLD_SIZE="2", RANK="0", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                            MASTER_PORT="1").items():
        monkeypatch.setenv(name, value)
    from manpp.base import distributed as D

    monkeypatch.setattr(D, "is_initialized", lambda: False)
    assert D.setup(torch.device("cpu"), "gloo", timeout_s=42.0)
    assert seen["timeout"] == datetime.timedelta(seconds=42)


def test_a_module_s_gradients_are_final_when_after_module_runs(batch):
    """What makes overlapping safe: when after_module(j) is called, module j's gradients are those
    the optimizer will see (later modules never touch them), and the modules' parameter groups
    cover every optimized parameter once."""
    x, y = batch
    model = manpp.local_model(manpp.build_backbone("resnet8", num_classes=10), method="manpp", k=3, objective="dgl")
    groups = [model.module_parameters(j) for j in range(model.k)]
    ids = [id(p) for g in groups for p in g]
    assert len(ids) == len(set(ids)) and set(ids) == {id(p) for p in model.parameters_to_optimize()}
    snapshots = {}

    def snapshot(j):
        snapshots[j] = [p.grad.clone() for p in groups[j] if p.grad is not None]
        assert all(p.grad is None for later in groups[j + 1:] for p in later)  # not reached yet

    model.train_step(x, y, after_module=snapshot)
    assert sorted(snapshots) == [0, 1, 2]
    for j, group in enumerate(groups):
        final = [p.grad for p in group if p.grad is not None]
        assert final and len(final) == len(snapshots[j])
        assert all(torch.equal(a, b) for a, b in zip(snapshots[j], final))
    reducer = D.OverlappedReducer(groups, model.parameters_to_optimize())
    assert reducer.rest == []


ABORTS_ONCE = """
import os, sys
from pathlib import Path
out, mode = Path(sys.argv[1]), sys.argv[2]
seen = out.with_name(out.name + ".seen")  # outlives the folder that the retry moves aside
first = not seen.exists()
seen.touch()
out.mkdir()
if mode == "abort" and first:
    print("terminate called without an active exception", file=sys.stderr, flush=True)
    os.abort()
if mode == "error":
    sys.exit("a Python error")
"""


@pytest.mark.slow
def test_launch_runs_again_only_after_gloos_abort(tmp_path):
    """The test helper's one retry (tests/torchrun_launch.py): a launch whose process aborts in C++ runs
    again with the first folder kept aside and a warning; any other failure is returned as it is."""
    program = tmp_path / "program.py"
    program.write_text(ABORTS_ONCE)
    out = tmp_path / "run"
    with pytest.warns(UserWarning, match="aborted in C\\+\\+.*no summary"):
        proc = launch(1, [str(program), str(out), "abort"], out, clean_env(), timeout=120)
    assert proc.returncode == 0 and out.is_dir() and (tmp_path / "run-aborted").is_dir()
    failed = tmp_path / "failed"
    proc = launch(1, [str(program), str(failed), "error"], failed, clean_env(), timeout=120)
    assert proc.returncode != 0 and not (tmp_path / "failed-aborted").exists()
    aborted = tmp_path / "kept"
    proc = launch(1, [str(program), str(aborted), "abort"], aborted, clean_env(), timeout=120, retry_abort=False)
    assert proc.returncode != 0 and not (tmp_path / "kept-aborted").exists()
