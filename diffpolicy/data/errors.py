"""Errors raised by `diffpolicy.data` for bad stores, files and episodes.

Both derive from `ValueError`, so callers may catch either the specific class or `ValueError`.
Missing files and stores raise the built-in `FileNotFoundError`.
"""


class DataFormatError(ValueError):
    """A store or file on disk does not have the expected layout (names the path and the key)."""


class EpisodeError(ValueError):
    """An episode handed to `ReplayBuffer.add_episode` is invalid (names the key and the index)."""
