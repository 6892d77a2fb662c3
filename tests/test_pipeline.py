"""hmoe_arch.commands.pipeline: plugins are enabled by the user (``--plugin``, HMOE_ARCH_PLUGINS), never by an
option file alone, and only installed distributions are imported, never a file of the current or the script's
folder (``python -m`` puts the current folder first on ``sys.path``)."""
import argparse
import importlib.metadata
import importlib.util
import logging
import os.path as osp
import sys
import time
from pathlib import Path
from typing import Dict, List, Tuple

import pytest
import torch
import yaml

from hmoe_arch.commands import pipeline
from hmoe_arch.commands.cli import main
from hmoe_arch.commands.pipeline import PLUGINS_VARIABLE, enabled_plugins, import_plugins, plugin_distribution
from hmoe_arch.errors import OptionError

MARKER_CODE = "from pathlib import Path\nPath({marker!r}).write_text('imported')\n"
"""A module body that records that it was imported (writes the file ``marker``)."""
_SCANNED: Dict[Tuple[str, ...], Dict[str, List[str]]] = {}


@pytest.fixture(autouse=True)
def each_search_path_scanned_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """:func:`pipeline.installed_packages` reads the metadata of every installed distribution (about a second
    here) and depends only on the folders it searches, so each distinct search path is scanned once per session
    (a test that installs a package in a new folder gets a scan of its own)."""
    scan = pipeline.installed_packages

    def installed_packages() -> Dict[str, List[str]]:
        with pipeline._search_path_without(pipeline.untrusted_folders()):
            searched = tuple(sys.path)
        if searched not in _SCANNED:
            _SCANNED[searched] = scan()
        return _SCANNED[searched]
    monkeypatch.setattr(pipeline, 'installed_packages', installed_packages)


@pytest.fixture
def folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The current folder, first on ``sys.path`` as under ``python -m``; modules imported from it are forgotten
    after the test."""
    work = tmp_path / 'work'
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.syspath_prepend(str(work))
    before = set(sys.modules)
    yield work
    for name in set(sys.modules) - before:
        if name.startswith(('some_module', 'fake_plugin', 'hat')):
            del sys.modules[name]


def loose_module(folder: Path, name: str) -> Path:
    """``folder/name.py`` writing ``folder/name.imported`` when imported; returns that marker's path."""
    marker = folder / f'{name}.imported'
    (folder / f'{name}.py').write_text(MARKER_CODE.format(marker=str(marker)))
    return marker


