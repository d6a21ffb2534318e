"""Errors raised by `diffpolicy.data` for bad stores, files and episodes.

Both derive from `ValueError`, so callers may catch either the specific class or `ValueError`.
Missing files and stores raise the built-in `FileNotFoundError`.
"""

from __future__ import annotations

from diffpolicy.errors import InvalidValueError


class DataFormatError(InvalidValueError):
    """A store or file on disk does not have the expected layout (names the path and the key)."""


class EpisodeError(InvalidValueError):
    """An episode handed to `ReplayBuffer.add_episode(s)` is invalid (names the key and the index).

    `index`: the position of the rejected episode in the list given to `add_episodes` (None when
    the list itself is malformed).
    """

    def __init__(self, message: str, index: int | None = None):
        super().__init__(message)
        self.index = index
