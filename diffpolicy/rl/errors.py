"""Errors of RL fine-tuning: bad input found before any environment step."""

from diffpolicy.errors import InvalidValueError


class FinetuneError(InvalidValueError):
    """A fine-tuning run cannot start or continue with what it was given."""


class TaskMismatchError(FinetuneError):
    """The checkpoint was trained for another task than the one requested."""


class UnsupportedProcessError(FinetuneError):
    """The algorithm does not support the base policy's generative process."""


class ActionSpaceMismatchError(FinetuneError):
    """The environment's action or observation space differs from the policy's."""
