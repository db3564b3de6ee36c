"""Runs you can trust: nothing is destroyed before everything is checked, one writer per folder,
every way a run ends is recorded, the folder's files agree, export checks what it writes, and every
failure is one line. Faults are injected into real ``manpp`` processes (tests/fault_runner.py):
signals at several points of an epoch and during a checkpoint write, ``kill -9`` between the files
of a save, a full disk, a read-only folder, two processes on one folder, a closed stdout."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from manpp.commands.cli import main
from manpp.base.errors import ManppError
from torchrun_launch import clean_env, launch

RUNNER = Path(__file__).with_name("fault_runner.py")
# resnet8 on 64 generated images: 4 steps per epoch, 2 epochs
RUN = ["--model", "resnet8", "--dataset", "synthetic", "--method", "manpp", "--k", "2", "--batch-size", "16",
       "--device", "cpu", "--quiet", "--epochs", "2", "train_subset=64", "test_subset=64", "eval_batch_size=64",
       "warmup_epochs=0"]


def train(out, *extra) -> int:
    return main(["train", *RUN, "--out", str(out), *extra])


def fault(spec: str, *args, env=None, **kw) -> subprocess.CompletedProcess:
    """``manpp ARGS`` in a fresh process with the fault ``spec`` injected (see fault_runner.py)."""
    return subprocess.run([sys.executable, str(RUNNER), spec, "--", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=240, **kw)


def fault_train(spec: str, out, *extra, **kw) -> subprocess.CompletedProcess:
    return fault(spec, "train", *RUN, "--out", str(out), *extra, **kw)


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` with a hash of its bytes (the lock file aside)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != ".manpp.lock"}


def summary(out) -> dict:
    return json.loads((Path(out) / "summary.json").read_text())


def ckpt(out) -> dict:
    return torch.load(Path(out) / "checkpoint.pt", map_location="cpu", weights_only=True)


def log_epochs(out) -> list[str]:
    return [line.split(",")[0] for line in (Path(out) / "log.csv").read_text().splitlines()[1:]]


def one_line(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A finished run (2 epochs), never written again: tests work on copies."""
    out = tmp_path_factory.mktemp("base") / "finished"
    assert train(out) == 0
    return out


def copy_of(run: Path, tmp_path: Path, name: str = "R") -> Path:
    target = tmp_path / name
    shutil.copytree(run, target)
    return target


def same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


# --- 1. nothing is destroyed before everything is checked -------------------------------------

