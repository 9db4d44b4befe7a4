"""The one error class for bad input. The CLI prints a UserError as one line, which says what to do
instead; every other exception is a bug and keeps its traceback.

A UserError is also a ValueError, so library callers that catch ValueError keep working."""


class UserError(ValueError):
    """Bad input (a flag, a path, a file's content); the message says what to do instead."""
