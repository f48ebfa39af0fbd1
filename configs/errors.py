"""The exceptions that end a run with one line instead of a traceback.

Entry points (`launch/cli.py`) catch `ProjectError`, print its message as a single line on stderr
and exit with its `exit_code`. Everything else is a bug and keeps its traceback.
"""


class ProjectError(Exception):
    """Base of the errors an entry point reports as one line."""

    exit_code = 1


class UsageError(ProjectError):
    """Bad input from the user: a config value, a path, a model name, a weights file.
    Raised before anything is written."""

    exit_code = 2


class ConfigError(UsageError):
    """A config file or override that does not fit the schema."""


class TrainingFailed(ProjectError):
    """Training started correctly but cannot go on (the loss diverged); the checkpoints already
    written are kept. Not a usage error: the same config may train with another learning rate."""

    exit_code = 1
