"""Errors that the CLI turns into exit codes.

`UserError` is bad input (spec, data, arguments): the CLI prints its message on one line and exits 2,
never with a traceback. Everything else is a bug or an environment failure (exit 1).
"""


class UserError(Exception):
    """Bad input from the user; the message names the key or file and what is allowed."""


ERROR_CHARS = 5000  # how much of an error's text a failed trial's run keeps


def first_line(exc: BaseException) -> str:
    """The first line of an error's message (its type's name where it has none): what a one-line
    error or log line quotes of it."""
    return (str(exc).splitlines() or [type(exc).__name__])[0]


def error_text(exc: BaseException) -> str:
    """A trial's error as its run records it: the type and the message, truncated."""
    return f"{type(exc).__name__}: {exc}"[:ERROR_CHARS]