def _truncated_fashion(folder: Path) -> Path:
    """Fashion-MNIST IDX files whose training images stop halfway through their header's count."""
    import struct

    folder.mkdir()
    for name, n in (("train", 8), ("t10k", 4)):
        images = struct.pack(">IIII", 2051, n, 28, 28) + bytes(28 * 28 * n)
        if name == "train":
            images = images[:len(images) // 2]
        (folder / f"{name}-images-idx3-ubyte").write_bytes(images)
        (folder / f"{name}-labels-idx1-ubyte").write_bytes(struct.pack(">II", 2049, n) + bytes(n))
    return folder


BAD_INPUT = {
    "k_too_large": ["--k", "17", "--max-steps", "2"],
    "unknown_model": ["--model", "nope"],
    "unknown_heads_key": ["heads.nope=1"],
    "batch_larger_than_data": ["--batch-size", "128"],
    "truncated_dataset": ["--dataset", "fashion-mnist", "--data-dir", "{fashion}"],
    "pretrained_missing": ["--model", "resnet18", "pretrained=/nonexistent.pt"],
}


@pytest.mark.parametrize("bad", list(BAD_INPUT), ids=list(BAD_INPUT))
def test_overwrite_with_bad_input_leaves_the_old_run_untouched(finished, tmp_path, capsys, bad):
    out = copy_of(finished, tmp_path)
    before = snapshot(out)
    fashion = _truncated_fashion(tmp_path / "fashion") if bad == "truncated_dataset" else None
    extra = [a.replace("{fashion}", str(fashion)) for a in BAD_INPUT[bad]]
    assert train(out, "--overwrite", *extra) == 2
    one_line(capsys.readouterr().err)
    assert snapshot(out) == before
    assert not (out / ".replaced").exists()


@pytest.mark.slow
def test_overwrite_keeps_the_old_run_until_the_new_one_checkpoints(finished, tmp_path, capsys):
    out = copy_of(finished, tmp_path)
    before = snapshot(out)
    # the new run diverges at its first step, before any checkpoint: the old run comes back
    assert train(out, "--overwrite", "lr=1e38", "--max-steps", "1") == 2
    assert "before --overwrite is back in place" in one_line(capsys.readouterr().err)
    assert snapshot(out) == before and not (out / ".replaced").exists()
    # killed (kill -9) while writing its first checkpoint: the old run is in .replaced/, and the next
    # command on the folder puts it back
    proc = fault_train("KILL@save:1", out, "--overwrite", "--k", "3")
    assert proc.returncode == -signal.SIGKILL
    assert (out / ".replaced" / "checkpoint.pt").exists()
    assert train(out) == 2  # refused: the old run (which has weights) is back
    assert "already holds a run (finished)" in one_line(capsys.readouterr().err)
    assert snapshot(out) == before
    # a replacement that checkpoints commits: the old run is gone, the new one is whole
    assert train(out, "--overwrite", "--k", "3") == 0
    assert not (out / ".replaced").exists() and ckpt(out)["config"]["k"] == 3
    assert log_epochs(out) == ["1", "2"]


# --- 2. one writer per run folder ------------------------------------------------------------

HOLD = ("import sys, time\nfrom manpp.run.runlock import FolderLock\nlock = FolderLock(sys.argv[1], 'test holder')"
        ".acquire()\nprint('held', flush=True)\ntime.sleep(60)\n")


def test_a_locked_folder_is_refused_at_once_and_a_dead_holder_blocks_nobody(tmp_path):
    from manpp.run.runlock import FolderLock

    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(ManppError, match=rf"is in use by process {holder.pid} \(test holder"):
            FolderLock(tmp_path).acquire()
        assert train(tmp_path, "--max-steps", "1") == 2  # the CLI says the same, before building anything
    finally:
        holder.kill()
        holder.wait()
    assert (tmp_path / ".manpp.lock").exists()  # left behind by the killed holder ...
    lock = FolderLock(tmp_path).acquire()  # ... and no obstacle
    lock.release()
    assert not (tmp_path / ".manpp.lock").exists()


@pytest.mark.slow
def test_two_trainings_started_on_one_folder(tmp_path):
    out = tmp_path / "R"
    cmd = [sys.executable, "-m", "manpp", "train", *RUN, "--out", str(out), "train_subset=256", "--epochs", "3"]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(p.pid, p.wait(timeout=240), p.stderr.read()) for p in procs]
    codes = sorted(code for _, code, _ in results)
    assert codes == [0, 2], results
    winner = next(pid for pid, code, _ in results if code == 0)
    loser_err = next(err for _, code, err in results if code == 2)
    assert f"is in use by process {winner}" in one_line(loser_err)
    saved = ckpt(out)
    assert saved["config"]["out"] == str(out) and log_epochs(out) == ["1", "2", "3"]
    assert summary(out)["status"] == "finished" and not list(out.glob(".*.tmp"))


# --- 3. every way a run ends is recorded -----------------------------------------------------

SIGNAL_POINTS = {  # fault: (exit code, the step the checkpoint holds)
    "SIGTERM@step:2": (143, 2),  # mid-epoch: checkpoint at once, no evaluation
    "SIGTERM@step:4": (143, 4),  # the epoch's last step: its evaluation and checkpoint, then stop
    "SIGTERM@eval:1": (143, 4),  # during the evaluation
    "SIGTERM@save:1": (143, 4),  # during the checkpoint write: it completes
    "SIGUSR1@step:6": (138, 6),
    "SIGINT@step:3": (130, 3),
}


