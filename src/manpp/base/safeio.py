"""Files written whole or not at all, and I/O errors as one line.

Every file manpp writes (a run's checkpoint, ``best.pt``, ``log.csv``, ``config.yaml`` and
``summary.json``, an export) goes through :func:`write_atomic`: the bytes go to a temporary file
beside the target (a name no other process uses), are flushed to the disk (``fsync``), and only
then renamed over the target, and the folder entry is flushed too. A crash, a ``kill -9`` or a full
disk therefore never leaves half a file under the real name, and the previous file stays as it
was until the new one is complete. A new file gets the usual permissions (``0o666`` less the
umask), like any file the user creates.

:func:`io_error` turns an ``OSError`` (or torch's serialization errors, which wrap one) into a
:class:`~manpp.base.errors.ManppError` of one line that names the file and the reason.
"""

from __future__ import annotations

import errno
import os
import secrets
from pathlib import Path
from typing import BinaryIO, Callable

from .errors import ManppError

# what an errno means for the user, where strerror alone is not clear enough
_HINTS = {
    errno.ENOSPC: "the disk is full",
    errno.EDQUOT: "the disk quota is used up",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
    errno.EROFS: "the file system is read-only",
    errno.ENAMETOOLONG: "the file name is too long",
    errno.EFBIG: "the file is larger than this system allows",
}
_TORCH_IO = ("inline_container", "PytorchStreamWriter", "file write failed", "unexpected pos")


def first_line(exc: BaseException) -> str:
    """The first non-empty line of an exception's message, else its type's name."""
    for line in str(exc).splitlines():
        if line.strip():
            return line.strip()
    return type(exc).__name__


def os_error_of(exc: BaseException) -> OSError | None:
    """The ``OSError`` behind ``exc``: itself, or the one torch's serialization error wraps."""
    seen = 0
    while exc is not None and seen < 8:
        if isinstance(exc, OSError):
            return exc
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return None


def is_io_error(exc: BaseException) -> bool:
    """An ``OSError``, or a torch serialization ``RuntimeError`` raised by a failed write."""
    if os_error_of(exc) is not None:
        return True
    return isinstance(exc, RuntimeError) and any(mark in str(exc) for mark in _TORCH_IO)


def reason_of(exc: BaseException) -> str:
    """Why an I/O operation failed, in a few words."""
    os_exc = os_error_of(exc)
    if os_exc is None:
        return first_line(exc)
    hint = _HINTS.get(os_exc.errno)
    text = os_exc.strerror or first_line(os_exc)
    return f"{hint} ({text})" if hint and hint.lower() != text.lower() else text


def io_error(exc: BaseException, path: str | Path, doing: str = "write", *, kept: bool = False) -> ManppError:
    """One line for a failed read or write of ``path``; ``kept``: the previous file is still there."""
    tail = "; the previous file is kept unchanged" if kept else ""
    return ManppError(f"cannot {doing} '{path}': {reason_of(exc)}{tail}")


def _temporary_name(path: Path) -> Path:
    token = f"{os.getpid()}.{secrets.token_hex(4)}"
    name = f".{path.name}.{token}.tmp"
    if len(name.encode()) > 255:  # a long target name: the temporary one must still be a legal name
        name = f".manpp.{token}.tmp"
    return path.with_name(name)


def fsync_folder(folder: Path) -> None:
    """Flush a folder's entries (a rename in it) to the disk, where the system allows it."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_atomic(path: str | Path, write: Callable[[BinaryIO], None]) -> Path:
    """Write ``path`` whole or not at all: ``write(f)`` fills a temporary file that then replaces it.

    Errors of the file system become one :class:`ManppError` line naming the file; anything else
    (a bug in ``write``) propagates with its traceback. The temporary file never outlives the call.
    """
    path = Path(path)
    existed = path.exists()
    tmp = _temporary_name(path)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the umask applies, as to any new file
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        try:
            tmp.unlink()
        except OSError:
            pass
        if isinstance(exc, Exception) and is_io_error(exc):
            raise io_error(exc, path, kept=existed) from None
        raise
    fsync_folder(path.parent)
    return path


def make_folder(folder: str | Path, doing: str = "create the folder") -> Path:
    """``mkdir -p``, with a failure as one line."""
    folder = Path(folder)
    blocking = next((p for p in (folder, *folder.parents) if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        raise ManppError(f"cannot {doing} '{folder}': '{blocking}' is a file, not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise io_error(exc, folder, doing) from None
    return folder


def write_bytes(path: str | Path, data: bytes) -> Path:
    return write_atomic(path, lambda f: f.write(data))


def write_text(path: str | Path, text: str) -> Path:
    return write_bytes(path, text.encode("utf-8"))


def save_torch(obj, path: str | Path) -> Path:
    """``torch.save(obj)`` into ``path``, atomically."""
    import torch

    return write_atomic(path, lambda f: torch.save(obj, f))


def write_if_changed(path: str | Path, text: str) -> bool:
    """Write ``text`` unless ``path`` already holds exactly it; True if it was written."""
    path = Path(path)
    try:
        if path.read_text(encoding="utf-8") == text:
            return False
    except (OSError, UnicodeDecodeError):
        pass
    write_text(path, text)
    return True


__all__ = ["first_line", "fsync_folder", "io_error", "is_io_error", "make_folder", "os_error_of", "reason_of", "save_torch",
           "write_atomic", "write_bytes", "write_if_changed", "write_text"]
