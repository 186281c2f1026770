"""Errors that are the user's to fix: printed as one line by the CLI, never as a traceback."""


class UserError(ValueError):
    """Bad input (a file, line, field or flag): the message says where and how to fix it."""
