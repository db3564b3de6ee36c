"""The life of one training call (:func:`manpp.train.loop._train`, whatever its step strategy: data parallel
or pipelined).

1. :meth:`RunLifecycle.claim`: rank 0 locks and checks the run folder; its refusal reaches every
   process as the same one line.
2. The trainer builds everything and loads the checkpoint (every check that can fail).
3. :meth:`RunLifecycle.begin`: only now is the folder written (:meth:`manpp.run.rundir.RunFolder.begin`).
   A stop signal that arrived while building ends the call here, with nothing written.
4. :meth:`RunLifecycle.save` after each evaluation or at a stop: the checkpoint, the log, ``best.pt``.
5. :meth:`RunLifecycle.end` records how the run ended. Inside :meth:`RunLifecycle.guard` every other
   way out is recorded too: a divergence (``diverged``), a hard interrupt (``stopped``), an error
   (``failed``, the traceback kept for a bug). A run that replaced another with ``--overwrite`` and
   fails before its first checkpoint puts the other back instead.
"""

from __future__ import annotations

import contextlib
import dataclasses
import shlex
from pathlib import Path
from typing import Callable

import torch

from ..base import distributed as D
from ..base.checkpoint import CHECKPOINT, run_identity
from ..base.console import release_warnings
from ..base.errors import ManppError
from ..base.safeio import first_line
from ..config import trainconfig as C
from .rundir import RunFolder
from .stopsignals import StopSignals, exit_code, signal_name


class Diverged(Exception):
    """A loss, a weight or the test score stopped being finite."""


def on_main(action: Callable[[], None]) -> None:
    """Run ``action`` on rank 0; when it fails, every process fails with the same line."""
    if not D.is_initialized():
        if D.is_main():
            action()
        return
    error, failure = None, None
    if D.is_main():
        try:
            action()
        except BaseException as exc:  # noqa: BLE001 - told to the others, then raised here as it is
            failure = exc
            text = str(exc) if isinstance(exc, ManppError) else f"rank 0 failed: {type(exc).__name__}: {first_line(exc)}"
            error = (text, getattr(exc, "exit_code", 1))
    error = D.broadcast_object(error)
    if failure is not None:
        raise failure
    if error is not None:
        raise ManppError(error[0], exit_code=error[1])


def agreed_signal(signum: int) -> int:
    """The stop signal any process received (0: none), the same on every process."""
    if not D.is_initialized():
        return signum
    return next((s for s in D.gather_objects(int(signum)) if s), 0)


@dataclasses.dataclass
class Position:
    """Where a run stands: a fresh start, or what a checkpoint holds."""

    epoch: int = 0
    step: int = 0
    batch_in_epoch: int = 0
    history: list = dataclasses.field(default_factory=list)
    memory: dict | None = None
    partial: dict | None = None  # the running sums of an epoch a stop signal cut short

    @classmethod
    def of(cls, ckpt: dict | None) -> "Position":
        if ckpt is None:
            return cls()
        return cls(ckpt["epoch"], ckpt["step"], ckpt["batch_in_epoch"], ckpt["history"], ckpt.get("memory"),
                   ckpt.get("partial"))

    def take_partial(self, width: int) -> tuple:
        """``(sums, batches, skipped, seconds)`` to start an epoch from: zero, or what a stop signal left
        (taken once: the next epoch starts from zero)."""
        partial, self.partial = self.partial, None
        if partial is None:
            return torch.zeros(width, dtype=torch.float64), 0, 0, 0.0
        return (partial["sums"].clone().double(), int(partial["batches"]), int(partial.get("skipped", 0)),
                float(partial["seconds"]))


def ending(cfg: C.TrainConfig, out: Path, epoch: int, step: int, batch_in_epoch: int, signum: int) -> tuple:
    """``(status, reason)`` of a run that left its loop normally."""
    where = f"after epoch {epoch}" if batch_in_epoch == 0 else f"in epoch {epoch + 1}"
    folder = shlex.quote(str(out))  # a command a shell takes as printed, whatever the folder's name
    if signum:
        return "stopped", (f"{signal_name(signum)} at step {step}, {where} of {cfg.epochs}; the checkpoint holds "
                           f"step {step}: continue with --resume {folder}")
    if epoch >= cfg.epochs:
        return "finished", None
    return "stopped", (f"max_steps {cfg.max_steps} reached at step {step}, {where} of {cfg.epochs}: continue with "
                       f"--resume {folder}")


