"""Option files as data (hmoe_arch.options): one-line errors, and the checks that need neither torch nor basicsr."""
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from hmoe_arch import options
from hmoe_arch.errors import OptionError
from hmoe_arch.options import (
    MAX_OPTION_DEPTH,
    MAX_OPTION_VALUES,
    check_folder_name,
    check_model_options,
    check_num_threads,
    is_strict_int,
    is_strict_number,
    load_yaml,
    precheck_option_file,
    read_option_file,
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


# ------------------------------------------------------------------------------------------------------
# limits of an option file: values, nesting, recursive aliases (one line, quickly)
TOO_MANY = f'more than {MAX_OPTION_VALUES} values, the most an option file may hold (real ones hold a few hundred)'
TOO_DEEP = f'more than {MAX_OPTION_DEPTH} nested sequences or mappings'


def refusal(text: str, source: str = 'f.yml') -> str:
    """The message :func:`load_yaml` refuses ``text`` with (fails if it is accepted)."""
    with pytest.raises(OptionError) as caught:
        load_yaml(text, source)
    return str(caught.value)


@pytest.fixture(params=['libyaml', 'pure-python'])
def parser(request, monkeypatch: pytest.MonkeyPatch) -> str:
    """Each test runs with the events from libyaml (where PyYAML has it) and from PyYAML's own parser."""
    if request.param == 'pure-python':
        monkeypatch.delattr(yaml, 'CSafeLoader', raising=False)
    elif not hasattr(yaml, 'CSafeLoader'):
        pytest.skip('PyYAML was built without libyaml')
    return request.param


@pytest.mark.parametrize('text, column, anchor', [
    ('a: &a [*a]\n', 8, 'a'),
    ('a: &a {b: *a}\n', 11, 'a'),
    ('x: &top\n  y: [1, {z: *top}]\n', 14, 'top'),
])
def test_a_recursive_alias_is_refused_in_one_line(parser: str, text: str, column: int, anchor: str) -> None:
    line = text.count('\n', 0, text.index(f'*{anchor}')) + 1
    assert refusal(text) == (f'f.yml:{line}:{column}: the alias *{anchor} is inside the node it names (a structure '
                             'that contains itself); option files are trees')


def test_nesting_past_the_limit_is_refused_in_one_line(parser: str) -> None:
    nested = load_yaml('[' * MAX_OPTION_DEPTH + ']' * MAX_OPTION_DEPTH, 'f.yml')
    for _ in range(MAX_OPTION_DEPTH - 1):
        nested = nested[0]
    assert nested == []
    deep = MAX_OPTION_DEPTH + 1
    assert refusal('[' * deep + ']' * deep).startswith(f'f.yml:1:{deep}: {TOO_DEEP}, the most an option file may')
    assert refusal('{a: ' * deep + '1' + '}' * deep).startswith(f'f.yml:1:{4 * deep - 3}: {TOO_DEEP},')
    block = ''.join(f'{"  " * level}k{level}:\n' for level in range(deep)) + '  ' * deep + 'end: 1\n'
    assert refusal(block).startswith(f'f.yml:{deep}:{2 * deep - 1}: {TOO_DEEP},')
    start = time.monotonic()  # 10000 levels in 20 kB: no RecursionError, no traceback
    assert refusal('a: ' + '[' * 10000 + ']' * 10000 + '\n').startswith(f'f.yml:1:{MAX_OPTION_DEPTH + 3}: {TOO_DEEP}')
    assert time.monotonic() - start < 5


def test_aliases_cannot_nest_past_the_limit(parser: str) -> None:
    chain = ['a0: &a0 [0]'] + [f'a{i}: &a{i} [*a{i - 1}]' for i in range(1, MAX_OPTION_DEPTH + 5)]
    assert f'{TOO_DEEP} once its aliases are expanded' in refusal('\n'.join(chain) + '\n')
    merges = ['m0: &m0 {x: 0}'] + [f'm{i}: &m{i} {{<<: *m{i - 1}, y{i}: {i}}}' for i in range(1, MAX_OPTION_DEPTH + 5)]
    assert f'{TOO_DEEP} once its aliases are expanded' in refusal('\n'.join(merges) + '\n')
    shallow = load_yaml('\n'.join(merges[:4]) + '\n', 'f.yml')
    assert shallow['m3'] == {'x': 0, 'y1': 1, 'y2': 2, 'y3': 3}
    assert load_yaml('\n'.join(chain[:3]) + '\n', 'f.yml') == {'a0': [0], 'a1': [[0]], 'a2': [[[0]]]}


def test_values_are_counted_with_mapping_keys_up_to_the_limit(parser: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(options, 'MAX_OPTION_VALUES', 12)
    nine = ', '.join(str(i) for i in range(1, 10))
    assert load_yaml(f'a: [{nine}]\n', 'f.yml') == {'a': list(range(1, 10))}  # 9 + the list + its key + the top
    assert refusal(f'a: [{nine}, 10]\n') == ('f.yml: more than 12 values, the most an option file may hold (real '
                                             'ones hold a few hundred)')
    assert refusal('{' + ', '.join(f'k{i}: {i}' for i in range(6)) + '}').startswith('f.yml: more than 12 values')
    shared = 'a: &a [1, 2]\nb: *a\n'  # written: the top mapping, a, [1, 2] (3), b = 6; with *a expanded: 9
    assert load_yaml(shared, 'f.yml') == {'a': [1, 2], 'b': [1, 2]}
    assert refusal(shared + 'c: *a\n') == ('f.yml: its YAML aliases expand to more than 12 values (an alias bomb?); '
                                           'write the options out without nested aliases')


@pytest.mark.parametrize('shape', ['block list', 'flow list', 'many keys'])
def test_plain_values_past_the_limit_are_refused_quickly_naming_the_limit(shape: str, tmp_path: Path) -> None:
    count = {'block list': 350_000, 'flow list': 520_000, 'many keys': 150_000}[shape]  # about 2 MB
    text = {'block list': 'name: x\nvalues:\n' + ''.join(f'  - {i % 10}\n' for i in range(count)),
            'flow list': 'name: x\nvalues: [' + ', '.join(str(i % 10) for i in range(count)) + ']\n',
            'many keys': 'name: x\n' + ''.join(f'key{i}: {i % 10}\n' for i in range(count))}[shape]
    path = tmp_path / 'big.yml'
    path.write_text(text)
    assert 1.5e6 < path.stat().st_size < options.MAX_OPTION_BYTES
    start = time.monotonic()
    with pytest.raises(OptionError) as caught:
        read_option_file(path)
    assert time.monotonic() - start < 5  # the whole file is never composed: counting stops at the limit
    assert str(caught.value) == f'{path}: {TOO_MANY}'  # not "alias bomb": this file has no alias


def test_a_large_file_within_the_limits_is_accepted_quickly(tmp_path: Path) -> None:
    path = tmp_path / 'large.yml'
    path.write_text('name: large\n' + ''.join(f'key{i:05d}: {"v" * 36}\n' for i in range(40_000)))
    assert path.stat().st_size > 1.8e6
    start = time.monotonic()
    opt = read_option_file(path)
    assert time.monotonic() - start < 5
    assert len(opt) == 40_001 and opt['key39999'] == 'v' * 36


def test_what_pyyaml_refuses_is_still_refused_with_its_message() -> None:
    # libyaml accepts a tab after `key:`; PyYAML, which this package has always used, does not
    assert refusal('a:\t1\n') == "f.yml:1:3: not valid YAML (found character '\\t' that cannot start any token)"
    assert refusal('a: 1\n---\nb: 2\n').startswith('f.yml:2:1: not valid YAML (but found another document')
    assert load_yaml('a: 1e3\nb: .inf\nc: 0x1F\nd: "\\u00e9"\ne: |\n  two\n  lines\n', 'f.yml') == {
        'a': '1e3', 'b': float('inf'), 'c': 31, 'd': '\u00e9', 'e': 'two\nlines\n'}


# ------------------------------------------------------------------------------------------------------
# `name` is one folder name; top-level blocks are mappings
BAD_NAMES = ['/abs/folder', '../..', '..', '.', '', 'a/b', 'a\\b', 'x\0y', 'C:evil', 123, None, True, ['a']]


@pytest.mark.parametrize('name', BAD_NAMES, ids=repr)
def test_a_name_that_is_not_one_folder_name_is_refused(name, tmp_path: Path) -> None:
    path = tmp_path / 'x.yml'
    opt = yaml.safe_load((OPTIONS / 'train_ucm_x4.yml').read_text())
    path.write_text(yaml.safe_dump({**opt, 'name': name}))
    expected = f'{path}: `name` must be one folder name (a string without / or \\, not . or ..), got {name!r}'
    for read in (precheck_option_file, read_option_file):  # train/test and bench
        with pytest.raises(OptionError) as caught:
            read(path)
        assert str(caught.value) == expected
    dataset = {**opt, 'datasets': {**opt['datasets'], 'test_1': {**opt['datasets']['val'], 'name': name}}}
    path.write_text(yaml.safe_dump(dataset))
    with pytest.raises(OptionError, match=r'x.yml: `datasets\.test_1\.name` must be one folder name'):
        read_option_file(path)


def test_a_name_is_checked_after_force_yml_and_good_names_pass(tmp_path: Path) -> None:
    for entry in ('name=../..', 'name=/tmp/elsewhere', 'name=~', 'datasets:val:name=../x'):
        with pytest.raises(OptionError, match=r'must be one folder name'):
            precheck_option_file(OPTIONS / 'train_ucm_x4.yml', [entry])
    for good in ('train_x4', 'débug run 1', '.hidden', 'x..y', '~user'):
        assert check_folder_name(good, 'name', 'f.yml') == good
    assert precheck_option_file(OPTIONS / 'train_ucm_x4.yml', ['name=my_run'])['name'] == 'my_run'
    long = 'a/' * 100
    with pytest.raises(OptionError) as caught:
        check_folder_name(long, 'name', 'f.yml')
    assert str(caught.value).endswith(f'got {repr(long)[:77]}...')


@pytest.mark.parametrize('change, message', [
    ({'path': None}, '`path` must be a mapping, got None'),
    ({'datasets': None}, '`datasets` must be a mapping, got None'),
    ({'datasets': {'train': None}}, '`datasets.train` must be a mapping of dataset options, got None'),
    ({'datasets': {'val': [1]}}, '`datasets.val` must be a mapping of dataset options, got [1]'),
])
def test_top_level_blocks_that_are_not_mappings_are_refused(change: dict, message: str, tmp_path: Path) -> None:
    path = tmp_path / 'x.yml'
    path.write_text(yaml.safe_dump({**yaml.safe_load((OPTIONS / 'train_ucm_x4.yml').read_text()), **change}))
    with pytest.raises(OptionError) as caught:
        precheck_option_file(path)
    assert str(caught.value) == f'{path}: {message}'
