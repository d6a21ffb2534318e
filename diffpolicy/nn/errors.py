"""Errors raised by `diffpolicy.nn` for bad configurations and bad inputs."""

from diffpolicy.errors import InvalidValueError


class NNConfigError(InvalidValueError):
    """A backbone, encoder or EMA configuration is invalid (unknown type or key, bad value)."""


class NNInputError(InvalidValueError):
    """A tensor given to a network has the wrong shape (its dtype is checked with TypeError)."""
