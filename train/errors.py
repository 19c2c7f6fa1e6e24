"""The errors a CLI reports on one line, ``error: <message>``, instead of a traceback.

A `UserError` is bad input the user can fix: exit code 2, before any work starts where it can be
found then. A `NonFiniteError` is a run that diverged on valid input: exit code 3. Every message
names what is wrong and how to go on. Anything else that escapes a CLI is a bug in rocoft_jax and
keeps its traceback (exit code 1).
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


class NonFiniteError(RuntimeError):
    """A training step whose loss, gradient norm or trained values were NaN or infinite.

    Not a `UserError`: the options were valid and the run diverged. The message names the step, the
    values and the last good checkpoint (`train.nonfinite`).
    """
