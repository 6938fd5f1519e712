"""User-facing errors.

A `QuantkitError` carries one line that says what is wrong and what to do about it; the CLI prints exactly
that line (no traceback) and exits with status 2.
"""


class QuantkitError(Exception):
    """An error caused by the user's input (bad path, bad recipe, corrupt checkpoint, ...)."""
