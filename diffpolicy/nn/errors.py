"""Errors raised by `diffpolicy.nn` for bad configurations and bad inputs."""


class NNConfigError(ValueError):
    """A backbone, encoder or EMA configuration is invalid (unknown type or key, bad value)."""


class NNInputError(ValueError):
    """A tensor given to a network has the wrong shape (its dtype is checked with TypeError)."""
