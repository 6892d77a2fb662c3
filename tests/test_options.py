"""Option files as data (hmoe_arch.options): one-line errors, and the checks that need neither torch nor basicsr."""
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from hmoe_arch.errors import OptionError
from hmoe_arch.options import (
    check_model_options,
    check_num_threads,
    is_strict_int,
    is_strict_number,
    load_yaml,
    precheck_option_file,
)

OPTIONS = Path(__file__).resolve().parents[1] / 'options'


@pytest.mark.parametrize('text, where, problem', [
    ('x: [\n', 'f.yml:2:1', "expected the node content, but found '<stream end>'"),
    ('a: 1\n b: 2\n', 'f.yml:2:3', 'mapping values are not allowed here'),
    ('a: "unclosed\n', 'f.yml:2:1', 'found unexpected end of stream'),
])
def test_a_yaml_error_is_one_line_with_line_and_column(text: str, where: str, problem: str) -> None:
    with pytest.raises(OptionError) as caught:
        load_yaml(text, 'f.yml')
    assert str(caught.value) == f'{where}: not valid YAML ({problem})'


@pytest.mark.parametrize('change, message', [
    ({'train': {'aux_loss_weight': 'abc'}}, "`train.aux_loss_weight` must be a number >= 0, got 'abc'"),
    ({'train': {'aux_loss_weight': -0.1}}, '`train.aux_loss_weight` must be a number >= 0, got -0.1'),
    ({'train': {'aux_loss_weight': float('nan')}}, '`train.aux_loss_weight` must be a number >= 0, got nan'),
    ({'train': {'routing_lr_scale': -1}}, '`train.routing_lr_scale` must be a number > 0, got -1'),
    ({'train': {'routing_lr_scale': True}}, '`train.routing_lr_scale` must be a number > 0, got True'),
    ({'train': {'skip_nonfinite': 1.5}}, '`train.skip_nonfinite` must be an integer >= 0, got 1.5'),
    ({'use_amp': 'fp16'}, "`use_amp` must be false or 'bf16', got 'fp16'"),
    ({'compile': 'yes'}, "`compile` must be true or false, got 'yes'"),
    ({'val': {'pbar': 'yes'}}, "`val.pbar` must be true or false, got 'yes'"),
    ({'tile': {'tile_size': 0, 'tile_pad': 4}}, '`tile.tile_size` must be a non-negative integer (tile_size >= 1)'),
])
def test_model_option_values_are_refused_naming_the_key(change: dict, message: str) -> None:
    opt = {'is_train': True, 'train': {}, **change}
    with pytest.raises(OptionError, match='MFGHMoEModel: ' + message.replace('(', r'\(').replace(')', r'\)')
                       .replace('[', r'\[')):
        check_model_options(opt)
    assert isinstance(OptionError('x'), ValueError)  # callers that caught the former ValueError still do


def test_train_keys_are_not_checked_outside_training() -> None:
    check_model_options({'is_train': False, 'train': {'aux_loss_weight': 'abc'}})
    with pytest.raises(OptionError, match='aux_loss_weight'):
        check_model_options({'train': {'aux_loss_weight': 'abc'}}, is_train=True)


def test_num_threads_is_auto_or_a_positive_integer() -> None:
    assert check_num_threads(None) is None and check_num_threads('auto') is None and check_num_threads(3) == 3
    for bad in (0, -2, 1.5, 'four', True):
        with pytest.raises(OptionError, match=r'^num_threads: expected an integer >= 1 or auto, got '):
            check_num_threads(bad)


def test_strict_int_and_number_refuse_booleans_and_strings() -> None:
    assert [is_strict_int(v) for v in (0, -3, 2**70, True, False, 1.0, '1', None)] == [True] * 3 + [False] * 5
    assert [is_strict_int(v, 1) for v in (1, 5, 0, -1, True, 1.5)] == [True, True, False, False, False, False]
    assert is_strict_int(0, 0) and not is_strict_int(-1, 0) and is_strict_int(-1, -1)
    assert [is_strict_number(v) for v in (0, 1.5, float('nan'), True, '2', None)] == [True] * 3 + [False] * 3


def test_tile_and_skip_nonfinite_bounds() -> None:
    check_model_options({'tile': {'tile_size': 1, 'tile_pad': 0}, 'train': {'skip_nonfinite': 0}}, is_train=True)
    for tile in ({'tile_size': 8, 'tile_pad': -1}, {'tile_size': True, 'tile_pad': 0},
                 {'tile_size': 8, 'tile_pad': 1.0}):
        with pytest.raises(OptionError, match=r'`tile\.tile_(size|pad)` must be a non-negative integer'):
            check_model_options({'tile': tile})
    with pytest.raises(OptionError, match=r'`train\.skip_nonfinite` must be an integer >= 0, got -1'):
        check_model_options({'train': {'skip_nonfinite': -1}}, is_train=True)


def test_precheck_refuses_what_basicsr_would_fail_on_later(tmp_path: Path) -> None:
    opt = yaml.safe_load((OPTIONS / 'train_ucm_x4.yml').read_text())
    assert precheck_option_file(OPTIONS / 'train_ucm_x4.yml')['name'] == opt['name']
    del opt['logger']['print_freq']
    path = tmp_path / 'x.yml'
    path.write_text(yaml.safe_dump(opt))
    with pytest.raises(OptionError, match=r'x.yml: training needs a `logger:` block with print_freq'):
        precheck_option_file(path)
    precheck_option_file(path, is_train=False)
    with pytest.raises(OptionError, match=r'num_threads: expected an integer >= 1 or auto, got 0'):
        precheck_option_file(OPTIONS / 'train_ucm_x4.yml', ['num_threads=0'], is_train=False)
    with pytest.raises(OptionError, match=r'routing_lr_scale` must be a number > 0, got -1'):
        precheck_option_file(OPTIONS / 'train_ucm_x4.yml', ['train:routing_lr_scale=-1'])


@pytest.mark.slow
def test_the_module_imports_neither_torch_nor_basicsr() -> None:
    code = ('import sys, hmoe_arch.options; '
            'print(sorted(m for m in ("torch", "basicsr", "cv2", "timm") if m in sys.modules))')
    result = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=120, cwd='/')
    assert (result.returncode, result.stdout.strip()) == (0, '[]'), result.stderr
