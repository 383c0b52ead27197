"""Errors a user can fix (no TensorFlow import: cheap to load).

Entry points catch `UserError` only and print its one-line message; anything else is a bug
and keeps its traceback.
"""


class UserError(Exception):
    """A mistake in flags, files or data that the user can fix; the message names it."""


class ConfigError(UserError):
    """A bad flag value or combination; the message names the flag."""


class DataError(UserError):
    """A problem with the user's data files; the message names the file and what is wrong."""
