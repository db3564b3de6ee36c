"""Starting ``manpp train`` (or a fault runner) under torchrun from a test: a clean environment, a free
port, and one retry when gloo aborts a process from C++ with no exception.

That abort ("terminate called without an active exception", the process ending with SIGABRT) came once
in CI, in a test that passed on hundreds of launches before and 60 launches in a row on a loaded
machine after (2026-12-07). It comes from inside torch's gloo backend, not from manpp's Python code,
which ends every failure with a traceback. A launch that ends so is run once more in a fresh folder, and
the test says so in a warning with what the first folder had recorded; any other failure, or the abort
twice, fails the test as before.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
import warnings
from pathlib import Path

ABORT = "terminate called without an active exception"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_env(**extra: str) -> dict:
    """This environment with one thread per process and no torchrun variables of an outer launch."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    env.update(extra)
    return env


def launch(nproc: int, program: list[str], out: Path, env: dict, timeout: float,
           retry_abort: bool = True) -> subprocess.CompletedProcess:
    """``torchrun --nproc_per_node nproc program`` (``program`` names ``out`` as its run folder).

    With ``retry_abort`` (for launches that start ``out`` afresh), a launch that fails with gloo's C++
    abort runs once more after ``out`` is moved aside to ``<out>-aborted``."""
    def once() -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr",
               "127.0.0.1", "--master_port", str(free_port()), *program]
        return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)

    proc = once()
    if proc.returncode == 0 or not retry_abort or ABORT not in proc.stderr:
        return proc
    aside = out.with_name(out.name + "-aborted")
    if out.exists():
        shutil.move(str(out), str(aside))
    warnings.warn(f"torchrun: a process aborted in C++ ({ABORT!r}, exit {proc.returncode}); the first launch's "
                  f"folder recorded {_recorded(aside)}; launched once more", stacklevel=2)
    return once()


def _recorded(folder: Path) -> str:
    summary = folder / "summary.json"
    if not summary.exists():
        files = sorted(p.name for p in folder.iterdir()) if folder.exists() else []
        return f"no summary (files: {files})"
    record = json.loads(summary.read_text())
    return f"status {record.get('status')!r} after {record.get('steps')} steps"
