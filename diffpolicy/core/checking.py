"""The scope in which the core trusts tensor values its caller has already validated.

The core's public functions check their inputs on every call. Checks of shapes and dtypes are
cheap; checks that read tensor *values* (times in [0, 1], s <= t, std >= 0) force a host-device
synchronisation on a GPU and block CUDA-graph capture. A loop that validated its inputs once (the
sampler does, per `sample` call) runs its steps inside `values_checked()`, where the core skips the
value checks and keeps the shape checks. The flag is a context variable: each thread (e.g. a
controller's inference worker) has its own.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

_VALUES_CHECKED: ContextVar[bool] = ContextVar("diffpolicy_core_values_checked", default=False)


@contextmanager
def values_checked() -> Iterator[None]:
    """Run a block whose tensor values the caller has validated: the core skips its value checks."""
    token = _VALUES_CHECKED.set(True)
    try:
        yield
    finally:
        _VALUES_CHECKED.reset(token)


def must_check_values() -> bool:
    """True unless inside `values_checked()`: whether a value check (a host-device sync) must run."""
    return not _VALUES_CHECKED.get()
