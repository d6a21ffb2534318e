"""The one error family of diffpolicy: every error raised for bad input is a `DiffpolicyError`.

Each concrete error also derives from the built-in exception a caller would expect (`ValueError`,
`TypeError`, `FileNotFoundError`), so generic handlers keep working. The command line catches
`DiffpolicyError` once (`diffpolicy.cli.main`): it prints the message and exits with code 2.
Messages name what was expected, what came, and where (file, key, index).
"""

from __future__ import annotations


class DiffpolicyError(Exception):
    """Base of every error diffpolicy raises for bad input (configs, files, tensors, arguments)."""


class InvalidValueError(DiffpolicyError, ValueError):
    """A value is out of range, of the wrong shape, or inconsistent with another."""


class InvalidTypeError(DiffpolicyError, TypeError):
    """A value has the wrong type or dtype."""


class MissingFileError(DiffpolicyError, FileNotFoundError):
    """A file or directory the call needs does not exist (the message says which, and what makes it)."""


class MissingKeyError(DiffpolicyError, KeyError):
    """A key (data key, episode meta, observation) is not in the store or mapping asked."""

    def __str__(self) -> str:  # KeyError would show the message quoted
        return str(self.args[0]) if self.args else ""


class InvalidIndexError(DiffpolicyError, IndexError):
    """An index (step, episode, token) is out of range."""


class ReadOnlyError(DiffpolicyError, PermissionError):
    """A write was asked of something opened read-only (a store opened with mode='r')."""


class InvalidStateError(DiffpolicyError, RuntimeError):
    """An object is used in a state that does not allow the call (step before reset, autograd off)."""


class ExistingFileError(DiffpolicyError, FileExistsError):
    """A file or directory exists where the call would create a new one (and overwrite was not asked)."""


class ConfigError(InvalidValueError):
    """A configuration has an unknown key, a missing key, or a value of the wrong type or range."""


class UsageError(InvalidValueError):
    """A command-line value is out of range or a combination of options is not allowed."""
