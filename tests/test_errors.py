"""One error hierarchy: every refusal derives from HmoeError and carries the exit status the command line uses."""
import pytest

from hmoe_arch import errors
from hmoe_arch.commands.cli import main

ERRORS = [errors.OptionError, errors.PrepareError, errors.ImageError, errors.DatasetError, errors.DatasetNotFoundError,
          errors.CheckpointError, errors.ConfigError, errors.NonFiniteLossError]


@pytest.mark.parametrize('error', ERRORS, ids=lambda e: e.__name__)
def test_every_error_is_an_hmoe_error_with_an_exit_status(error: type) -> None:
    assert issubclass(error, errors.HmoeError)
    assert error.exit_status == (3 if error is errors.NonFiniteLossError else 2)


def test_built_in_bases_stay_for_callers_that_catch_them() -> None:
    assert issubclass(errors.DatasetNotFoundError, FileNotFoundError)
    assert all(issubclass(e, ValueError) for e in (errors.ImageError, errors.DatasetError, errors.CheckpointError,
                                                    errors.ConfigError))
    assert issubclass(errors.NonFiniteLossError, RuntimeError)


@pytest.mark.parametrize('error', ERRORS, ids=lambda e: e.__name__)
def test_the_command_line_prints_one_line_and_exits_with_the_status(error: type, monkeypatch, basicsr_log) -> None:
    def refuse(*args, **kwargs):
        raise error('somewhere.yml: what was expected')

    monkeypatch.setattr('hmoe_arch.commands.export.export', refuse)
    assert main(['export', '--weights', 'w.pth', '--out', 'w.safetensors']) == error.exit_status
    assert basicsr_log[-1] == 'basicsr export: somewhere.yml: what was expected'


def test_the_modules_that_raise_them_export_them_too() -> None:
    from hmoe_arch.commands.prepare import PrepareError
    from hmoe_arch.data.rs_paired_dataset import DatasetError
    from hmoe_arch.models import NonFiniteLossError
    from hmoe_arch.options import OptionError
    assert (PrepareError, DatasetError, NonFiniteLossError, OptionError) == (
        errors.PrepareError, errors.DatasetError, errors.NonFiniteLossError, errors.OptionError)
