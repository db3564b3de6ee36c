"""The run folder: ``config.yaml``, ``log.csv``, ``checkpoint.pt``, ``best.pt`` and ``summary.json``.

One folder holds one run, and one process writes it (:mod:`manpp.run.runlock`). A training call goes
through :class:`RunFolder` in this order, so that nothing the user has is touched before every
input has been checked:

1. :meth:`RunFolder.claim`, before anything is built: lock the folder (a second process is refused
   at once), put back a run that an interrupted ``--overwrite`` had moved aside, refuse a folder
   holding another run unless resumed or ``overwrite``, check that the folder can be written.
2. The caller builds the config, the data and the model, and loads the checkpoint into them.
3. :meth:`RunFolder.begin`, once all of that passed: move the run being replaced into
   ``.replaced/`` (not deleted yet), write ``config.yaml`` if it changed, rebuild ``log.csv`` from
   the checkpoint's history, and mark ``summary.json`` ``running``.
4. :meth:`RunFolder.save` after each evaluation (or at a stop): the checkpoint first, then
   ``log.csv`` rebuilt from the checkpoint's history, then ``best.pt``, so that the log never holds
   a row the checkpoint does not (a resume never duplicates or loses one). The first checkpoint
   commits an ``--overwrite``: the replaced run is deleted only then.
5. :meth:`RunFolder.end` writes how the run ended; :meth:`RunFolder.abort`, on a failure before the
   first checkpoint, puts the replaced run back.

A folder whose run saved no weights (no ``checkpoint.pt`` or ``best.pt``: killed or failed before
its first checkpoint) has nothing to lose: a new run replaces it without ``--overwrite``, and
``--resume`` starts it afresh from its ``config.yaml``. Every file is written atomically
(:mod:`manpp.base.safeio`).
"""

from __future__ import annotations

import csv
import io
import json
import os
import shlex
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

from ..base import distributed as D
from ..base.checkpoint import BEST, CHECKPOINT
from ..base.checkpoint import load as load_checkpoint
from ..base.checkpoint import save as save_checkpoint
from ..base.errors import ManppError
from ..base.safeio import io_error, write_if_changed, write_text
from ..config import trainconfig as C
from ..core.engine import LocalModel
from .runlock import LOCK, FolderLock, holder
from .runlog import TENSORBOARD

LOG = "log.csv"
SUMMARY = "summary.json"
CONFIG = "config.yaml"
REPLACED = ".replaced"  # where --overwrite keeps the replaced run until the new one's first checkpoint
RUN_FILES = (CONFIG, LOG, CHECKPOINT, BEST, SUMMARY)  # what makes a folder a run's (with tensorboard/)
WEIGHT_FILES = (CHECKPOINT, BEST)  # a run without these has nothing to lose


@dataclass
class RunResult:
    summary: dict
    model: LocalModel
    out: Path

    @property
    def signal(self) -> int:
        """The signal that stopped the run (0: none)."""
        return int(self.summary.get("signal") or 0)


def folder_of(resume: str | Path) -> Path:
    """The run folder of ``--resume PATH`` (the folder itself, or the folder holding the checkpoint file)."""
    path = Path(resume)
    return path if path.is_dir() else path.parent


def run_folder(cfg: C.TrainConfig, resume: str | Path | None = None) -> Path:
    """A resumed run's folder, else ``cfg.out``, by default ``runs/<name>``. The same on every process."""
    out = folder_of(resume) if resume else Path(cfg.out or Path("runs") / cfg.run_name())
    return Path(D.broadcast_object(str(out)))


