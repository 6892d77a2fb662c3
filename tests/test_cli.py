"""``basicsr train|test|prepare``: option handling, CPU training with checkpoints and resume, evaluation,
two-process distributed training."""
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import List

import pytest
import torch

from hmoe_arch.commands.cli import build_parser, main

from util import TINY_TRAINING

pytestmark = pytest.mark.slow  # trains and runs the command line in subprocesses

OPTIONS = Path(__file__).resolve().parents[1] / 'options'


def basicsr(args: List[str], cwd: Path, timeout: int = 300, launcher: List[str] = None):
    command = (launcher or [sys.executable, '-m', 'hmoe_arch']) + args
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def cwd(workdir: Path, tmp_path: Path) -> Path:
    """A fresh run directory whose datasets/ is the prepared synthetic UCMerced."""
    (tmp_path / 'datasets').symlink_to(workdir / 'datasets')
    return tmp_path


# ------------------------------------------------------------------------------------------------------
# options
def test_flags_are_basicsrs() -> None:
    args = build_parser().parse_args(['train', '-opt', 'x.yml', '--launcher', 'pytorch', '--auto_resume', '--debug',
                                      '--force_yml', 'a=1', 'b:c=2'])
    assert (args.opt, args.launcher, args.auto_resume, args.debug, args.force_yml) == ('x.yml', 'pytorch', True, True,
                                                                                        ['a=1', 'b:c=2'])
    assert build_parser().parse_args(['test', '-opt', 'y.yml', '--local-rank', '1']).local_rank == 1


def test_bad_option_file_exits_2_naming_it(tmp_path: Path, capsys) -> None:
    assert main(['train', '-opt', str(tmp_path / 'none.yml')]) == 2
    bad = tmp_path / 'bad.yml'
    bad.write_text('name: [unclosed\n')
    assert main(['test', '-opt', str(bad)]) == 2
    assert main(['train', '-opt', str(OPTIONS / 'train_ucm_x4.yml'), '--force_yml', 'nothing:here=1']) == 2
    assert main(['train', '-opt', str(OPTIONS / 'train_ucm_x4.yml'), '--launcher', 'pytorch']) == 2


HEAVY = ('torch', 'basicsr', 'timm', 'cv2')
PROBE = ('import sys; from hmoe_arch.commands.cli import main; status = main(sys.argv[1:]); '
         f'print(status, sorted(m for m in {HEAVY!r} if m in sys.modules))')


def test_help_imports_nothing_heavy() -> None:
    # what `python -X importtime -m hmoe_arch --help` shows: no torch, basicsr, timm or OpenCV
    result = subprocess.run([sys.executable, '-X', 'importtime', '-m', 'hmoe_arch', '--help'], capture_output=True,
                            text=True, timeout=120, cwd='/')
    assert result.returncode == 0 and 'usage: basicsr' in result.stdout
    imported = {line.rsplit('|', 1)[-1].strip() for line in result.stderr.splitlines()
                if line.startswith('import time')}
    assert 'hmoe_arch.commands.cli' in imported
    assert not imported & set(HEAVY)


@pytest.mark.parametrize('content, force, message', [
    (None, [], 'cannot read the option file (No such file or directory)'),
    ('name: [unclosed\n', [], ':2:1: not valid YAML (expected'),
    ('train_ucm_x4.yml', ['train:aux_loss_weight=abc'], "`train.aux_loss_weight` must be a number >= 0, got 'abc'"),
    ('train_ucm_x4.yml', ['train:routing_lr_scale=-1'], '`train.routing_lr_scale` must be a number > 0, got -1'),
    ('train_ucm_x4.yml', ['num_threads=0'], 'num_threads: expected an integer >= 1 or auto, got 0'),
    ('train_ucm_x4.yml', ['logger={}'], 'training needs a `logger:` block with print_freq and save_checkpoint_freq'),
], ids=['missing', 'yaml', 'aux_loss_weight', 'routing_lr_scale', 'num_threads', 'logger'])
def test_a_refused_option_file_is_one_line_before_the_heavy_imports(content, force, message, tmp_path: Path) -> None:
    path = tmp_path / 'x.yml'
    if content is not None:
        path.write_text((OPTIONS / content).read_text() if content.endswith('.yml') else content)
    command = ['train', '-opt', str(path)] + (['--force_yml', *force] if force else [])
    result = subprocess.run([sys.executable, '-c', PROBE, *command], capture_output=True, text=True, timeout=120,
                            cwd=tmp_path)
    assert result.stdout.strip() == '2 []', result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and ' ERROR: basicsr train: ' in lines[0] and message in lines[0], lines


