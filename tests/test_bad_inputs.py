"""The bad-input matrix of docs/troubleshooting.md: one test per row, each checking the message,
the exit status, and that nothing written before was lost."""
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import List

import numpy as np
import pytest
import torch
from PIL import Image

from hmoe_arch.commands.cli import main

from util import TINY_TRAINING, make_ucmerced_tree, write_image

pytestmark = pytest.mark.slow  # runs trainings and commands on bad inputs

OPTIONS = Path(__file__).resolve().parents[1] / 'options'
NETWORK = [e for e in TINY_TRAINING if e.startswith('network_g')]


def cli(args: List[str], cwd: Path):
    return subprocess.run([sys.executable, '-m', 'hmoe_arch'] + args, cwd=cwd, capture_output=True, text=True,
                          timeout=120)


# ------------------------------------------------------------------------------------------------------
# images given to `basicsr prepare`
def truncate(path: Path) -> None:
    write_image(path.with_suffix('.png'), 24, 24, 0)
    path.write_bytes(path.with_suffix('.png').read_bytes()[:60])
    path.with_suffix('.png').unlink()


ROWS = {
    'missing file': (lambda p: p.unlink(), 'no such file', None),
    'zero-byte file': (lambda p: p.write_bytes(b''), 'empty file (0 bytes)', None),
    'truncated file': (truncate, 'cannot be decoded as an image', None),
    'non-image file': (lambda p: p.write_text('plain text, not an image'), 'cannot be decoded as an image', None),
    'grayscale image': (lambda p: write_image(p, 24, 24, 0, channels=1), 'grayscale image', None),
    'RGBA image': (lambda p: write_image(p, 24, 24, 0, channels=4), 'RGBA image', None),
    '16-bit image': (lambda p: write_image(p, 24, 24, 0, dtype=np.uint16), 'uint16 samples (16-bit)', None),
    'CMYK image': (lambda p: Image.fromarray(np.zeros((24, 24, 4), np.uint8), mode='CMYK').save(p, format='TIFF'),
                   'CMYK image', None),
}


@pytest.mark.parametrize('row', [r for r in ROWS if r != 'missing file'])
def test_prepare_rejects_bad_images(row: str, tmp_path: Path, basicsr_log) -> None:
    source = make_ucmerced_tree(tmp_path / 'src', per_class=4)
    previous = tmp_path / 'previous'
    assert main(['prepare', 'ucmerced', '--source', str(source), '--out', str(previous), '--no-progress']) == 0
    before = sorted(p.relative_to(previous) for p in previous.rglob('*'))
    bad = source / 'Images' / 'beach' / 'beach02.tif'
    ROWS[row][0](bad)
    assert main(['prepare', 'ucmerced', '--source', str(source), '--out', str(tmp_path / 'out'), '--no-progress']) == 2
    assert any('beach02.tif' in m and ROWS[row][1] in m for m in basicsr_log), basicsr_log[-1]
    assert not (tmp_path / 'out').exists()
    assert sorted(p.relative_to(previous) for p in previous.rglob('*')) == before


def test_prepare_missing_source(tmp_path: Path, basicsr_log) -> None:
    assert main(['prepare', 'ucmerced', '--source', str(tmp_path / 'gone.zip'), '--out', str(tmp_path / 'o'),
                 '--no-progress']) == 2
    assert 'gone.zip: no such file or folder' in basicsr_log[-1]


