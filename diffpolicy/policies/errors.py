"""Errors raised by `diffpolicy.policies` for bad configs, observations, statistics and checkpoints.

Each is a subclass of the built-in exception a caller would expect (`ValueError`, `TypeError`,
`FileNotFoundError`), so generic handlers keep working; the messages name what was expected,
what came, and where (file, key, index).
"""

from __future__ import annotations

from diffpolicy.errors import ConfigError, InvalidValueError

__all__ = ["CheckpointError", "CheckpointNotFoundError", "ConfigError", "NormalizerError", "ObservationDtypeError",
           "ObservationError", "PickleRefusedError"]


class ObservationError(InvalidValueError):
    """An observation dict has missing or extra keys, a wrong shape, or non-finite values."""


class ObservationDtypeError(ObservationError, TypeError):
    """An observation has the wrong dtype (images must be uint8, low-dim keys floating point)."""


class NormalizerError(InvalidValueError):
    """Normalizer statistics are missing for a key, or do not match the data's dimension."""


class CheckpointError(InvalidValueError):
    """A checkpoint is malformed, tampered with, of an unsupported version, or mismatched."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """A checkpoint directory or one of its files does not exist."""


class PickleRefusedError(CheckpointError):
    """A file offered as weights is a pickle (or `torch.save` archive); diffpolicy never unpickles."""
