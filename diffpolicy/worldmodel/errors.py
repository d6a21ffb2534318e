"""Errors of world-model training and dream fine-tuning: bad input found before any work is done."""

from diffpolicy.errors import InvalidValueError


class WorldModelError(InvalidValueError):
    """A world model cannot be trained, loaded or dreamt in with what it was given."""