# ------------------------------------------------------------------------------------------------------
# training and evaluation
@pytest.fixture
def run_dir(workdir: Path, tmp_path: Path) -> Path:
    """A run directory with its own copy of the prepared data and a finished tiny x4 experiment."""
    shutil.copytree(workdir / 'datasets', tmp_path / 'datasets')
    done = cli(['train', '-opt', str(OPTIONS / 'train_ucm_x4.yml'), '--force_yml', *TINY_TRAINING, 'name=previous',
                'train:total_iter=2', 'val:val_freq=1000', 'logger:save_checkpoint_freq=2'], tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    return tmp_path


def snapshot(folder: Path):
    return {p.relative_to(folder): p.read_bytes() for p in folder.rglob('*') if p.is_file() and p.suffix != '.log'}


def test_training_image_smaller_than_gt_size(run_dir: Path) -> None:
    before = snapshot(run_dir / 'experiments' / 'previous')
    run = cli(['train', '-opt', str(OPTIONS / 'train_ucm_x4.yml'), '--force_yml', *TINY_TRAINING, 'name=big',
               'datasets:train:gt_size=320', 'train:total_iter=2'], run_dir)
    assert run.returncode == 2, run.stderr[-2000:]
    assert re.search(r'Train/\w+\.png is 256x256, smaller than gt_size 320', run.stderr.splitlines()[-1])
    assert snapshot(run_dir / 'experiments' / 'previous') == before


def test_missing_training_image(run_dir: Path) -> None:
    (run_dir / 'datasets' / 'UCMerced' / 'Train' / 'beach00.png').unlink()
    run = cli(['train', '-opt', str(OPTIONS / 'train_ucm_x4.yml'), '--force_yml', *TINY_TRAINING, 'name=gap',
               'train:total_iter=2'], run_dir)
    assert run.returncode == 2 and "are not in datasets/UCMerced/Train, e.g. ['beach00']" in run.stderr


def test_lr_gt_size_mismatch_in_test_pairs(run_dir: Path) -> None:
    run = cli(['test', '-opt', str(OPTIONS / 'test_ucm_x4.yml'), '--force_yml', *NETWORK,
               'datasets:test_1:dataroot_lq=datasets/UCMerced/Test_LR_x2',
               'path:pretrain_network_g=experiments/previous/models/net_g_latest.pth'], run_dir)
    assert run.returncode == 2 and 'expected the GT size divided by 4' in run.stderr.splitlines()[-1]
    assert not list((run_dir / 'results').rglob('*.png'))


@pytest.mark.parametrize('row', ['other scale', 'other architecture', 'truncated checkpoint'])
def test_unusable_checkpoint(row: str, run_dir: Path) -> None:
    weights = run_dir / 'experiments' / 'previous' / 'models' / 'net_g_latest.pth'
    force = [*NETWORK, f'path:pretrain_network_g={weights}']
    expected = {'other scale': 'upsample.0.experts.0.weight [1024, 64, 1, 1] (network has [256, 64, 1, 1])',
                'other architecture': 'mfg', 'truncated checkpoint': 'not a PyTorch checkpoint of tensors'}[row]
    option = 'test_ucm_x2.yml' if row == 'other scale' else 'test_ucm_x4.yml'
    if row == 'other architecture':
        force = [e for e in force if 'expert_groups' not in e] + ['network_g:mfa=false']
    if row == 'truncated checkpoint':
        broken = run_dir / 'broken.pth'
        broken.write_bytes(weights.read_bytes()[:1000])
        force[-1] = f'path:pretrain_network_g={broken}'
    before = weights.read_bytes()
    run = cli(['test', '-opt', str(OPTIONS / option), '--force_yml', *force], run_dir)
    assert run.returncode == 2, run.stderr[-2000:]
    assert 'path.pretrain_network_g' in run.stderr and expected in run.stderr
    assert weights.read_bytes() == before


def test_sigkill_during_a_checkpoint_write_keeps_the_previous_ones(run_dir: Path) -> None:
    models = run_dir / 'experiments' / 'previous' / 'models'
    marker = run_dir / 'writing'
    code = '\n'.join([
        'import sys, time, torch',
        'def slow_save(obj, path, *args, **kwargs):',
        '    with open(path, "wb") as f:',
        '        f.write(b"half a checkpoint")',
        '        f.flush()',
        f'        open({str(marker)!r}, "w").close()',
        '        time.sleep(60)',
        'torch.save = slow_save',
        'from hmoe_arch.commands.cli import main',
        'sys.exit(main(sys.argv[1:]))',
    ])
    before = snapshot(models)
    proc = subprocess.Popen([sys.executable, '-c', code, 'train', '-opt', str(OPTIONS / 'train_ucm_x4.yml'),
                             '--auto_resume', '--force_yml', *TINY_TRAINING, 'name=previous', 'train:total_iter=4',
                             'val:val_freq=1000', 'logger:save_checkpoint_freq=2'], cwd=run_dir,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not marker.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert marker.exists(), 'the run never reached its checkpoint write'
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert snapshot(models) == before  # the half-written file is in the staging folder beside models/
    assert [p.name for p in models.parent.glob('.models.partial-*')] == [f'.models.partial-{proc.pid}']
    assert torch.load(models / 'net_g_2.pth', weights_only=True)['params']
    resumed = cli(['train', '-opt', str(OPTIONS / 'train_ucm_x4.yml'), '--auto_resume', '--force_yml', *TINY_TRAINING,
                   'name=previous', 'train:total_iter=4', 'val:val_freq=1000', 'logger:save_checkpoint_freq=2'],
                  run_dir)
    assert resumed.returncode == 0 and (models / 'net_g_4.pth').is_file()
    assert not list(models.parent.glob('.models.partial-*')) and not list(models.glob('.*'))


def test_wrong_option_is_one_line_before_anything_is_built(run_dir: Path) -> None:
    before = snapshot(run_dir / 'experiments' / 'previous')
    run = cli(['train', '-opt', str(OPTIONS / 'train_ucm_x4.yml'), '--force_yml', *TINY_TRAINING, 'name=previous',
               'network_g:num_expert=4'], run_dir)
    assert run.returncode == 2
    assert "network_g: MFGHMoEArch: unknown keyword(s) ['num_expert']" in run.stderr.splitlines()[-1]
    assert snapshot(run_dir / 'experiments' / 'previous') == before


def test_non_finite_loss_stops_training_with_status_3(run_dir: Path) -> None:
    before = snapshot(run_dir / 'experiments' / 'previous')
    run = cli(['train', '-opt', str(OPTIONS / 'train_ucm_x4.yml'), '--auto_resume', '--force_yml', *TINY_TRAINING,
               'name=previous', 'train:total_iter=4', 'datasets:train:mean=[0, 0, 0]',
               'datasets:train:std=[1.0e-45, 1.0e-45, 1.0e-45]'], run_dir)
    assert run.returncode == 3, run.stderr[-2000:]
    assert 'iteration 3: non-finite l_pix; training stopped before the optimizer step' in run.stderr.splitlines()[-1]
    assert snapshot(run_dir / 'experiments' / 'previous' / 'models') == {
        k.relative_to('models'): v for k, v in before.items() if k.parts[0] == 'models'}


# ------------------------------------------------------------------------------------------------------
# option files are data, never code
TAGGED = 'name: tagged\npwn: !!python/object/apply:os.system ["touch {marker}"]\n'


@pytest.mark.parametrize('command', ['train', 'test', 'infer', 'bench'])
def test_python_tags_in_option_files_are_refused_and_never_run(command: str, tmp_path: Path, monkeypatch,
                                                               basicsr_log) -> None:
    monkeypatch.chdir(tmp_path)
    marker = tmp_path / 'pwned'
    option = tmp_path / 'experiments' / 'shared' / 'tagged.yml'
    option.parent.mkdir(parents=True)
    option.write_text(TAGGED.format(marker=marker))
    image = tmp_path / 'in.png'
    write_image(image, 16, 16, 0)
    args = {'train': ['train', '-opt', str(option)], 'test': ['test', '-opt', str(option)],
            'infer': ['infer', '--weights', str(tmp_path / 'w.pth'), '-opt', str(option), '--input', str(image),
                      '--output', str(tmp_path / 'out.png')],
            'bench': ['bench', str(option.parent), '--out', str(tmp_path / 'bench')]}[command]
    assert main(args) == 2
    assert not marker.exists()
    assert basicsr_log[-1].endswith(f'{option}:2:6: the tag tag:yaml.org,2002:python/object/apply:os.system is '
                                    'refused: option files are plain YAML and nothing in them is executed')
    assert not (tmp_path / 'out.png').exists() and not (tmp_path / 'bench').exists()


def test_alias_bomb_is_refused_before_it_expands(tmp_path: Path, basicsr_log) -> None:
    levels = ['a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for level in range(1, 9):
        name, previous = chr(97 + level), chr(96 + level)
        levels.append(f'{name}: &{name} [' + ', '.join([f'*{previous}'] * 9) + ']')
    option = tmp_path / 'bomb.yml'
    option.write_text('name: bomb\n' + '\n'.join(levels) + '\n')
    assert main(['train', '-opt', str(option)]) == 2  # counted over shared nodes: 10^9 values never materialise
    assert 'bomb.yml: its YAML aliases expand to more than 100000 values' in basicsr_log[-1]


# ------------------------------------------------------------------------------------------------------
# results are never lost or mixed up
def test_refused_resume_keeps_the_recorded_options(run_dir: Path) -> None:
    recorded = run_dir / 'experiments' / 'previous' / 'train_ucm_x4.yml'
    before = recorded.read_text()
    run = cli(['train', '-opt', str(OPTIONS / 'train_ucm_x4.yml'), '--auto_resume', '--force_yml', *TINY_TRAINING,
               'name=previous', 'network_g:embed_dim=16', 'train:total_iter=4'], run_dir)
    assert run.returncode == 2, run.stderr[-2000:]
    assert 'path.pretrain_network_g' in run.stderr and 'does not match MFGHMoEArch exactly' in run.stderr
    assert recorded.read_text() == before


def test_a_second_training_with_the_same_name_is_refused_while_the_first_runs(run_dir: Path) -> None:
    import fcntl
    lock = run_dir / 'experiments' / '.previous.lock'
    before = snapshot(run_dir / 'experiments' / 'previous')
    with open(lock, 'w') as held:
        held.write('pid 4242, started now')
        held.flush()
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        run = cli(['train', '-opt', str(OPTIONS / 'train_ucm_x4.yml'), '--force_yml', *TINY_TRAINING, 'name=previous',
                   'train:total_iter=2'], run_dir)
    assert run.returncode == 2
    assert re.search(r'experiments/previous: another training with this name is running \(pid 4242, started now\); '
                     r'wait for it to finish or choose another name$', run.stderr.splitlines()[-1])
    assert snapshot(run_dir / 'experiments' / 'previous') == before
    assert not list((run_dir / 'experiments').glob('previous_archived_*'))
    again = cli(['train', '-opt', str(OPTIONS / 'train_ucm_x4.yml'), '--force_yml', *TINY_TRAINING, 'name=previous',
                 'train:total_iter=1', 'val:val_freq=1000'], run_dir)
    assert again.returncode == 0, again.stderr[-2000:]
    assert len(list((run_dir / 'experiments').glob('previous_archived_*'))) == 1  # BasicSR's renaming still works


def test_option_file_without_a_logger_block(tmp_path: Path, basicsr_log) -> None:
    text = (OPTIONS / 'train_ucm_x4.yml').read_text()
    option = tmp_path / 'nolog.yml'
    option.write_text(text[:text.index('\nlogger:')] + '\n')  # the logger block is the file's last
    assert main(['train', '-opt', str(option)]) == 2
    assert basicsr_log[-1].endswith('nolog.yml: training needs a `logger:` block with print_freq and '
                                    'save_checkpoint_freq (how often to log and to save checkpoints, in iterations)')


def test_dataset_error_in_a_dataloader_worker_is_one_line(run_dir: Path) -> None:
    for image in sorted((run_dir / 'datasets' / 'UCMerced' / 'Train').glob('*.png')):
        data = image.read_bytes()
        image.write_bytes(data[:len(data) // 2])  # the header (size) reads, the pixels do not decode
    run = cli(['train', '-opt', str(OPTIONS / 'train_ucm_x4.yml'), '--force_yml', *TINY_TRAINING, 'name=broken',
               'datasets:train:num_worker_per_gpu=1', 'train:total_iter=2'], run_dir)
    assert run.returncode == 2, run.stderr[-2000:]
    # the worker's libpng may still be writing its own warnings to stderr after the error line: not the last line
    errors = [line for line in run.stderr.splitlines() if 'ERROR: basicsr train' in line]
    assert len(errors) == 1, run.stderr[-2000:]
    assert re.search(r'ERROR: basicsr train: RSPairedDataset: \S+/Train/\w+\.png: cannot be decoded as an image; '
                     r'expected an 8-bit RGB image$', errors[0]), errors[0]
    assert 'DataLoader worker' not in run.stderr and 'Traceback' not in run.stderr


@pytest.mark.parametrize('checkpoint, message', [
    ([1, 2], 'found a list'),
    (torch.zeros(3), 'found a Tensor'),
    ({1: torch.zeros(1)}, r"found the entries \['1'\]"),
    ({'params': {'conv_first.weight': [1.0]}}, r"found the entries \['conv_first.weight'\]"),
])
def test_checkpoints_of_the_wrong_form_are_named(checkpoint, message: str, tmp_path: Path, basicsr_log) -> None:
    torch.save(checkpoint, tmp_path / 'odd.pth')
    write_image(tmp_path / 'in.png', 16, 16, 0)
    assert main(['infer', '--weights', str(tmp_path / 'odd.pth'), '--input', str(tmp_path / 'in.png'), '--output',
                 str(tmp_path / 'out.png')]) == 2
    assert re.search(rf'odd.pth: expected a state_dict .*{message}', basicsr_log[-1]), basicsr_log[-1]
    assert not (tmp_path / 'out.png').exists()


def test_expert_weight_of_an_unexpected_shape_is_named(tmp_path: Path, basicsr_log) -> None:
    torch.save({'params': {'upsample.0.experts.0.weight': torch.zeros(5)}}, tmp_path / 'odd.pth')
    write_image(tmp_path / 'in.png', 16, 16, 0)
    assert main(['infer', '--weights', str(tmp_path / 'odd.pth'), '-opt', str(OPTIONS / 'test_ucm_x4.yml'), '--input',
                 str(tmp_path / 'in.png'), '--output', str(tmp_path / 'out.png')]) == 2
    assert basicsr_log[-1].endswith(f'--weights {tmp_path / "odd.pth"}: upsample.0.experts.0.weight has the shape [5]; '
                                    'an expert is a conv (scale^2 * C, C, k, k)')


def test_malformed_lmdb_meta_info_line_is_named(run_dir: Path) -> None:
    meta = run_dir / 'datasets' / 'UCMerced' / 'Train.lmdb' / 'meta_info.txt'
    lines = meta.read_text().splitlines()
    meta.write_text('\n'.join(lines[:2] + ['beach01.png 256x256'] + lines[3:]) + '\n')
    run = cli(['train', '-opt', str(OPTIONS / 'train_ucm_x4_lmdb.yml'), '--force_yml', *TINY_TRAINING, 'name=lmdb',
               'train:total_iter=2'], run_dir)
    assert run.returncode == 2, run.stderr[-2000:]
    assert run.stderr.splitlines()[-1].endswith("Train.lmdb/meta_info.txt:3: expected `<name>.png (<h>,<w>,<c>) "
                                                "<level>`, got 'beach01.png 256x256'")