def test_model_option_errors_are_one_line_in_process(basicsr_log) -> None:
    assert main(['train', '-opt', str(OPTIONS / 'train_ucm_x4.yml'), '--force_yml', 'train:aux_loss_weight=abc']) == 2
    assert basicsr_log[-1] == ("basicsr train: MFGHMoEModel: `train.aux_loss_weight` must be a number >= 0, "
                               "got 'abc'")


def test_num_threads_flag(tmp_path: Path) -> None:
    assert build_parser().parse_args(['infer', '--weights', 'w', '--input', 'i', '--output', 'o',
                                      '--num-threads', '3']).num_threads == 3
    assert build_parser().parse_args(['bench', 'x.yml', '--num-threads', 'auto']).num_threads is None
    result = subprocess.run([sys.executable, '-m', 'hmoe_arch', 'export', '--weights', 'w', '--out', 'o',
                             '--num-threads', '0'], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert result.returncode == 2
    assert "argument --num-threads: expected an integer >= 1 or auto, got '0'" in result.stderr


# ------------------------------------------------------------------------------------------------------
# training and evaluation on CPU
def test_train_on_cpu_with_validation_checkpoints_and_tensorboard(cwd: Path) -> None:
    run = basicsr(['train', '-opt', str(OPTIONS / 'train_ucm_x4.yml'), '--force_yml', *TINY_TRAINING,
                   'train:total_iter=4', 'val:val_freq=2', 'logger:save_checkpoint_freq=2'], cwd)
    assert run.returncode == 0, run.stderr[-3000:]
    exp = cwd / 'experiments' / 'train_MFGHMoE_UCMerced_x4'
    assert sorted(p.name for p in (exp / 'models').iterdir()) == ['net_g_2.pth', 'net_g_4.pth', 'net_g_latest.pth']
    assert sorted(p.name for p in (exp / 'training_states').iterdir()) == ['2.state', '4.state']
    # at 2 and 4; not again after the loop (BasicSR's last validation would repeat the one at 4)
    assert run.stderr.count('Validation UCMerced_test') == 2 and '# psnr:' in run.stderr and '# ssim:' in run.stderr
    assert 'UCMerced_test: the weights are those validated at iteration 4; not validated again' in run.stderr
    assert re.search(r'experts: e\d+ \d', run.stderr) and 'entropy: ' in run.stderr
    assert 'routing/expert_03' not in run.stderr  # every expert's share goes to tensorboard, not to the text line
    assert 'run estimate: ' in run.stderr
    assert any((cwd / 'tb_logger' / 'train_MFGHMoE_UCMerced_x4').iterdir())
    copied = (exp / 'train_ucm_x4.yml').read_text()
    assert 'total_iter: 4' in copied and 'embed_dim: 12' in copied
    params = torch.load(exp / 'models' / 'net_g_latest.pth', weights_only=True)
    assert set(params) == {'params', 'params_ema', 'network_g'}  # the network's options: infer needs no -opt
    assert params['network_g']['embed_dim'] == 12 and params['network_g']['type'] == 'MFGHMoEArch'
    logs = list(exp.glob('train_train_MFGHMoE_UCMerced_x4_*.log'))
    assert len(logs) == 1
    log = logs[0].read_text()
    assert 'l_pix:' in log and 'iter:       4' in log and 'Validation UCMerced_test' in log


def test_train_from_lmdb(cwd: Path) -> None:
    run = basicsr(['train', '-opt', str(OPTIONS / 'train_ucm_x4_lmdb.yml'), '--force_yml', *TINY_TRAINING,
                   'train:total_iter=2', 'val:val_freq=2', 'logger:save_checkpoint_freq=2'], cwd)
    assert run.returncode == 0, run.stderr[-3000:]
    assert (cwd / 'experiments' / 'train_MFGHMoE_UCMerced_x4_lmdb' / 'models' / 'net_g_2.pth').is_file()
    assert '# psnr:' in run.stderr


def readable(path: Path) -> bool:
    try:
        torch.load(path, weights_only=True)
    except (EOFError, RuntimeError):
        return False
    return True


def test_truncated_state_is_reported_and_the_previous_one_used(cwd: Path) -> None:
    args = ['train', '-opt', str(OPTIONS / 'train_ucm_x2.yml'), '--force_yml', *TINY_TRAINING, 'name=trunc',
            'val:val_freq=1000', 'logger:save_checkpoint_freq=2']
    first = basicsr(args + ['train:total_iter=4'], cwd)
    assert first.returncode == 0, first.stderr[-3000:]
    state = cwd / 'experiments' / 'trunc' / 'training_states' / '4.state'
    state.write_bytes(state.read_bytes()[:100])
    resumed = basicsr(args + ['train:total_iter=5', '--auto_resume'], cwd)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert '4.state cannot be read' in resumed.stderr
    assert re.search(r'Resuming training from epoch: \d+, iter: 2\.', resumed.stderr)


def test_killed_training_resumes_from_its_last_checkpoint(cwd: Path) -> None:
    args = ['train', '-opt', str(OPTIONS / 'train_ucm_x2.yml'), '--force_yml', *TINY_TRAINING,
            'val:val_freq=1000', 'logger:save_checkpoint_freq=2']
    proc = subprocess.Popen([sys.executable, '-m', 'hmoe_arch'] + args + ['train:total_iter=100000'], cwd=cwd,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    states = cwd / 'experiments' / 'train_MFGHMoE_UCMerced_x2' / 'training_states'
    try:
        deadline = time.time() + 240
        while not (states / '4.state').exists() and time.time() < deadline and proc.poll() is None:
            time.sleep(0.1)
        assert (states / '4.state').exists(), 'no checkpoint was written'
        time.sleep(0.5)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    # a kill during a save leaves a hidden .partial-* folder beside the finished states; resume must ignore it
    iterations = sorted((int(p.name.split('.')[0]) for p in states.glob('*.state')), reverse=True)
    last = next(i for i in iterations if readable(states / f'{i}.state'))
    resumed = basicsr(args + [f'train:total_iter={last + 2}', '--auto_resume'], cwd)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert re.search(rf'Resuming training from epoch: \d+, iter: {last}\.', resumed.stderr)
    assert f'iter:{last + 1:8,d}' in resumed.stderr and f'iter:{last + 2:8,d}' in resumed.stderr
    assert f'iter:{last:8,d}' not in resumed.stderr


def test_basicsr_test_writes_sr_images_and_metrics(cwd: Path) -> None:
    train = basicsr(['train', '-opt', str(OPTIONS / 'train_ucm_x2.yml'), '--force_yml', *TINY_TRAINING,
                     'train:total_iter=1', 'val:val_freq=1000', 'logger:save_checkpoint_freq=1000'], cwd)
    assert train.returncode == 0, train.stderr[-3000:]
    network = [e for e in TINY_TRAINING if e.startswith('network_g')]
    run = basicsr(['test', '-opt', str(OPTIONS / 'test_ucm_x2.yml'), '--force_yml', *network], cwd)
    assert run.returncode == 0, run.stderr[-3000:]
    images = sorted((cwd / 'results' / 'test_MFGHMoE_UCMerced_x2' / 'visualization' / 'UCMerced_test').iterdir())
    test_names = (cwd / 'datasets' / 'UCMerced' / 'test.txt').read_text().split()
    assert [p.name for p in images] == sorted(n.replace('.tif', '_test_MFGHMoE_UCMerced_x2.png') for n in test_names)
    assert '# psnr:' in run.stderr and '# ssim:' in run.stderr
    logs = list((cwd / 'results' / 'test_MFGHMoE_UCMerced_x2').glob('test_test_MFGHMoE_UCMerced_x2_*.log'))
    assert len(logs) == 1 and '# psnr:' in logs[0].read_text()


def test_two_process_distributed_training_on_cpu(cwd: Path) -> None:
    torchrun = shutil.which('torchrun')
    launcher = [torchrun] if torchrun else [sys.executable, '-m', 'torch.distributed.run']
    run = basicsr(['-m', 'hmoe_arch', 'train', '-opt', str(OPTIONS / 'train_ucm_x4.yml'), '--launcher',
                   'pytorch', '--force_yml', *TINY_TRAINING, 'name=ddp', 'train:total_iter=3', 'val:val_freq=1000',
                   'logger:save_checkpoint_freq=2'], cwd, launcher=launcher + ['--nproc_per_node=2'])
    assert run.returncode == 0, run.stderr[-3000:]
    assert 'World size (gpu number): 2' in run.stderr
    assert run.stderr.count('net_g replicas in sync across 2 ranks') == 2  # iteration 2 and the final save
    assert (cwd / 'experiments' / 'ddp' / 'models' / 'net_g_latest.pth').is_file()


def test_choices_are_the_tables_of_the_modules_that_implement_them() -> None:
    from hmoe_arch.commands import cli
    from hmoe_arch.commands.export import FORMATS
    from hmoe_arch.commands.prepare import DATASETS
    from hmoe_arch.data.degradations import DEGRADATIONS
    from hmoe_arch.protocols import DEFAULT_PROTOCOL, PROTOCOLS

    assert cli.DATASETS == tuple(sorted(DATASETS))
    assert cli.DEGRADATIONS == tuple(DEGRADATIONS)
    assert cli.PROTOCOLS == tuple(PROTOCOLS)
    assert cli.DEFAULT_PROTOCOL == DEFAULT_PROTOCOL
    assert cli.EXPORT_FORMATS == tuple(FORMATS)


# ------------------------------------------------------------------------------------------------------
# plugins: enabled by the user, installed distributions only
def option_file_with_plugins(folder: Path, plugins: List[str]) -> Path:
    """``folder/opt.yml``: train_ucm_x4.yml with a top-level ``plugins`` list (its datasets are not in ``folder``,
    so a run that gets past the plugins stops at the first dataroot)."""
    text = (OPTIONS / 'train_ucm_x4.yml').read_text()
    path = folder / 'opt.yml'
    path.write_text(f'plugins: [{", ".join(plugins)}]\n{text}')
    return path


@pytest.mark.parametrize('flags, message', [
    ([], 'plugins: the option file names some_module, and an option file cannot import code by itself; if you '
         'trust the package, install it and enable it with --plugin some_module (or HMOE_ARCH_PLUGINS=some_module)'),
    (['--plugin', 'some_module'], "--plugin: cannot import some_module as a plugin ({folder}/some_module.py is in "
                                  "the current folder or the script's, which are never searched for plugins)"),
], ids=['option-file', 'flag'])
def test_python_m_never_imports_a_module_of_the_current_folder(flags: List[str], message: str,
                                                               tmp_path: Path) -> None:
    """``python -m hmoe_arch`` (torchrun's route) puts the current folder first on sys.path."""
    (tmp_path / 'some_module.py').write_text("open('marker', 'w').write('imported')\n")
    option = option_file_with_plugins(tmp_path, ['some_module'])
    run = basicsr(['train', '-opt', str(option), *flags], tmp_path)
    assert run.returncode == 2, run.stderr[-3000:]
    errors = [line for line in run.stderr.splitlines() if ' ERROR: ' in line]
    assert len(errors) == 1 and errors[0].endswith(f'basicsr train: {message.format(folder=tmp_path)}'), errors
    assert not (tmp_path / 'marker').exists()


def test_plugin_flag_and_environment_variable_import_installed_packages_only(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, basicsr_log: List[str]) -> None:
    from importlib.metadata import version as installed_version

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv('HMOE_ARCH_PLUGINS', raising=False)
    option = option_file_with_plugins(tmp_path, ['json'])
    assert main(['train', '-opt', str(option)]) == 2
    assert basicsr_log[-1].startswith('basicsr train: plugins: the option file names json, and an option file '
                                      'cannot import code by itself')
    assert main(['train', '-opt', str(option), '--plugin', 'json']) == 2
    assert re.fullmatch(r'basicsr train: --plugin: cannot import json as a plugin \(\S+/json/__init__\.py is not '
                        r'part of an installed distribution \(pip install it first\)\)', basicsr_log[-1])
    version = installed_version('einops')
    option = option_file_with_plugins(tmp_path, ['einops'])
    for flags, source in ((['--plugin', 'einops'], '--plugin'), ([], 'HMOE_ARCH_PLUGINS')):
        if not flags:
            monkeypatch.setenv('HMOE_ARCH_PLUGINS', 'einops')
        basicsr_log.clear()
        assert main(['train', '-opt', str(option), *flags]) == 2  # past the plugins: the data are not here
        assert f'importing plugin einops (distribution einops {version}), enabled by {source}' in basicsr_log
        assert basicsr_log[-1].startswith('basicsr train: datasets.train.dataroot_gt: ')
