"""What the command line shows: streams that never stop a run, and warnings held until the checks pass.

- ``manpp train ... | head -1`` closes the pipe after one line. A plain ``print`` would then raise
  ``BrokenPipeError`` in the middle of training. :func:`guard_streams` wraps ``sys.stdout`` and
  ``sys.stderr`` so that the first broken pipe points the stream's descriptor at ``/dev/null``:
  training goes on, its files are written as usual, and nothing more is printed to that stream.
- :func:`held_warnings` keeps the warnings raised while a command checks its input. If a check
  then fails, only its error is shown (not, say, eleven warnings about settings of the objective
  the refused run would have used); once the checks pass (:func:`release_warnings`, which a run
  calls when it starts) or the command ends well, they are shown.
"""

from __future__ import annotations

import contextlib
import errno
import os
import sys
import warnings


class _Tolerant:
    """A text stream whose writes survive a closed reader (everything else is the wrapped stream's)."""

    def __init__(self, stream):
        self._stream = stream
        self._closed_reader = False

    def _silence(self) -> None:
        self._closed_reader = True
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, self._stream.fileno())  # the buffered rest, and the interpreter's last flush, go nowhere
            os.close(devnull)
        except (OSError, ValueError, AttributeError):
            pass

    def _guarded(self, call, *args):
        if self._closed_reader:
            return None
        try:
            return call(*args)
        except BrokenPipeError:
            self._silence()
        except OSError as exc:
            if exc.errno != errno.EPIPE:
                raise
            self._silence()
        return None

    def write(self, text):
        written = self._guarded(self._stream.write, text)
        return len(text) if written is None else written

    def flush(self):
        self._guarded(self._stream.flush)

    def __getattr__(self, name):
        return getattr(self._stream, name)


def guard_streams() -> None:
    """Make ``sys.stdout`` and ``sys.stderr`` tolerant of closed pipes (idempotent)."""
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if stream is not None and not isinstance(stream, _Tolerant) and hasattr(stream, "fileno"):
            try:
                stream.fileno()
            except (OSError, ValueError, AttributeError):
                continue  # not a real file (a test's capture): leave it alone
            setattr(sys, name, _Tolerant(stream))


def unguard_streams() -> None:
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if isinstance(stream, _Tolerant):
            setattr(sys, name, stream._stream)


_held: list | None = None  # warnings waiting for the checks to pass (None: not holding)


@contextlib.contextmanager
def held_warnings():
    """Hold the warnings of a command until :func:`release_warnings` or its good end; drop them on an error."""
    global _held
    show = warnings.showwarning

    def hold(*args, **kw):
        if _held is None:
            show(*args, **kw)
        else:
            _held.append((args, kw))

    _held = []
    warnings.showwarning = hold
    try:
        yield
    except BaseException:
        _held = None  # the error is what matters
        raise
    finally:
        pending, _held = _held or [], None
        warnings.showwarning = show
        for args, kw in pending:
            show(*args, **kw)


def release_warnings() -> None:
    """The checks passed: show the held warnings now, and the later ones as they come."""
    global _held
    pending, _held = _held or [], None
    for args, kw in pending:
        warnings.showwarning(*args, **kw)


__all__ = ["guard_streams", "held_warnings", "release_warnings", "unguard_streams"]