@pytest.mark.parametrize("spec", list(SIGNAL_POINTS))
def test_a_signal_stops_after_the_step_with_a_checkpoint_and_resume_is_exact(finished, tmp_path, capsys, monkeypatch,
                                                                              spec):
    """The signal is real (sent to this process at the chosen moment); the run's own handler takes it."""
    from fault_runner import install

    code, step = SIGNAL_POINTS[spec]
    out = tmp_path / "R"
    install(spec, patch=monkeypatch.setattr)
    assert train(out) == code
    monkeypatch.undo()
    name = spec.split("@")[0]
    assert f"stopped: {name} at step {step}" in capsys.readouterr().out
    s = summary(out)
    assert s["status"] == "stopped" and s["signal"] == code - 128 and name in s["reason"], s
    assert ckpt(out)["step"] == step
    assert train(out.parent / "unused", "--resume", str(out)) == 2  # --out elsewhere is refused ...
    assert main(["train", "--resume", str(out), "--quiet"]) == 0  # ... a plain resume ends the run
    assert summary(out)["status"] == "finished"
    same_weights(ckpt(finished)["model"], ckpt(out)["model"])  # as if never stopped
    assert log_epochs(out) == ["1", "2"]  # one row per epoch: the cut epoch's sums were kept


def test_sigterm_ends_a_real_process_with_143_and_a_checkpoint(tmp_path):
    out = tmp_path / "R"
    proc = fault_train("SIGTERM@step:2", out)
    assert proc.returncode == 143 and "Traceback" not in proc.stderr
    assert "SIGTERM received: stopping after this step" in proc.stderr
    assert summary(out)["status"] == "stopped" and ckpt(out)["step"] == 2


@pytest.mark.slow
def test_a_resumed_run_never_leaves_a_stale_summary(finished, tmp_path, monkeypatch):
    from fault_runner import install

    out = copy_of(finished, tmp_path)
    install("SIGTERM@step:2", patch=monkeypatch.setattr)
    assert main(["train", "--resume", str(out), "epochs=3", "--quiet"]) == 143
    monkeypatch.undo()
    assert summary(out)["status"] == "stopped" and ckpt(out)["step"] == 10
    proc = fault("KILL@step:1", "train", "--resume", str(out), "--quiet")  # kill -9: no handler runs
    assert proc.returncode == -signal.SIGKILL
    from manpp.run.rundir import status_of

    assert summary(out)["status"] == "running" and status_of(out).startswith("killed")


@pytest.mark.slow
def test_a_run_killed_before_its_first_checkpoint_can_be_resumed_or_replaced(finished, tmp_path, capsys):
    out = tmp_path / "R"
    assert fault_train("KILL@step:2", out).returncode == -signal.SIGKILL
    assert (out / "config.yaml").exists() and not (out / "checkpoint.pt").exists()
    copy = copy_of(out, tmp_path, "copy")
    assert main(["train", "--resume", str(out), "--quiet"]) == 0  # starts afresh from its config.yaml
    same_weights(ckpt(finished)["model"], ckpt(out)["model"])
    assert train(copy) == 0  # or is replaced without --overwrite: it had nothing to lose
    assert summary(copy)["status"] == "finished" and not (copy / ".replaced").exists()


@pytest.mark.slow
def test_torchrun_ranks_stop_together_when_one_gets_the_signal(tmp_path):
    out = tmp_path / "R"
    program = [str(RUNNER), "SIGTERM@step:3", "--", "train", *RUN, "--out", str(out)]
    proc = launch(2, program, out, clean_env(FAULT_RANK="1"), timeout=240, retry_abort=False)  # rank 1 signalled
    assert proc.returncode != 0  # torchrun reports its workers' exit 143
    assert summary(out)["status"] == "stopped" and summary(out)["signal"] == signal.SIGTERM
    assert ckpt(out)["step"] == 3 and len(ckpt(out)["rng_ranks"]) == 2  # both ranks, after the same step


# --- 4. a run's files agree with each other --------------------------------------------------

@pytest.mark.parametrize("spec", ["KILL@save:3", pytest.param("KILL@saved:3", marks=pytest.mark.slow), "KILL@log:1"])
def test_a_kill_between_the_files_of_a_save_never_duplicates_or_loses_a_log_row(finished, tmp_path, spec):
    """save 3 is epoch 2's checkpoint (1 and 2: epoch 1's checkpoint and best.pt); log 1 is epoch 1's log."""
    out = tmp_path / "R"
    assert fault_train(spec, out).returncode == -signal.SIGKILL
    assert main(["train", "--resume", str(out), "--quiet"]) == 0
    assert not list(out.glob(".*.tmp"))  # what a kill mid-write left is cleared
    assert log_epochs(out) == ["1", "2"]
    same_weights(ckpt(finished)["model"], ckpt(out)["model"])


