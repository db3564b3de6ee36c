"""One writer per run folder: an operating-system lock held for the whole life of a training process.

The lock is ``fcntl.flock`` on ``DIR/.manpp.lock``, which holds the owner's pid, host and start time
for the message a second process gets. The kernel releases a ``flock`` when its process ends in any
way (``kill -9`` included), so a lock file left by a dead process blocks nobody: the next process
simply takes it. Where ``fcntl`` does not exist (Windows) there is no lock, and a warning says so.
"""

from __future__ import annotations

import json
import os
import socket
import time
import warnings
from pathlib import Path

from ..base.errors import ManppError
from ..base.safeio import io_error

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

LOCK = ".manpp.lock"
_HELD: set[Path] = set()  # the lock files this process holds (a second open of one would see itself as the holder)


def _owner_text(path: Path, wait: float = 1.0) -> str:
    """Who holds the lock, in words; its holder writes that just after locking, so an empty file is
    read again for up to ``wait`` seconds."""
    deadline = time.monotonic() + wait
    while True:
        try:
            owner = json.loads(path.read_text())
            text = f"process {owner['pid']}"
            if owner.get("host") and owner["host"] != socket.gethostname():
                text += f" on {owner['host']}"
            if owner.get("command"):
                text += f" ({owner['command']}, since {owner.get('since', '?')})"
            return text
        except (OSError, ValueError, KeyError, TypeError):
            if time.monotonic() >= deadline:
                return "another process"
            time.sleep(0.02)


class FolderLock:
    """An exclusive lock on one folder; :meth:`acquire` refuses at once when another process holds it."""

    def __init__(self, folder: str | Path, command: str = "manpp"):
        self.folder = Path(folder)
        self.path = self.folder / LOCK
        self.command = command
        self.fd: int | None = None

    @property
    def held(self) -> bool:
        return self.fd is not None

    def acquire(self) -> "FolderLock":
        if fcntl is None:  # pragma: no cover - Windows
            warnings.warn("no folder lock on this system: do not start two runs into one folder", stacklevel=2)
            return self
        for _ in range(10):  # the file may be replaced between open and lock: take the one on the path
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            except OSError as exc:
                raise io_error(exc, self.path, "lock") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise ManppError(f"run folder '{self.folder}' is in use by {_owner_text(self.path)}: one process "
                                 f"writes a run folder at a time; wait for it to end, or choose another --out") from None
            except OSError as exc:
                os.close(fd)
                raise io_error(exc, self.path, "lock") from None
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                self.fd = fd
                self._write_owner()
                _HELD.add(self.path.resolve())
                return self
            os.close(fd)  # the holder removed the file as we opened it: try again on the new one
        raise ManppError(f"cannot lock run folder '{self.folder}': its lock file keeps changing")

    def _write_owner(self) -> None:
        owner = {"pid": os.getpid(), "host": socket.gethostname(), "command": self.command,
                 "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        data = json.dumps(owner).encode()
        try:
            os.ftruncate(self.fd, 0)
            os.pwrite(self.fd, data, 0)
        except OSError:
            pass  # the owner's description is for messages only

    def release(self) -> None:
        """Remove the lock file and let go (the file goes first, while still held, so nobody takes a
        lock on a file that is about to vanish)."""
        if self.fd is None:
            return
        _HELD.discard(self.path.resolve())
        try:
            self.path.unlink()
        except OSError:
            pass
        try:
            os.close(self.fd)
        finally:
            self.fd = None

    def __enter__(self) -> "FolderLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def holder(folder: str | Path) -> str | None:
    """Who holds the lock on ``folder`` now (a description), or None when nobody does."""
    path = Path(folder) / LOCK
    if fcntl is None or not path.exists() or path.resolve() in _HELD:  # this process: not "another" holder
        return None
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return _owner_text(path)
    except OSError:
        return None
    finally:
        os.close(fd)
    return None


__all__ = ["FolderLock", "LOCK", "holder"]
