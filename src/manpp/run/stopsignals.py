"""Signals that ask a run to stop: SIGINT (Ctrl-C), SIGTERM (what schedulers send before they
preempt a job) and SIGUSR1 (what some schedulers send ahead of the time limit).

While :class:`StopSignals` is active, the first such signal only records a request: the training
loop finishes its current step, writes the checkpoint and ends with status ``stopped``. The
process then exits with the conventional code 128 + the signal's number (130 for SIGINT, 143 for
SIGTERM, 138 for SIGUSR1). A second SIGINT stops at once (``KeyboardInterrupt``), for a user who
does not want to wait. Outside the main thread no handler can be installed, and signals keep
their usual effect.
"""

from __future__ import annotations

import signal
import sys
import threading

STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGUSR1") if hasattr(signal, name))


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def exit_code(signum: int) -> int:
    """The shell's convention for a process ended by a signal: 128 + its number."""
    return 128 + int(signum)


class StopSignals:
    """Record stop requests instead of dying; restore the previous handlers on exit."""

    def __init__(self, announce: bool = True):
        self.signum = 0
        self.announce = announce
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.signum != 0

    def _handle(self, signum, frame) -> None:
        if self.signum and signum == signal.SIGINT:  # a second Ctrl-C: stop now
            raise KeyboardInterrupt
        if not self.signum:
            self.signum = signum
            if self.announce:
                try:
                    print(f"manpp: {signal_name(signum)} received: stopping after this step and writing the "
                          f"checkpoint" + (" (Ctrl-C again stops at once)" if signum == signal.SIGINT else ""),
                          file=sys.stderr, flush=True)
                except (OSError, ValueError):
                    pass

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for signum in STOP_SIGNALS:
                try:
                    self._previous[signum] = signal.signal(signum, self._handle)
                except (ValueError, OSError):  # pragma: no cover - an embedding that forbids it
                    pass
        return self

    def __exit__(self, *exc) -> None:
        for signum, previous in self._previous.items():
            try:
                signal.signal(signum, previous)
            except (ValueError, OSError, TypeError):  # pragma: no cover
                pass
        self._previous.clear()


def ignore_in_workers(_worker_id: int = 0) -> None:
    """``worker_init_fn`` of data-loading processes: the main process decides when to stop, and it
    ends its workers itself (a scheduler signals the whole process group)."""
    for signum in STOP_SIGNALS:
        try:
            signal.signal(signum, signal.SIG_IGN)
        except (ValueError, OSError):  # pragma: no cover
            pass


__all__ = ["STOP_SIGNALS", "StopSignals", "exit_code", "ignore_in_workers", "signal_name"]
