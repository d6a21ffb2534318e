"""Errors of RL fine-tuning: bad input found before any environment step, and numbers a run
cannot go on with."""

from diffpolicy.errors import InvalidStateError, InvalidValueError, MissingFileError


class FinetuneError(InvalidValueError):
    """A fine-tuning run cannot start or continue with what it was given."""


class TaskMismatchError(FinetuneError):
    """The checkpoint was trained for another task than the one requested."""


class UnsupportedProcessError(FinetuneError):
    """The algorithm does not support the base policy's generative process."""


class ActionSpaceMismatchError(FinetuneError):
    """The environment's action or observation space differs from the policy's."""


class NonFiniteLogProbError(InvalidStateError):
    """A transition's log-probability is inf or NaN, so no PPO ratio can be formed from it."""


class MissingDemonstrationsError(MissingFileError):
    """The BC regulariser's demonstration store is not named or not there."""
