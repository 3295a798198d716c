"""One exception type for mistakes in the user's input: the CLI prints its message on one line and exits with 2."""


class UserError(Exception):
    """A problem with a recipe, a dataset, a path or a flag, worded for the person who typed it."""

    exit_code = 2
