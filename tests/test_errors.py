"""One error family: the command line catches DiffpolicyError once, and the suite's bad-input tests
(every `pytest.raises`, see conftest.py) fail when diffpolicy raises outside the family."""

import conftest
import pytest
from conftest import PACKAGE_DIR, raised_outside_the_family

from diffpolicy import errors
from diffpolicy.cli import main


@pytest.mark.parametrize("error, builtin", [
    (errors.InvalidValueError, ValueError), (errors.InvalidTypeError, TypeError),
    (errors.MissingFileError, FileNotFoundError), (errors.ExistingFileError, FileExistsError),
    (errors.MissingKeyError, KeyError), (errors.InvalidIndexError, IndexError),
    (errors.ReadOnlyError, PermissionError), (errors.InvalidStateError, RuntimeError),
    (errors.ConfigError, ValueError), (errors.UsageError, ValueError),
])
def test_every_flavour_is_in_the_family_and_keeps_its_builtin(error, builtin):
    assert issubclass(error, errors.DiffpolicyError) and issubclass(error, builtin)


def test_missing_key_error_reads_like_the_others():
    assert str(errors.MissingKeyError("store.zarr: no data key 'x'")) == "store.zarr: no data key 'x'"


@pytest.mark.parametrize("argv, message", [
    (["eval", "--checkpoint", "/no/such/run"], "diffpolicy eval: error: no checkpoint at /no/such/run"),
    (["train", "--task", "no_such_task"], "diffpolicy train: error: unknown task 'no_such_task'"),
    (["demo", "--p-left", "2"], "diffpolicy demo: error: --p-left must be in [0, 1], got 2.0"),
])
def test_the_command_line_reports_a_diffpolicy_error_once_with_exit_code_2(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("error:") == 1


def test_the_family_check_itself():
    """A builtin raised from a file of the package is flagged; one in the family, or raised by a
    library, is not."""
    fake_module = str(PACKAGE_DIR / "core" / "not_a_real_module.py")
    with conftest._pytest_raises(ValueError) as outside:
        exec(compile("raise ValueError('bad')", fake_module, "exec"))
    assert raised_outside_the_family(outside) == "diffpolicy/core/not_a_real_module.py:1"
    with conftest._pytest_raises(ValueError) as inside:
        exec(compile("raise InvalidValueError('bad')", fake_module, "exec"),
             {"InvalidValueError": errors.InvalidValueError})
    assert raised_outside_the_family(inside) is None
    with conftest._pytest_raises(ValueError) as elsewhere:  # raised by a library, not by diffpolicy
        int("x")
    assert raised_outside_the_family(elsewhere) is None