def test_a_checkpoint_of_another_run_dropped_in_is_refused_before_any_work(finished, tmp_path, capsys):
    out = tmp_path / "R"
    assert train(out, "--max-steps", "4") == 0  # stopped after epoch 1 of 2
    other = tmp_path / "S"
    assert train(other, "--k", "3", "--max-steps", "4") == 0
    shutil.copy(other / "checkpoint.pt", out / "checkpoint.pt")
    before = snapshot(out)
    started = time.perf_counter()
    assert main(["train", "--resume", str(out), "--quiet"]) == 2
    assert "mixes two runs: k is 3 in checkpoint.pt but 2 in config.yaml" in one_line(capsys.readouterr().err)
    assert snapshot(out) == before and time.perf_counter() - started < 5


def _flip(path: Path, seed: int, n: int = 20) -> None:
    """``n`` bytes of ``path``'s tensor data (the zip entries under data/) changed, at distinct places."""
    import random
    import struct
    import zipfile

    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as archive:
        spans = []
        for info in archive.infolist():
            if "/data/" in info.filename and info.file_size:
                name_len, extra_len = struct.unpack("<HH", data[info.header_offset + 26:info.header_offset + 30])
                start = info.header_offset + 30 + name_len + extra_len  # past the entry's local header
                spans += range(start, start + info.file_size)
    rng = random.Random(seed)
    for at in rng.sample(spans, n):
        data[at] ^= rng.randrange(1, 256)
    path.write_bytes(bytes(data))


def test_a_checkpoint_with_flipped_bits_is_refused(finished, tmp_path, capsys):
    """20 changed bytes in the tensors of 10 copies: every one is refused by resume, export and predict's
    loader, in one line that says it is damaged (torch.load alone read 9 of 10 such files)."""
    from manpp.base.checkpoint import load

    for seed in range(10):
        out = copy_of(finished, tmp_path, f"R{seed}")
        _flip(out / "checkpoint.pt", seed)
        before = snapshot(out)
        assert main(["train", "--resume", str(out), "epochs=3", "--quiet"]) == 2
        assert "it is damaged" in one_line(capsys.readouterr().err)
        assert main(["export", str(out), "--out", str(tmp_path / f"e{seed}.pt")]) == 2
        assert "it is damaged" in one_line(capsys.readouterr().err)
        assert snapshot(out) == before and not (tmp_path / f"e{seed}.pt").exists()
    _flip(out / "best.pt", 0)
    with pytest.raises(ManppError, match="damaged"):
        load(out / "best.pt", purpose="weights")


def test_a_checkpoint_of_another_run_with_the_same_config_is_refused(tmp_path, capsys):
    """Same config and another seed, or the same seed too: the run identity tells them apart."""
    out = tmp_path / "R"
    assert train(out, "--max-steps", "4") == 0
    for name, extra in (("seed1", ["seed=1"]), ("again", [])):
        other = tmp_path / name
        assert train(other, "--max-steps", "4", *extra) == 0
        copy = copy_of(out, tmp_path, f"R-{name}")
        shutil.copy(other / "checkpoint.pt", copy / "checkpoint.pt")
        before = snapshot(copy)
        assert main(["train", "--resume", str(copy), "--quiet"]) == 2
        line = one_line(capsys.readouterr().err)
        assert "mixes two runs: its checkpoint.pt was written by run" in line and "summary.json by run" in line
        assert snapshot(copy) == before
    # checkpoint.pt and summary.json of one run, best.pt of another
    copy = copy_of(out, tmp_path, "R-best")
    shutil.copy(tmp_path / "again" / "best.pt", copy / "best.pt")
    assert main(["train", "--resume", str(copy), "--quiet"]) == 2
    assert "its best.pt by run" in one_line(capsys.readouterr().err)
    assert main(["train", "--resume", str(out), "--quiet"]) == 0  # its own files: it resumes
    assert summary(out)["run_id"] == ckpt(out)["run"]["id"] == torch.load(out / "best.pt")["run"]["id"]


