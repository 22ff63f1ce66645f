"""The one exception type users see: a one-line message naming the problem and the fix."""


class GptkitError(Exception):
    """Bad input or state detected at a boundary; the CLI prints it as one line and exits 2."""
