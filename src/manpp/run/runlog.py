"""Where a run reports as it trains: TensorBoard, and progress lines (``log.csv`` is written with
each checkpoint, by :mod:`manpp.run.rundir`, so that the two always agree).

- ``logger=tensorboard`` (the ``tensorboard`` extra): the same rows as scalars, plus every module's
  loss every ``log_every`` steps, under ``RUN/tensorboard``.
- When the output is not a terminal (a log file, a batch job), the progress bar is off and a line
  is printed every ``log_every`` steps instead.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

TENSORBOARD = "tensorboard"  # the run folder's subfolder for TensorBoard's event files


def loss_text(means: list[float]) -> str:
    """Every module's loss when K is small; first / mean / last when it is large."""
    if len(means) <= 6:
        return " ".join(f"{m:.3f}" for m in means)
    return f"{means[0]:.3f} .. {means[-1]:.3f} (mean {sum(means) / len(means):.3f}, {len(means)} modules)"


def scalar_tag(key: str) -> str:
    """The TensorBoard tag of a ``log.csv`` column: grouped by what it measures."""
    for prefix, group in (("loss_", "loss/module_"), ("scale_", "manpp/scale_"), ("ema_dist_", "manpp/ema_distance_")):
        if key.startswith(prefix) and key[len(prefix):].isdigit():
            return group + key[len(prefix):]
    if key.startswith("test_"):
        return "test/" + key[len("test_"):]
    return "train/" + key


class RunLog:
    """The reports of one run (only the process that writes the run folder keeps files)."""

    def __init__(self, folder: Path, cfg, *, write: bool, verbose: bool, total_steps: int):
        self.every = cfg.log_every
        self.total_steps = total_steps
        self.started = time.perf_counter()
        self.first_step: int | None = None  # the step this call started from (a resumed run: not 0)
        self.lines = verbose and self.every > 0 and not _is_terminal()
        self.writer = None
        if write and cfg.logger == "tensorboard":
            from ..base.extras import require

            require("tensorboard", "logger=tensorboard")  # torch.utils.tensorboard needs it
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(folder / TENSORBOARD))

    def step(self, step: int, epoch: int, epochs: int, losses: list[float], lr: float) -> None:
        """After optimizer step ``step`` (1-based) with its per-module losses."""
        if self.every <= 0 or step % self.every:
            return
        if self.writer is not None:
            for j, value in enumerate(losses):
                self.writer.add_scalar(f"step_loss/module_{j}", value, step)
            self.writer.add_scalar("train/lr", lr, step)
        if self.lines:
            print(f"step {step}/{self.total_steps} (epoch {epoch + 1}/{epochs})  lr {lr:.4g}  loss {loss_text(losses)}"
                  f"{self._eta(step)}", flush=True)

    def _eta(self, step: int) -> str:
        """The run's remaining time at this call's pace so far (evaluations included)."""
        done = step - (self.first_step or 0)
        elapsed = time.perf_counter() - self.started
        if done <= 0 or elapsed <= 0 or step >= self.total_steps:
            return ""
        seconds = int(elapsed / done * (self.total_steps - step))
        return f"  eta {seconds // 3600}h{seconds // 60 % 60:02d}m" if seconds >= 3600 else \
            f"  eta {seconds // 60}m{seconds % 60:02d}s"

    def start(self, step: int) -> None:
        """The run (re)starts at ``step``: the pace is measured from here."""
        self.first_step, self.started = step, time.perf_counter()

    def epoch(self, row: dict) -> None:
        """One evaluation's row, written as scalars with TensorBoard."""
        if self.writer is not None:
            for key, value in row.items():
                if key not in ("epoch", "step") and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self.writer.add_scalar(scalar_tag(key), value, row["step"])
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def _is_terminal() -> bool:
    return sys.stderr.isatty()


__all__ = ["RunLog", "TENSORBOARD", "loss_text", "scalar_tag"]
