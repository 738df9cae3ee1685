"""Errors an operator can act on: printed as one clear message, never a traceback."""


class UserError(Exception):
    """Bad input or an unsafe request: the message says what and where; nothing was changed."""


class StepFailed(UserError):
    """A step failed on one or more hosts; the steps that depend on it did not run."""


class HostFailed(Exception):
    """One action failed on one host; the message names the command, status and stderr."""
