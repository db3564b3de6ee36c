"""The one exception type the command line turns into a one-line message."""


class ManppError(Exception):
    """Bad input from the user: an unknown name, an impossible K, a missing file.

    The message must name the bad value and what would be accepted. The command
    line prints it as a single line and exits with status 2; the Python API lets
    it propagate.
    """


def choices(values) -> str:
    """Format accepted values for an error message: 'a', 'b' or 'c'."""
    values = [repr(v) if isinstance(v, str) else str(v) for v in values]
    if len(values) <= 1:
        return "".join(values)
    return ", ".join(values[:-1]) + " or " + values[-1]
