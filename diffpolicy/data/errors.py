"""Errors raised by `diffpolicy.data` for bad stores, files and episodes.

Both derive from `ValueError`, so callers may catch either the specific class or `ValueError`.
Missing files and stores raise the built-in `FileNotFoundError`.
"""

from diffpolicy.errors import InvalidValueError


class DataFormatError(InvalidValueError):
    """A store or file on disk does not have the expected layout (names the path and the key)."""


class EpisodeError(InvalidValueError):
    """An episode handed to `ReplayBuffer.add_episode` is invalid (names the key and the index)."""