def holds_run(folder: Path) -> list[str]:
    """The run files in ``folder`` (none: it holds no run)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return [name for name in RUN_FILES if (folder / name).exists()] + \
        ([TENSORBOARD] if (folder / TENSORBOARD).is_dir() else [])


def has_weights(folder: Path) -> bool:
    """Whether the run in ``folder`` saved any weights (otherwise it has nothing to lose)."""
    return any((Path(folder) / name).exists() for name in WEIGHT_FILES)


def read_summary(folder: Path) -> dict | None:
    try:
        data = json.loads((Path(folder) / SUMMARY).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def status_of(folder: Path) -> str:
    """How the run in ``folder`` stands, in words: its summary's status, ``running (process N)``
    while a process holds the folder, or ``killed`` when its process ended without a word."""
    data = read_summary(folder)
    status = data.get("status") if data else None
    if status == "running":
        owner = holder(folder)
        return f"running ({owner})" if owner else "killed: its process ended without recording how"
    if status:
        return str(status)
    if (Path(folder) / CHECKPOINT).exists():
        return "unfinished: no summary"
    return "no status"


def resume_source(path: str | Path) -> tuple[dict | None, dict]:
    """What ``--resume PATH`` continues: ``(checkpoint, its config)``, or ``(None, config.yaml)`` for a
    run that ended before its first checkpoint (it starts afresh in its folder)."""
    path = Path(path)
    if not path.exists():
        raise ManppError(f"nothing to resume at '{path}': it does not exist")
    if path.is_dir() and not (path / CHECKPOINT).exists():
        if (path / CONFIG).is_file() and not has_weights(path):
            return None, C.load_yaml(path / CONFIG)
        raise ManppError(f"'{path}' holds no run to resume (no {CHECKPOINT} or {CONFIG} in it)")
    ckpt = load_checkpoint(path, purpose="resume")
    return ckpt, ckpt["config"]


def log_text(history: list[dict]) -> str:
    """``log.csv``: one row per evaluation of ``history``, the columns in the order they first appear."""
    columns: list[str] = []
    for row in history:
        columns += [k for k in row if k not in columns]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(history)
    return buffer.getvalue()


def log_header(path: Path) -> list[str] | None:
    try:
        with path.open(newline="") as f:
            return next(csv.reader(f), None)
    except (OSError, UnicodeDecodeError, csv.Error):
        return None


class RunFolder:
    """One training call's hold on its run folder (used by rank 0 only); see the module docstring."""

    def __init__(self, folder: str | Path, *, resume: bool = False, overwrite: bool = False,
                 command: str = "manpp train"):
        self.folder = Path(folder)
        self.resume = resume
        self.overwrite = overwrite
        self.lock = FolderLock(self.folder, command)
        self.created = False
        self.replacing: list[str] = []  # the files of the run this one replaces
        self.moved = False  # they are in .replaced/
        self.committed = False  # the new run wrote its first checkpoint
        self.began = False
        self.best_score: float | None = None  # the score in best.pt, when a resumed run's folder holds its own

    # --- 1. before anything is built ---------------------------------------------------------
    def claim(self, ckpt: dict | None = None) -> None:
        """Lock the folder and check it can take this run; writes nothing of the run yet."""
        folder = self.folder
        if folder.exists() and not folder.is_dir():
            raise ManppError(f"run folder '{folder}' is an existing file, not a folder: give --out a folder path")
        if not folder.exists():
            try:
                folder.mkdir(parents=True)
            except FileExistsError:
                pass
            except OSError as exc:
                raise io_error(exc, folder, "write the run folder") from None
            else:
                self.created = True
        try:
            self.lock.acquire()
        except BaseException:
            self._remove_if_created()
            raise
        try:
            self._recover()
            self._check(ckpt)
            self._check_writable()
        except BaseException:
            self.release()
            raise

    def _check(self, ckpt: dict | None) -> None:
        found = holds_run(self.folder)
        if self.resume:
            if ckpt is None:  # started afresh: what is there must have saved no weights
                if has_weights(self.folder):  # e.g. a run put back just now from an interrupted --overwrite
                    raise ManppError(f"run folder '{self.folder}' holds a run with weights again (the one an "
                                     f"interrupted --overwrite had moved aside is back): resume it with "
                                     f"--resume {shlex.quote(str(self.folder))}")
                self.replacing = found
            else:
                self._check_agrees(ckpt)
            return
        if not found:
            return
        if has_weights(self.folder) and not self.overwrite:
            raise ManppError(f"run folder '{self.folder}' already holds a run ({status_of(self.folder)}) "
                             f"({', '.join(found)}): continue it with --resume {shlex.quote(str(self.folder))}, replace it with "
                             f"--overwrite, or choose another --out")
        self.replacing = found

    def _check_agrees(self, ckpt: dict) -> None:
        """The folder's other files belong to the checkpoint's run (not a checkpoint dropped in from another)."""
        if (self.folder / CONFIG).is_file():
            try:
                written = C.saved_config(C.load_yaml(self.folder / CONFIG), source=f"'{self.folder / CONFIG}'")
                saved = C.saved_config(ckpt["config"], source="its checkpoint")
            except ManppError as exc:
                raise ManppError(f"cannot resume '{self.folder}': {exc}") from None
            for name in C.IDENTITY_FIELDS:
                if getattr(written, name) != getattr(saved, name):
                    raise ManppError(f"'{self.folder}' mixes two runs: {name} is {getattr(saved, name)!r} in "
                                     f"{CHECKPOINT} but {getattr(written, name)!r} in {CONFIG}; resume a folder "
                                     f"whose files come from one run")
        run = (ckpt.get("run") or {}).get("id")
        summary = read_summary(self.folder) or {}
        if run and summary.get("run_id") and summary["run_id"] != run:
            raise ManppError(f"'{self.folder}' mixes two runs: its {CHECKPOINT} was written by run {run[:8]} (seed "
                             f"{ckpt['run'].get('seed')}), its {SUMMARY} by run {summary['run_id'][:8]}; resume a "
                             f"folder whose files come from one run")
        if (self.folder / BEST).is_file():
            try:
                best = load_checkpoint(self.folder / BEST, purpose="weights")
            except ManppError as exc:
                raise ManppError(f"{exc} (to resume without it, move {BEST} away: the next evaluation writes a new "
                                 f"one)") from None
            other = (best.get("run") or {}).get("id")
            if run and other and other != run:
                raise ManppError(f"'{self.folder}' mixes two runs: its {CHECKPOINT} was written by run {run[:8]}, its "
                                 f"{BEST} by run {other[:8]}; resume a folder whose files come from one run")
            self.best_score = best.get("score")
        history = ckpt.get("history") or []
        header = log_header(self.folder / LOG) if (self.folder / LOG).exists() else None
        if history and header is not None:
            columns = log_text(history).splitlines()[0].split(",")
            if header != columns:
                raise ManppError(f"'{self.folder}' mixes two runs: {LOG} has other columns than its {CHECKPOINT}'s "
                                 f"history; resume a folder whose files come from one run")

    def _check_writable(self) -> None:
        probe = self.folder / f".manpp-write-test.{os.getpid()}"
        try:
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            raise io_error(exc, self.folder, "write the run folder") from None
        if self.replacing:  # moving the replaced run aside needs a writable .replaced/ too
            try:
                (self.folder / REPLACED).mkdir(exist_ok=True)
            except OSError as exc:
                raise io_error(exc, self.folder / REPLACED, "create") from None

    def _recover(self) -> None:
        """Clear what a killed writer left: its temporary files, and a half-done ``--overwrite`` (finished
        if its run checkpointed, undone if it did not). The lock is held: no other writer is here."""
        for leftover in self.folder.glob(".*.tmp"):
            try:
                leftover.unlink()
            except OSError:
                pass
        aside = self.folder / REPLACED
        if not aside.is_dir():
            return
        if (self.folder / CHECKPOINT).exists() or not any(aside.iterdir()):
            shutil.rmtree(aside, ignore_errors=True)  # the new run had committed
            return
        for name in holds_run(self.folder):  # the replacing run saved no weights: the old one comes back
            _remove(self.folder / name)
        for entry in aside.iterdir():
            os.replace(entry, self.folder / entry.name)
        aside.rmdir()
        warnings.warn(f"'{self.folder}': a run started with --overwrite ended before its first checkpoint; the run it "
                      f"was replacing is back in place", stacklevel=3)

    # --- 3. once everything has been checked ---------------------------------------------------
    def begin(self, cfg: C.TrainConfig, history: list[dict], run_id: str | None = None) -> None:
        """Move the replaced run aside, write ``config.yaml`` (if changed), ``log.csv`` and a ``running`` summary."""
        if self.replacing:
            aside = self.folder / REPLACED
            aside.mkdir(exist_ok=True)
            for name in self.replacing:
                os.replace(self.folder / name, aside / name)
            self.moved = True
        self.began = True
        write_if_changed(self.folder / CONFIG, C.config_text(C.run_config(cfg)))
        if history or (self.folder / LOG).exists():
            self.write_log(history)
        write_text(self.folder / SUMMARY, json.dumps({"status": "running", "reason": None, "pid": os.getpid(),
                                                      "resumed": self.resume, "run_id": run_id}, indent=2))

    def write_log(self, history: list[dict]) -> None:
        if history:
            write_if_changed(self.folder / LOG, log_text(history))
        elif (self.folder / LOG).exists():
            _remove(self.folder / LOG)

    # --- 4. while training -------------------------------------------------------------------
    def save(self, checkpoint: dict, history: list[dict], best: dict | None = None) -> None:
        """The checkpoint, then the log it agrees with, then ``best.pt``; the first one commits an overwrite."""
        save_checkpoint(checkpoint, self.folder / CHECKPOINT)
        self.write_log(history)
        if best is not None:
            save_checkpoint(best, self.folder / BEST, kind="best")
        if not self.committed:
            self.committed = True
            if self.moved:
                shutil.rmtree(self.folder / REPLACED, ignore_errors=True)
                self.moved = False

    # --- 5. how it ended -----------------------------------------------------------------------
    def end(self, summary: dict) -> None:
        write_text(self.folder / SUMMARY, json.dumps(summary, indent=2))

    def abort(self) -> bool:
        """After a failure: put back the replaced run if this one never checkpointed; True if it did."""
        restored = False
        if self.moved and not self.committed:
            for name in holds_run(self.folder):
                _remove(self.folder / name)
            aside = self.folder / REPLACED
            for entry in aside.iterdir():
                os.replace(entry, self.folder / entry.name)
            aside.rmdir()
            self.moved = False
            restored = True
        return restored

    def release(self) -> None:
        empty_aside = self.folder / REPLACED
        if empty_aside.is_dir() and not self.moved:
            try:
                empty_aside.rmdir()
            except OSError:
                pass
        self.lock.release()
        self._remove_if_created()

    def _remove_if_created(self) -> None:
        if self.created and self.folder.is_dir() and not any(p.name != LOCK for p in self.folder.iterdir()):
            shutil.rmtree(self.folder, ignore_errors=True)
            self.created = False


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


__all__ = ["CONFIG", "LOG", "REPLACED", "RUN_FILES", "RunFolder", "RunResult", "SUMMARY", "TENSORBOARD", "folder_of",
           "has_weights", "holds_run", "log_text", "read_summary", "resume_source", "run_folder", "status_of"]
