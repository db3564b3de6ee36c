"""Run ``manpp`` with a fault injected at a chosen moment (used by the fault-injection tests).

    python tests/fault_runner.py FAULT -- <manpp arguments>

FAULT is ``none`` or ``WHAT@WHERE:N``:

- WHAT: a signal name (``SIGTERM``, ``SIGINT``, ``SIGUSR1``: sent to this process), or ``KILL`` (this
  process dies at once, as by ``kill -9``: nothing is flushed, no handler runs);
- WHERE: ``step`` (the N-th training step, before its optimizer step), ``save`` (the N-th ``torch.save``, as it
  starts: a checkpoint or best.pt being written), ``saved`` (right after the N-th ``torch.save``
  returned, before the file is renamed into place), ``eval`` (the N-th evaluation, as it starts),
  ``log`` (right after the N-th write of log.csv);
- ``RANK=r`` in the environment limits the fault to that torchrun rank.
"""

from __future__ import annotations

import os
import signal
import sys

import torch


def _fire(what: str) -> None:
    if what == "KILL":
        os.kill(os.getpid(), signal.SIGKILL)
    os.kill(os.getpid(), getattr(signal, what))


def _counting(target, name: str, what: str, n: int, after: bool = False, patch=setattr) -> None:
    real = getattr(target, name)
    calls = {"n": 0}

    def wrapped(*args, **kw):
        calls["n"] += 1
        if calls["n"] == n and not after:
            _fire(what)
        out = real(*args, **kw)
        if calls["n"] == n and after:
            _fire(what)
        return out

    patch(target, name, wrapped)


def install(fault: str, patch=setattr) -> None:
    """Inject ``fault`` into this process (``patch``: how to replace an attribute, e.g. pytest's
    ``monkeypatch.setattr``, so that a test can undo it)."""
    if fault == "none":
        return
    what, _, rest = fault.partition("@")
    where, _, n = rest.partition(":")
    n = int(n)
    only = os.environ.get("FAULT_RANK")
    if only is not None and os.environ.get("RANK", "0") != only:
        return
    if where == "step":  # the N-th optimizer step of a run (the memory measurement's step is not one)
        import manpp.train.pipeline as pipeline
        from manpp.train.replica import ReplicaSteps

        _counting(ReplicaSteps, "_optimizer_step", what, n, patch=patch)
        _counting(pipeline, "local_step", what, n, patch=patch)
    elif where in ("save", "saved"):
        _counting(torch, "save", what, n, after=where == "saved", patch=patch)
    elif where == "eval":
        from manpp.tasks.classification import Task

        _counting(Task, "evaluate", what, n, patch=patch)
    elif where == "log":
        from manpp.run.rundir import RunFolder

        _counting(RunFolder, "write_log", what, n, after=True, patch=patch)
    else:
        raise SystemExit(f"unknown fault place {where!r}")


if __name__ == "__main__":
    fault, sep, *args = sys.argv[1:]
    assert sep == "--", "usage: fault_runner.py FAULT -- <manpp arguments>"
    install(fault)
    from manpp.commands.cli import main

    sys.exit(main(args))
