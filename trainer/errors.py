"""The one exception type that means "the user gave us something wrong".

Entry points catch `UsageError`, print its message as a single line on stderr and exit with
code 2, before anything has been written. Everything else is a bug and keeps its traceback.
"""


class UsageError(Exception):
    """Bad input from the user: a config value, a path, a model name, a weights file."""

    exit_code = 2


class ConfigError(UsageError):
    """A config file or override that does not fit the schema."""
