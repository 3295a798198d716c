"""One exception type for mistakes in the user's input: the CLI prints its message on one line and exits with 2."""


class UserError(Exception):
    """A problem with a recipe, a dataset, a path or a flag, worded for the person who typed it."""

    exit_code = 2


def first_line(exc: BaseException) -> str:
    """The first non-blank line of an exception's message, or its type name when the message is empty: the error
    paths that quote a library's exception must not fail on one that carries no text."""
    for line in str(exc).splitlines():
        if line.strip():
            return line.strip()
    return type(exc).__name__
