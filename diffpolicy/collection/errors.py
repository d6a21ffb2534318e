"""The error of `diffpolicy.collection`."""

from diffpolicy.errors import InvalidValueError


class CollectError(InvalidValueError):
    """A collection cannot start or go on (incompatible store, expert failing too often, an episode
    that raised or whose worker process died)."""