def _failing_save(monkeypatch, fail):
    """rundir's checkpoint writes, failing as a full disk does where ``fail(kind, n)`` says (n counts writes)."""
    import errno

    from manpp.run import rundir
    from manpp.base.safeio import io_error

    real, count = rundir.save_checkpoint, {"n": 0}

    def save(payload, path, kind="checkpoint"):
        count["n"] += 1
        if fail(kind, count["n"]):
            raise io_error(OSError(errno.ENOSPC, "No space left on device"), path, "write")
        return real(payload, path, kind=kind)

    monkeypatch.setattr(rundir, "save_checkpoint", save)


def test_records_never_claim_an_epoch_the_checkpoint_lacks(tmp_path, monkeypatch, capsys):
    out = tmp_path / "R"
    with monkeypatch.context() as m:
        _failing_save(m, lambda kind, n: kind == "checkpoint" and n > 2)  # epoch 2's checkpoint: disk full
        assert train(out) == 2
    assert "the disk is full" in one_line(capsys.readouterr().err)
    assert ckpt(out)["epoch"] == 1 and log_epochs(out) == ["1"]
    assert summary(out)["status"] == "failed" and summary(out)["epochs"] == 1


def test_a_best_pt_lost_to_a_full_disk_is_written_again(tmp_path, monkeypatch, capsys):
    from manpp.base.checkpoint import checksum

    out = tmp_path / "R"
    with monkeypatch.context() as m:
        _failing_save(m, lambda kind, n: kind == "best")
        assert train(out) == 2
    capsys.readouterr()
    assert not (out / "best.pt").exists() and ckpt(out)["epoch"] == 1
    state = ckpt(out)  # its log records a score no later epoch beats: best.pt must still come back
    state["history"][0]["test_score"] = 2.0
    torch.save(dict(state, checksum=checksum(state)), out / "checkpoint.pt")
    assert main(["train", "--resume", str(out), "--quiet"]) == 0
    best = torch.load(out / "best.pt")
    assert best["epoch"] == 2 and best["run"]["id"] == ckpt(out)["run"]["id"]


def test_unchanged_files_are_not_rewritten_on_resume(tmp_path):
    out = tmp_path / "R"
    assert train(out, "--max-steps", "2") == 0
    config = (out / "config.yaml").stat().st_mtime_ns
    assert main(["train", "--resume", str(out), "--max-steps", "3", "--quiet"]) == 0
    assert (out / "config.yaml").stat().st_mtime_ns == config


# --- 5. export checks what it writes ---------------------------------------------------------

@pytest.mark.parametrize("target,extra", [("checkpoint.pt", []), ("best.pt", ["--best"]),
                                          ("checkpoint.safetensors", []), ("best.safetensors", ["--best"]),
                                          ("checkpoint.pt", ["--force"])])
def test_export_never_writes_onto_a_runs_files(finished, tmp_path, capsys, target, extra):
    out = copy_of(finished, tmp_path)
    before = snapshot(out)
    assert main(["export", str(out), "--out", str(out / target), *extra]) == 2
    assert "export never writes onto a run's files" in one_line(capsys.readouterr().err)
    assert snapshot(out) == before


def test_export_refuses_existing_files_unless_forced_and_names_them(finished, tmp_path, capsys):
    pt, st = tmp_path / "b.pt", tmp_path / "b.safetensors"
    st.write_bytes(b"mine")  # a file the user never named on the command line
    assert main(["export", str(finished), "--out", str(pt)]) == 2
    err = one_line(capsys.readouterr().err)
    assert f"{st} already exists" in err and str(pt) in err and "--force" in err
    assert st.read_bytes() == b"mine" and not pt.exists()
    assert main(["export", str(finished), "--out", str(pt), "--force"]) == 0
    assert f"wrote {pt} and {st}" in capsys.readouterr().out
    umask = os.umask(0)
    os.umask(umask)
    assert pt.stat().st_mode & 0o777 == st.stat().st_mode & 0o777 == 0o666 & ~umask