class RunLifecycle:
    """One training call in its run folder; rank 0 writes, every process takes part in the decisions."""

    def __init__(self, out: Path, *, resume: bool, overwrite: bool, ckpt: dict | None, stop: StopSignals,
                 command: str = "manpp train"):
        self.out = Path(out)
        self.ckpt = ckpt
        self.stop = stop
        self.main = D.is_main()
        self.folder = RunFolder(out, resume=resume, overwrite=overwrite, command=command) if self.main else None
        self.best: float | None = None
        self.step = ckpt["step"] if ckpt else 0  # the trainer keeps this current, for the messages
        self.summarize: Callable[..., dict] | None = None  # (status, reason, **extra) -> summary; set once built
        self.history: list[dict] | None = None  # the evaluations so far (the trainer's list)
        self.saved_rows = len(ckpt["history"]) if ckpt else 0  # the evaluations the checkpoint on disk holds
        self.run: dict | None = (ckpt or {}).get("run")  # drawn at begin for a new run (or a checkpoint without)
        self.ended = False

    def claim(self) -> None:
        on_main(lambda: self.folder.claim(self.ckpt))

    def begin(self, cfg, history: list[dict]) -> None:
        signum = agreed_signal(self.stop.signum)
        if signum:
            self._release()
            raise ManppError(f"{signal_name(signum)} received before training started: nothing was trained or "
                             f"written", exit_code=exit_code(signum))
        if self.run is None:
            self.run = D.broadcast_object(run_identity(cfg.seed, C.config_text(C.run_config(cfg))) if self.main
                                          else None)
        on_main(lambda: self.folder.begin(cfg, history, self.run["id"]))
        release_warnings()  # the checks passed: what they warned about matters now
        # the score to beat is best.pt's: a best.pt lost (or left older than the best evaluation, by a full
        # disk) is written again at the next evaluation that beats what it holds
        self.best = self.folder.best_score if self.main else None

    def save(self, checkpoint: dict, history: list[dict], score: float | None = None,
             best: Callable[[], dict] | None = None) -> None:
        """Rank 0: the checkpoint, the log, and ``best.pt`` when ``score`` beats the best so far."""
        keep_best = score is not None and best is not None and (self.best is None or score > self.best)
        self.folder.save({**checkpoint, "run": self.run}, history, {**best(), "run": self.run} if keep_best else None)
        self.saved_rows = len(history)
        if keep_best:
            self.best = score

    def end(self, status: str, reason: str | None, **extra) -> dict:
        result = self._summary(status, reason, **extra)
        if self.main:
            try:
                self.folder.end(result)
            finally:
                self._release()
        self.ended = True
        return result

    def _summary(self, status: str, reason: str | None, **extra) -> dict:
        return {**self.summarize(status, reason, **extra), "run_id": (self.run or {}).get("id")}

    def _release(self) -> None:
        if self.main:
            self.folder.release()
        self.ended = True

    def fail(self, status: str, reason: str) -> str:
        """After an exception: record it in ``summary.json``, or put back the run this one was replacing
        (it never checkpointed); release the folder. Returns what to add to the error message."""
        if not self.main or self.ended:
            self.ended = True
            return ""
        note = ""
        try:
            if self.folder.began:
                if self.folder.abort():
                    note = f"; the run that was in '{self.out}' before --overwrite is back in place"
                elif self.summarize is not None:
                    try:
                        if self.history is not None:
                            if status != "diverged":  # the records claim no evaluation the checkpoint lacks
                                del self.history[self.saved_rows:]
                            self.folder.write_log(self.history)  # (a diverged row stays: it shows where)
                        self.folder.end(self._summary(status, reason))
                    except ManppError:
                        pass  # the disk that failed the run may fail this too: the error says why
        finally:
            self._release()
        return note

    @contextlib.contextmanager
    def guard(self):
        """Every way out of the training call, recorded (see the module docstring)."""
        try:
            yield self
        except Diverged as exc:
            note = self.fail("diverged", str(exc))
            kept = (f"the checkpoint in {self.out} is the last finite one" if (self.out / CHECKPOINT).exists()
                    else f"no checkpoint was kept in {self.out}")
            raise ManppError(f"{exc} ({kept}; summary.json says status diverged){note}" if not note
                             else f"{exc}{note}") from None
        except KeyboardInterrupt:
            self.fail("stopped", f"interrupted at step {self.step}; the checkpoint holds the last one saved: resume "
                                 f"with --resume {shlex.quote(str(self.out))}")
            raise
        except ManppError as exc:
            note = self.fail("failed", str(exc))
            if note:
                raise ManppError(f"{exc}{note}", exit_code=exc.exit_code) from None
            raise
        except BaseException as exc:
            self.fail("failed", f"{type(exc).__name__}: {first_line(exc)}")
            raise


__all__ = ["Diverged", "Position", "RunLifecycle", "agreed_signal", "ending", "on_main"]
