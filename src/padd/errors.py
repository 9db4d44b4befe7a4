"""The one error class for bad input: the CLI prints it as one line with what to do; every other
exception is a bug and keeps its traceback."""


class UserError(Exception):
    """Bad input (a flag, a path, a file's content); the message says what to do instead."""