def test_export_refuses_a_diverged_run_and_weights_that_are_not_finite(finished, tmp_path, capsys):
    out = copy_of(finished, tmp_path)
    assert main(["train", "--resume", str(out), "epochs=3", "lr=1e38", "--quiet"]) == 2  # diverges in epoch 3
    capsys.readouterr()
    assert ckpt(out)["status"] == "finished" and summary(out)["status"] == "diverged"  # the last finite one
    assert main(["export", str(out), "--out", str(tmp_path / "a.pt")]) == 2
    assert "is not finished (diverged, 2 of 2 epochs" in one_line(capsys.readouterr().err)
    with pytest.warns(UserWarning, match="diverged"):
        assert main(["export", str(out), "--out", str(tmp_path / "a.pt"), "--allow-unfinished"]) == 0
    nan = copy_of(finished, tmp_path, "nan")
    state = ckpt(nan)
    key = next(k for k in state["model"] if k.endswith("conv1.weight"))
    state["model"][key][0, 0, 0, 0] = float("nan")
    from manpp.base.checkpoint import checksum

    torch.save(dict(state, checksum=checksum(state)), nan / "checkpoint.pt")  # as a run writes it: checksummed
    assert main(["export", str(nan), "--out", str(tmp_path / "n.pt")]) == 2
    assert "are not finite" in one_line(capsys.readouterr().err) and not (tmp_path / "n.pt").exists()
    with pytest.warns(UserWarning, match="not finite"):
        assert main(["export", str(nan), "--out", str(tmp_path / "n.pt"), "--allow-nonfinite"]) == 0


# --- 6. one line for every expected failure --------------------------------------------------

def test_a_full_disk_is_one_line_and_what_was_there_survives(finished, tmp_path, capsys, monkeypatch):
    import errno

    from manpp.base import safeio

    out = tmp_path / "R"
    assert train(out, "--max-steps", "2") == 0
    before = snapshot(out)

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safeio.os, "fsync", full)
    assert main(["train", "--resume", str(out), "--quiet"]) == 2
    assert "the disk is full" in one_line(capsys.readouterr().err)
    assert snapshot(out) == before and not list(out.glob(".*.tmp"))
    fresh = tmp_path / "fresh"
    assert train(fresh) == 2  # its config.yaml cannot be written: no empty one is left behind
    assert "the disk is full" in one_line(capsys.readouterr().err)
    assert not fresh.exists()


def _can_mount() -> bool:
    if shutil.which("unshare") is None or sys.platform != "linux":
        return False
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt"],
                           capture_output=True)
    return probe.returncode == 0


@pytest.mark.slow
@pytest.mark.skipif(not _can_mount(), reason="cannot mount a tmpfs here (needs unshare and user namespaces)")
def test_a_real_full_disk_and_a_read_only_folder(finished, tmp_path):
    """In a private tmpfs too small for a second run: --overwrite fails at its checkpoint and the
    first run comes back; then read-only: --overwrite and an export into it are one line each."""
    disk = tmp_path / "disk"
    disk.mkdir()
    size_k = (finished / "checkpoint.pt").stat().st_size * 2 // 1024  # one run (1.5x) fits, not 2.5x
    manpp = f"{sys.executable} -m manpp"
    args = " ".join(RUN + ["--out", str(disk / "R")])
    script = f"""
mount -t tmpfs -o size={size_k}k tmpfs {disk} || exit 99
cp -r {finished} {disk}/R || exit 98
sha256sum {disk}/R/* > {tmp_path}/before.txt
{manpp} train {args} --overwrite 2> {tmp_path}/full.txt; echo $? > {tmp_path}/full.code
sha256sum {disk}/R/* > {tmp_path}/after.txt
ls -a {disk}/R > {tmp_path}/listing.txt
mount -o remount,ro {disk} || exit 97
{manpp} train {args} --overwrite 2> {tmp_path}/ro.txt; echo $? > {tmp_path}/ro.code
{manpp} export {disk}/R --out {disk}/b.pt 2> {tmp_path}/export.txt; echo $? > {tmp_path}/export.code
"""
    proc = subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    read = lambda name: (tmp_path / name).read_text()  # noqa: E731
    assert read("full.code").strip() == "2" and "the disk is full" in one_line(read("full.txt"))
    assert "is back in place" in read("full.txt")
    assert read("after.txt") == read("before.txt")
    assert ".replaced" not in read("listing.txt").split()
    assert read("ro.code").strip() == "2" and "read-only" in one_line(read("ro.txt"))
    assert read("export.code").strip() == "2" and "read-only" in one_line(read("export.txt"))


