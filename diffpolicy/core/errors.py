"""Errors raised by `diffpolicy.core` for bad configurations and bad inputs.

Both derive from `ValueError`, so callers may catch either the specific class or `ValueError`.
A tensor of the wrong dtype raises the built-in `TypeError`.
"""

from diffpolicy.errors import InvalidValueError


class CoreConfigError(InvalidValueError):
    """A schedule, process, loss weighting or guidance is configured wrongly (unknown name, bad value)."""


class CoreInputError(InvalidValueError):
    """A tensor handed to the core has the wrong shape or values (t outside [0, 1], s > t, ...)."""
