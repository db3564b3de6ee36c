"""The one exception type the command line turns into a one-line message."""


class ManppError(Exception):
    """Bad input from the user: an unknown name, an impossible K, a missing file, a file that cannot
    be written.

    The message must name the bad value and what would be accepted. The command line prints it as
    a single line and exits with ``exit_code`` (2 unless said otherwise); the Python API lets it
    propagate.
    """

    def __init__(self, message: str = "", *, exit_code: int = 2):
        super().__init__(message)
        self.exit_code = exit_code


def choices(values) -> str:
    """Format accepted values for an error message: 'a', 'b' or 'c'."""
    values = [repr(v) if isinstance(v, str) else str(v) for v in values]
    if len(values) <= 1:
        return "".join(values)
    return ", ".join(values[:-1]) + " or " + values[-1]
