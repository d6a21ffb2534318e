"""Shared test settings: headless rendering and a bounded thread count on the 2-core CI machine."""

import os

os.environ.setdefault("MUJOCO_GL", "egl")
# Idle OpenMP threads spin by default; on a loaded 2-core machine that makes small ops 30x slower.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

# ---------------------------------------------------------------------------- one error family
# Every `pytest.raises` in the suite (the bad-input tests) also checks that an exception raised by
# diffpolicy's own code is a DiffpolicyError, the one family the command line catches.
import contextlib  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from diffpolicy.errors import DiffpolicyError  # noqa: E402

PACKAGE_DIR = Path(__file__).resolve().parents[1] / "diffpolicy"
_pytest_raises = pytest.raises


def raised_outside_the_family(info: pytest.ExceptionInfo) -> str | None:
    """Where diffpolicy raised `info`'s exception without it being a DiffpolicyError, else None."""
    frame = info.traceback[-1]
    path = Path(str(frame.path)).resolve()
    if isinstance(info.value, DiffpolicyError) or PACKAGE_DIR not in path.parents:
        return None
    return f"{path.relative_to(PACKAGE_DIR.parent)}:{frame.lineno + 1}"


@contextlib.contextmanager
def raises_in_the_family(expected_exception, *args, **kwargs):
    with _pytest_raises(expected_exception, *args, **kwargs) as info:
        yield info
    where = raised_outside_the_family(info)
    if where is not None:
        pytest.fail(f"{type(info.value).__name__} raised by diffpolicy at {where} is not a DiffpolicyError: "
                    f"{info.value}")


pytest.raises = raises_in_the_family
