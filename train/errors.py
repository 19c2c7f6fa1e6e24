"""The errors a user can fix: each CLI prints ``error: <message>`` on one line and exits with code 2.

Every message names what is wrong and how to fix it. Anything else that escapes
a CLI is a bug in rocoft_jax and keeps its traceback.
"""

from __future__ import annotations


class UserError(ValueError):
    """Bad input that the user can fix; the message says which and how."""


class ConfigError(UserError):
    """A bad option, flag or config file."""


class DataError(UserError):
    """A dataset that cannot be found or parsed."""


class ModelError(UserError):
    """A model that cannot be loaded."""


class CheckpointError(UserError):
    """A checkpoint that is missing, damaged or belongs to another run."""
