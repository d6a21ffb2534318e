"""Errors of the real-time controller (all `DiffpolicyError`s)."""

from __future__ import annotations

from diffpolicy.errors import InvalidValueError, MissingFileError


class ControlError(InvalidValueError):
    """A controller input is invalid: a mode name, a delay, a chunk, an observation."""


class ProfileError(InvalidValueError):
    """A robot profile is missing limits or has inconsistent ones (the message names file and key)."""


class ProfileMissingError(MissingFileError):
    """The robot profile file does not exist."""