def installed_package(site: Path, name: str, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Package ``name`` installed in ``site`` (a dist-info beside it, as ``pip install --target`` leaves it) and
    ``site`` on ``sys.path``; returns the marker its import writes."""
    marker = site / f'{name}.imported'
    (site / name).mkdir(parents=True)
    (site / name / '__init__.py').write_text(MARKER_CODE.format(marker=str(marker)))
    info = site / f'{name}-1.2.dist-info'
    info.mkdir()
    (info / 'METADATA').write_text(f'Metadata-Version: 2.1\nName: {name}\nVersion: 1.2\n')
    (info / 'top_level.txt').write_text(f'{name}\n')
    monkeypatch.setattr(sys, 'path', [*sys.path, str(site)])
    return marker


def test_enabled_plugins_are_the_flags_then_the_environment_variable() -> None:
    enabled = enabled_plugins(['hat', 'pkg.sub'], {PLUGINS_VARIABLE: ' other , hat,,pkg.sub '})
    assert enabled == {'hat': '--plugin', 'pkg.sub': '--plugin', 'other': 'HMOE_ARCH_PLUGINS'}
    assert enabled_plugins([], {}) == {}
    with pytest.raises(OptionError, match=r"^--plugin: expected a package name such as hat, got '\./evil'$"):
        enabled_plugins(['./evil'], {})
    with pytest.raises(OptionError, match=r"^HMOE_ARCH_PLUGINS: expected a package name such as hat, got 'a b'$"):
        enabled_plugins([], {PLUGINS_VARIABLE: 'a b'})


def test_an_option_files_plugins_import_nothing_unless_the_user_enabled_them(folder: Path) -> None:
    marker = loose_module(folder, 'some_module')
    with pytest.raises(OptionError) as error:
        import_plugins({'plugins': ['some_module', 'json', 'some_module']}, environ={})
    assert str(error.value) == (
        'plugins: the option file names some_module, json, and an option file cannot import code by itself; if you '
        'trust the package, install it and enable it with --plugin some_module --plugin json '
        '(or HMOE_ARCH_PLUGINS=some_module,json)')
    with pytest.raises(OptionError, match=r'^plugins: the option file names json, '):
        import_plugins({'plugins': ['some_module', 'json']}, requested=['some_module'], environ={})
    assert not marker.exists() and 'some_module' not in sys.modules


@pytest.mark.parametrize('entry', ['folder', 'empty'], ids=['python-m', 'python-c'])
@pytest.mark.parametrize('how', ['flag', 'environment'])
def test_a_module_of_the_current_folder_is_never_a_plugin(folder: Path, monkeypatch: pytest.MonkeyPatch,
                                                          entry: str, how: str) -> None:
    if entry == 'empty':  # python -c puts '' (the current folder) first
        monkeypatch.setattr(sys, 'path', ['', *sys.path[1:]])
    marker = loose_module(folder, 'some_module')
    requested, environ = (['some_module'], {}) if how == 'flag' else ([], {PLUGINS_VARIABLE: 'some_module'})
    source = '--plugin' if how == 'flag' else 'HMOE_ARCH_PLUGINS'
    with pytest.raises(OptionError) as error:
        import_plugins({'plugins': ['some_module']}, requested=requested, environ=environ)
    assert str(error.value) == (f'{source}: cannot import some_module as a plugin ({folder / "some_module.py"} is in '
                                "the current folder or the script's, which are never searched for plugins)")
    assert not marker.exists() and 'some_module' not in sys.modules


def test_a_module_of_the_scripts_folder_is_never_a_plugin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    scripts = tmp_path / 'bin'
    scripts.mkdir()
    (scripts / 'basicsr').write_text('')
    monkeypatch.setattr(sys, 'argv', [str(scripts / 'basicsr'), 'train'])
    monkeypatch.syspath_prepend(str(scripts))
    marker = loose_module(scripts, 'some_module')
    with pytest.raises(OptionError, match=r"is in the current folder or the script's, which are never searched"):
        import_plugins({}, requested=['some_module'], environ={})
    assert not marker.exists() and 'some_module' not in sys.modules


def test_a_file_of_the_current_folder_does_not_shadow_an_installed_plugin(folder: Path, tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    installed = installed_package(tmp_path / 'site', 'fake_plugin', monkeypatch)
    shadow = loose_module(folder, 'fake_plugin')
    with pytest.raises(OptionError) as error:
        import_plugins({}, requested=['fake_plugin'], environ={})
    assert str(error.value) == (
        f"--plugin: cannot import fake_plugin as a plugin ({folder / 'fake_plugin.py'} in the current folder or the "
        f"script's would be imported in place of the installed {tmp_path / 'site' / 'fake_plugin' / '__init__.py'}; "
        'rename it or run from another folder)')
    assert not shadow.exists() and not installed.exists() and 'fake_plugin' not in sys.modules


@pytest.mark.parametrize('name', ['json', 'antigravity', 'this'])
def test_standard_library_modules_are_not_plugins(folder: Path, name: str) -> None:
    already = name in sys.modules
    with pytest.raises(OptionError, match=rf'^--plugin: cannot import {name} as a plugin \(.*{name}(/__init__)?\.py '
                                          r'is not part of an installed distribution \(pip install it first\)\)$'):
        import_plugins({'plugins': [name]}, requested=[name], environ={})
    assert (name in sys.modules) == already


def test_a_missing_plugin_names_the_module(folder: Path) -> None:
    with pytest.raises(OptionError, match=r"^HMOE_ARCH_PLUGINS: cannot import no_such_plugin_package as a plugin "
                                          r"\(No module named 'no_such_plugin_package'\)$"):
        import_plugins({}, environ={PLUGINS_VARIABLE: 'no_such_plugin_package'})


def test_an_installed_plugin_is_imported_and_logged(folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                    basicsr_records: List[Tuple[int, str]]) -> None:
    marker = installed_package(tmp_path / 'site', 'fake_plugin', monkeypatch)
    assert plugin_distribution('fake_plugin', pipeline.installed_packages()) == ('fake_plugin', '1.2')
    assert import_plugins({'plugins': ['fake_plugin']}, environ={PLUGINS_VARIABLE: 'fake_plugin'}) == ['fake_plugin']
    assert marker.read_text() == 'imported'
    assert basicsr_records == [(logging.INFO, 'importing plugin fake_plugin (distribution fake_plugin 1.2), enabled by '
                                    'HMOE_ARCH_PLUGINS')]


def test_a_real_distribution_is_a_plugin(folder: Path, basicsr_log: List[str]) -> None:
    assert import_plugins({}, requested=['einops'], environ={PLUGINS_VARIABLE: 'einops'}) == ['einops']
    assert basicsr_log == [f'importing plugin einops (distribution einops {importlib.metadata.version("einops")}), '
                           'enabled by --plugin']


REAL_HAT_ABSENT = pytest.mark.skipif(importlib.util.find_spec('hat') is not None,
                                     reason='a real HAT is installed: these tests put a fake one in its place')


@REAL_HAT_ABSENT
def test_an_installed_known_package_is_imported_for_its_type(folder: Path, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch,
                                                              basicsr_log: List[str]) -> None:
    marker = installed_package(tmp_path / 'site', 'hat', monkeypatch)
    assert import_plugins({'model_type': 'HATModel'}, environ={}) == ['hat']
    assert marker.exists()
    assert basicsr_log == ['importing plugin hat (distribution hat 1.2), because model_type names its type HATModel']


@REAL_HAT_ABSENT
def test_a_known_package_in_the_current_folder_is_not_imported_for_its_type(folder: Path) -> None:
    (folder / 'hat').mkdir()
    marker = folder / 'hat.imported'
    (folder / 'hat' / '__init__.py').write_text(MARKER_CODE.format(marker=str(marker)))
    with pytest.raises(OptionError) as error:
        import_plugins({'model_type': 'HATModel'}, environ={})
    assert str(error.value) == (
        f"model_type: HATModel comes from HAT (the `hat` package), which cannot be imported ({folder / 'hat'}"
        "/__init__.py is in the current folder or the script's, which are never searched for plugins); install it "
        '(pip install --no-deps -e <your HAT checkout>) or use model_type: MFGHMoEModel, which adds what HATModel '
        'does (window padding, tiling)')
    assert not marker.exists() and 'hat' not in sys.modules


def test_an_unregistered_type_says_how_to_enable_a_plugin() -> None:
    with pytest.raises(OptionError, match=r'^network_g.type: no network named NoSuchArch is registered in BasicSR '
                                          r'or this plugin; if another package provides it, install it and enable '
                                          r'it with --plugin PACKAGE \(or HMOE_ARCH_PLUGINS=PACKAGE\)$'):
        import_plugins({'network_g': {'type': 'NoSuchArch'}}, environ={})


# ------------------------------------------------------------------------------------------------------
# the run's folder is experiments/<name> or results/<name>, never another; stray files in training_states/
NOT_ONE_FOLDER = '`name` must be one folder name (a string without / or \\, not . or ..), got '


def option_file(folder: Path, **options) -> Path:
    """``folder/x.yml``: the smallest option file ``train`` and ``test`` read, with ``options`` on top."""
    path = folder / 'x.yml'
    path.write_text(yaml.safe_dump({'name': 'run', 'datasets': {}, 'path': {},
                                    'logger': {'print_freq': 1, 'save_checkpoint_freq': 1}, **options}))
    return path


def files_under(root: Path) -> List[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob('*'))


@pytest.mark.parametrize('command', ['train', 'test'])
@pytest.mark.parametrize('name', ['<victim>', '../..', '..', 'a/b', 123], ids=['absolute', '../..', '..', 'a/b', '123'])
def test_a_name_that_is_not_one_folder_is_refused_and_nothing_is_touched(command: str, name, tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch,
                                                                          basicsr_log: List[str]) -> None:
    victim = tmp_path / 'victim'  # an unrelated folder BasicSR would rename to victim_archived_<time>
    victim.mkdir()
    (victim / 'data.txt').write_text('keep')
    work = tmp_path / 'a' / 'work'
    work.mkdir(parents=True)
    monkeypatch.chdir(work)
    name = str(victim) if name == '<victim>' else name
    for in_file, force in (({'name': name}, []), ({}, ['--force_yml', f'name={name}'])):
        path = option_file(work, **in_file)
        before = files_under(tmp_path)
        assert main([command, '-opt', str(path), *force]) == 2
        assert basicsr_log[-1] == f'basicsr {command}: {path}: {NOT_ONE_FOLDER}{name!r}'
        assert files_under(tmp_path) == before and (victim / 'data.txt').read_text() == 'keep'


def parse_args(path: Path, **flags) -> argparse.Namespace:
    """What ``basicsr train|test -opt path`` parses to."""
    return argparse.Namespace(**{'opt': str(path), 'force_yml': None, 'launcher': 'none', 'plugin': [],
                                 'auto_resume': False, 'debug': False, **flags})


def test_the_run_folder_is_under_experiments_or_results_of_the_root(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    path = option_file(tmp_path, name='my_run')
    opt = pipeline.parse_options(parse_args(path), str(tmp_path), is_train=True)
    root = osp.join(str(tmp_path), 'experiments', 'my_run')
    assert (opt['path']['experiments_root'], opt['path']['models'], opt['path']['log']) == (
        root, osp.join(root, 'models'), root)
    assert pipeline.parse_options(parse_args(path, debug=True), str(tmp_path), is_train=True)['path']['log'] == \
        osp.join(str(tmp_path), 'experiments', 'debug_my_run')
    assert pipeline.parse_options(parse_args(path), str(tmp_path), is_train=False)['path']['results_root'] == \
        osp.join(str(tmp_path), 'results', 'my_run')
    # checked again on the final path, whatever read the options
    for name in ('..', '../elsewhere', str(tmp_path / 'victim'), '.'):
        unchecked = {**yaml.safe_load(path.read_text()), 'name': name}
        monkeypatch.setattr(pipeline, 'precheck_option_file', lambda *args, **kwargs: dict(unchecked))
        for is_train, folder in ((True, 'experiments'), (False, 'results')):
            with pytest.raises(OptionError) as caught:
                pipeline.parse_options(parse_args(path), str(tmp_path), is_train=is_train)
            assert str(caught.value) == (f'{path}: `name` must be one folder name, got {name!r} (the run would not '
                                         f'be in {osp.join(str(tmp_path), folder)})')


@pytest.mark.parametrize('change, message', [
    ({'datasets': {'train': {'dataroot_gt': 123}}}, '`datasets.train.dataroot_gt` must be a path, got 123'),
    ({'datasets': {'val': {'dataroot_lq': ['a']}}}, "`datasets.val.dataroot_lq` must be a path, got ['a']"),
    ({'path': {'resume_state': 5}}, '`path.resume_state` must be a path, got 5'),
    ({'path': {'pretrain_network_g': True}}, '`path.pretrain_network_g` must be a path, got True'),
])
def test_a_path_option_that_is_not_a_string_is_one_line(change: dict, message: str, tmp_path: Path) -> None:
    path = option_file(tmp_path, **change)
    with pytest.raises(OptionError) as caught:
        pipeline.parse_options(parse_args(path), str(tmp_path), is_train=True)
    assert str(caught.value) == f'{path}: {message}'


@pytest.mark.parametrize('text, message', [
    ('a: &a [*a]\n', ':1:8: the alias *a is inside the node it names'),
    ('a: ' + '[' * 10_000 + ']' * 10_000 + '\n', ':1:35: more than 32 nested sequences or mappings'),
    ('name: x\nvalues: [' + ', '.join(['7'] * 520_000) + ']\n', ': more than 100000 values, the most an option file '),
    ('name: x\ndatasets: {}\npath: ~\n', ': `path` must be a mapping, got None'),
    ('name: x\ndatasets: {train: ~}\npath: {}\n', ': `datasets.train` must be a mapping of dataset options, got None'),
], ids=['recursive alias', 'deep nesting', '2 MB of values', 'path: ~', 'datasets.train: ~'])
def test_a_bad_option_file_is_one_line_in_process_and_quick(text: str, message: str, tmp_path: Path,
                                                            basicsr_log: List[str]) -> None:
    path = tmp_path / 'x.yml'
    path.write_text(text)
    start = time.monotonic()
    assert main(['train', '-opt', str(path)]) == 2
    assert time.monotonic() - start < 5  # a bound on the behaviour (no minute-long walk), not a benchmark
    assert basicsr_log[-1].startswith(f'basicsr train: {path}{message}') and '\n' not in basicsr_log[-1]


def test_auto_resume_ignores_files_not_named_like_a_training_state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                   basicsr_records: List[Tuple[int, str]]) -> None:
    monkeypatch.chdir(tmp_path)
    states = Path('experiments', 'exp', 'training_states')
    states.mkdir(parents=True)
    for stray in ('old.state', 'best.state', '1e3.state', '10.state.bak', 'notes.txt'):
        (states / stray).write_bytes(b'not a training state')
    opt = {'num_gpu': 0, 'auto_resume': True, 'name': 'exp', 'path': {'resume_state': None}}
    assert pipeline.load_resume_state(opt) is None  # nothing to resume from: training starts afresh
    for iteration in (2, 10):
        torch.save({'iter': iteration, 'epoch': 0}, states / f'{iteration}.state')
    state = pipeline.load_resume_state(opt)
    assert state['iter'] == 10 and opt['path']['resume_state'] == str(states / '10.state')
    warnings = [message for level, message in basicsr_records if level == logging.WARNING]
    assert warnings == [f'auto_resume: ignoring 1e3.state, best.state, old.state in {states}: not named '
                        '<iteration>.state, as BasicSR names the training states it writes'] * 2