def test_bad_files_and_names_are_one_line_each(finished, tmp_path, capsys):
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(os.urandom(4096))
    zipped = tmp_path / "cut.pt"
    zipped.write_bytes((finished / "checkpoint.pt").read_bytes()[:5000])
    cases = [(["train", "--resume", str(empty)], "is empty (0 bytes), so it is corrupt"),
             (["train", "--resume", str(junk)], "it is not a PyTorch file, so it is corrupt"),
             (["train", "--resume", str(zipped)], "it is corrupt or cut short"),
             (["train", "--resume", str(finished / "best.pt")], "holds only the weights of the best evaluation"),
             (["export", str(junk), "--out", str(tmp_path / "x.pt")], "so it is corrupt"),
             (["train", *RUN, "--out", str(tmp_path / ("x" * 300))], "the file name is too long"),
             (["export", str(finished), "--out", str(tmp_path / ("y" * 300) / "b.pt")], "the file name is too long")]
    for argv, needle in cases:
        assert main(argv) == 2, argv
        err = one_line(capsys.readouterr().err)
        assert needle in err and "weights_only=False" not in err, (argv, err)


@pytest.mark.slow
def test_a_closed_stdout_does_not_stop_training(tmp_path):
    out = tmp_path / "R"
    cmd = [sys.executable, "-m", "manpp", "train", *[a for a in RUN if a != "--quiet"], "--out", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline()  # what `| head -1` reads, before it goes away
    proc.stdout.close()
    err = proc.stderr.read()
    assert proc.wait(timeout=240) == 0, err
    assert "Traceback" not in err and "BrokenPipe" not in err
    assert summary(out)["status"] == "finished"


def test_a_refused_resume_prints_only_the_line_that_matters(finished, tmp_path):
    """A real process: warnings go to its stderr (pytest would record them instead)."""
    out = copy_of(finished, tmp_path)
    proc = fault("none", "train", "--resume", str(out), "--method", "dgl", "epochs=3")
    assert proc.returncode == 2
    assert "method is 'manpp' there but 'dgl' here" in one_line(proc.stderr)


def test_local_model_and_wrap_refuse_what_they_cannot_cut_in_one_line():
    from torch import nn

    import manpp

    with pytest.raises(ManppError, match=r"local_model takes a backbone .* Linear .* manpp.wrap"):
        manpp.local_model(nn.Linear(3, 4), k=2)
    with pytest.raises(ManppError):
        manpp.wrap(nn.Linear(3, 4), k=2)


def test_a_signal_stops_a_comparison_before_its_next_method(tmp_path, capsys, monkeypatch):
    from fault_runner import install

    install("SIGTERM@step:2", patch=monkeypatch.setattr)
    argv = ["compare", *_without(RUN, "--method"), "--methods", "e2e,manpp", "--out", str(tmp_path / "C")]
    assert main(argv) == 143
    table = (tmp_path / "C" / "compare.md").read_text()
    assert "e2e (stopped)" in table and "manpp (not run)" in table
    assert not (tmp_path / "C" / "manpp").exists() and ckpt(tmp_path / "C" / "e2e")["step"] == 2


def _without(args: list[str], *options: str) -> list[str]:
    """``args`` less the named options and their values."""
    out, skip = [], False
    for a in args:
        if skip:
            skip = False
        elif a in options:
            skip = True
        else:
            out.append(a)
    return out


def test_compare_checks_every_method_before_it_replaces_any(tmp_path, capsys):
    argv = ["compare", *_without(RUN, "--method", "--k"), "--methods", "e2e,manpp",
            "--out", str(tmp_path / "C"), "--max-steps", "1"]
    assert main(argv) == 0
    before = snapshot(tmp_path / "C")
    assert main([*argv, "--overwrite", "--k", "17"]) == 2  # e2e ignores K; manpp's K=17 is refused first
    assert "K=17" in one_line(capsys.readouterr().err)
    assert snapshot(tmp_path / "C") == before
