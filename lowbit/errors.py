"""The one exception type users see: a one-line message saying what is wrong and how to fix it."""


class LowbitError(Exception):
    """Bad input or an impossible request; the CLI prints it on one line and exits with code 2."""


class CheckFailed(LowbitError):
    """A check ran and its result is outside the requested tolerance; the CLI exits with code 1."""
