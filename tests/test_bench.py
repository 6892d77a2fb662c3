"""``basicsr bench``: tables on tiny trained models and bicubic, MACs at routed cost, sources and errors."""
import csv
import importlib.util
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import yaml
from basicsr.archs import build_network
from basicsr.data import build_dataset
from basicsr.metrics import calculate_psnr, calculate_ssim
from basicsr.utils import tensor2img
from basicsr.utils.matlab_functions import imresize
from test_protocols import independent
from torch.utils.flop_counter import FlopCounterMode

from hmoe_arch import MFGHMoEArch
from hmoe_arch.commands.bench import COLUMNS, build, count_macs, forward_memory, model_from_source, run_bench
from hmoe_arch.commands.bench.perceptual import niqe
from hmoe_arch.commands.bench.report import plot_psnr_latency
from hmoe_arch.commands.bench.rows import BenchModel, BenchRow
from hmoe_arch.commands.cli import main
from hmoe_arch.commands.prepare import prepare
from hmoe_arch.errors import OptionError
from hmoe_arch.protocols import PROTOCOLS
from hmoe_arch.tiling import padded_forward

from util import SMALL_GROUPS, TINY_TRAINING, tiny, write_image

pytestmark = pytest.mark.slow  # trains models to benchmark

OPTIONS = Path(__file__).resolve().parents[1] / 'options'
EDSR_TINY = ['network_g:num_feat=8', 'network_g:num_block=1', 'datasets:train:gt_size=32',
             'datasets:train:batch_size_per_gpu=2', 'datasets:train:num_worker_per_gpu=0']


@pytest.fixture(scope='module')
def trained(workdir: Path, tmp_path_factory) -> Path:
    """A run directory with two tiny models trained for 2 CPU iterations: MFG-HMoE and EDSR."""
    cwd = tmp_path_factory.mktemp('bench')
    (cwd / 'datasets').symlink_to(workdir / 'datasets')
    common = ['train:total_iter=2', 'val:val_freq=1000', 'logger:save_checkpoint_freq=1000']
    for option, force in (('train_ucm_x2.yml', TINY_TRAINING), ('baselines/train_ucm_x2_edsr.yml', EDSR_TINY)):
        run = subprocess.run([sys.executable, '-m', 'hmoe_arch', 'train', '-opt', str(OPTIONS / option),
                              '--force_yml', *force, *common], cwd=cwd, capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stderr[-3000:]
    return cwd


def recompute(experiment: Path, scale: int, protocol: str = 'basicsr-y', dataset_opt=None):
    """PSNR/SSIM of an experiment's EMA weights on its val set (or ``dataset_opt``), recomputed: BasicSR's
    metrics for basicsr-y, the protocol's definition (checked in test_protocols.py) otherwise."""
    opt = yaml.safe_load(next(experiment.glob('*.yml')).read_text())
    net = build_network(dict(opt['network_g']))
    net.load_state_dict(torch.load(experiment / 'models' / 'net_g_latest.pth', weights_only=True)['params_ema'])
    net.eval()
    dataset = build_dataset(dataset_opt or {**opt['datasets']['val'], 'phase': 'val', 'scale': scale})
    psnrs, ssims = [], []
    for item in dataset:
        with torch.no_grad():
            sr = padded_forward(net, item['lq'].unsqueeze(0), scale, getattr(net, 'window_size', 1))
        if protocol == 'basicsr-y':
            sr_img, gt_img = tensor2img(sr), tensor2img(item['gt'])
            psnrs.append(calculate_psnr(sr_img, gt_img, crop_border=scale, test_y_channel=True))
            ssims.append(calculate_ssim(sr_img, gt_img, crop_border=scale, test_y_channel=True))
        else:
            p = PROTOCOLS[protocol]
            psnr, ssim = p.measure(p.quantise(sr), tensor2img(item['gt']), scale)
            psnrs.append(psnr)
            ssims.append(ssim)
    return np.mean(psnrs), np.mean(ssims), dataset


def test_tables_of_two_trained_models_and_bicubic(trained: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(trained)
    experiments = [trained / 'experiments' / 'train_MFGHMoE_UCMerced_x2', trained / 'experiments' /
                   'train_EDSR_UCMerced_x2']
    out = trained / 'bench_out'
    rows = run_bench(experiments, out, runs=1, per_class=True)
    with open(out / 'bench.csv') as f:
        table = list(csv.DictReader(f))
    assert list(table[0]) == COLUMNS
    assert [r['model'] for r in table] == ['Bicubic', 'train_MFGHMoE_UCMerced_x2', 'train_EDSR_UCMerced_x2']
    assert all(r['test_set'] == 'UCMerced_test' and r['scale'] == '2' for r in table)
    for row, experiment in zip(table[1:], experiments):
        psnr, ssim, dataset = recompute(experiment, 2)
        assert float(row['psnr']) == pytest.approx(psnr, abs=1e-4)
        assert float(row['ssim']) == pytest.approx(ssim, abs=1e-4)
        assert row['train_iters'] == '2' and float(row['latency_ms']) > 0 and float(row['macs_g_64']) > 0
    bicubic = [calculate_psnr(tensor2img(imresize(item['lq'], 2).clamp(0, 1)), tensor2img(item['gt']), 2,
                              test_y_channel=True) for item in dataset]
    assert float(table[0]['psnr']) == pytest.approx(np.mean(bicubic), abs=1e-4)
    assert all(r['protocol'] == 'basicsr-y' for r in table)
    assert table[0]['params_m'] == '' and table[0]['latency_ms'] == ''
    edsr = build_network(dict(yaml.safe_load(next(experiments[1].glob('*.yml')).read_text())['network_g']))
    assert float(table[2]['params_m']) == pytest.approx(sum(p.numel() for p in edsr.parameters()) / 1e6, abs=1e-3)
    markdown = (out / 'bench.md').read_text().splitlines()
    assert markdown[0] == '### UCMerced_test x2, basicsr-y: Y (BT.601), border 2 px, SR rounded to 8 bit'
    assert markdown[2].startswith('| Model | PSNR (basicsr-y) | SSIM (basicsr-y) | Params (M)')
    assert len(markdown) == 2 + 2 + 3 and markdown[4].startswith('| Bicubic | ')
    assert cv_image_size(out / 'bench_psnr_latency.png') == (560, 900)
    with open(out / 'bench_per_class.csv') as f:
        per_class = list(csv.DictReader(f))
    assert {r['class'] for r in per_class} == {'agricultural', 'beach', 'golfcourse'}
    assert len(per_class) == 9 and sum(int(r['images']) for r in per_class) == 3 * len(dataset)
    assert len(rows) == 3


def cv_image_size(path: Path):
    import cv2
    image = cv2.imread(str(path))
    return image.shape[:2]


def test_expert_maps_from_bench(trained: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(trained)
    out = trained / 'bench_maps'
    run_bench([trained / 'experiments' / 'train_MFGHMoE_UCMerced_x2'], out, runs=1, expert_maps=True)
    maps = out / 'expert_maps' / 'train_MFGHMoE_UCMerced_x2' / 'UCMerced_test'
    names = (trained / 'datasets' / 'UCMerced' / 'test.txt').read_text().split()
    assert sorted(p.name for p in maps.glob('*.png')) == sorted(n.replace('.tif', '.png') for n in names)
    assert (maps / 'expert_usage.csv').read_text().startswith('class,lr_pixels,expert_00')


def test_cpu_peak_memory_is_measured_in_a_child_process(trained: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(trained)
    model = model_from_source(trained / 'experiments' / 'train_MFGHMoE_UCMerced_x2')
    net = build(model, torch.device('cpu')).eval()
    small, large, again = (forward_memory(model, net, size, torch.device('cpu')) for size in (32, 128, 128))
    # a 128^2 forward holds 16x the activations of a 32^2 one; the child's fresh process makes it repeatable
    assert 0 < small < large and large == pytest.approx(again, abs=1.0)
    broken = model_from_source(trained / 'experiments' / 'train_MFGHMoE_UCMerced_x2')
    broken.weights = str(trained / 'missing.pth')
    with pytest.raises(RuntimeError, match='measuring peak memory in a child process failed'):
        forward_memory(broken, net, 32, torch.device('cpu'))


def test_moe_macs_are_the_routed_cost() -> None:
    net = MFGHMoEArch(**tiny(upscale=2, expert_groups=SMALL_GROUPS)).eval()
    feat, routing = torch.randn(1, 64, 8, 8), torch.randn(1, 64, 8, 8)
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        net.upsample(feat, routing)
    maps = net.routing_maps()
    pixels = 64
    out_channels = 4 * 64
    kernel = torch.tensor([1, 1, 3, 3])[maps['expert'].flatten()]
    experts = int((kernel ** 2).sum()) * 64 * out_channels
    routers = pixels * 64 * 2 + pixels * 64 * (2 + 2)
    assert counter.get_total_flops() / 2 == experts + routers
    assert count_macs(net, 8, torch.device('cpu')) > experts


def test_test_option_file_as_source_and_errors(trained: Path, tmp_path: Path) -> None:
    model = model_from_source(OPTIONS / 'test_ucm_x4.yml')
    assert model.weights == 'experiments/train_MFGHMoE_UCMerced_x4/models/net_g_latest.pth'
    assert model.param_key == 'params_ema' and model.scale == 4 and model.dataset_opt['phase'] == 'val'
    with pytest.raises(OptionError, match='expected one option file'):
        model_from_source(tmp_path)
    experiment = tmp_path / 'exp'
    experiment.mkdir()
    shutil.copy(OPTIONS / 'train_ucm_x2.yml', experiment)
    with pytest.raises(OptionError, match='no models/net_g_latest.pth'):
        model_from_source(experiment)
    with pytest.raises(OptionError, match='names no weights'):
        model_from_source(OPTIONS / 'test_ucm_x4.yml', ['path:pretrain_network_g=null'])


def test_protocols_test_sets_and_niqe_from_the_command_line(trained: Path, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(trained)
    source = tmp_path / 'src' / 'RSSCN7'
    for c, folder in enumerate(('aGrass', 'dRiverLake')):
        for i in range(1, 3):
            write_image(source / folder / f'{folder[0]}{i:03d}.jpg', 200, 200, seed=c * 10 + i)
    rsscn7 = tmp_path / 'RSSCN7'
    prepare('rsscn7', source, rsscn7, scales=[2], progress=False)
    experiment = trained / 'experiments' / 'train_MFGHMoE_UCMerced_x2'
    out = tmp_path / 'out'
    rows = run_bench([experiment], out, runs=1, protocols=['basicsr-y', 'transenet-rgb'],
                     test_sets=[Path('datasets/UCMerced'), rsscn7], metrics=['niqe'], per_class=True)
    with open(out / 'bench.csv') as f:
        table = list(csv.DictReader(f))
    assert list(table[0]) == ['protocol', 'test_set', 'scale', 'model', 'psnr', 'ssim', 'niqe', 'params_m',
                              'macs_g_64', 'latency_ms', 'peak_mib', 'train_iters', 'source']
    assert [(r['protocol'], r['test_set'], r['model']) for r in table] == [
        (p, s, m) for p in ('basicsr-y', 'transenet-rgb') for s in ('UCMerced', 'RSSCN7')
        for m in ('Bicubic', 'train_MFGHMoE_UCMerced_x2')]
    by_key = {(r['protocol'], r['test_set'], r['model']): r for r in table}
    rsscn7_opt = {'name': 'RSSCN7', 'type': 'RSPairedDataset', 'dataroot_gt': str(rsscn7 / 'Test_HR'),
                  'dataroot_lq': str(rsscn7 / 'Test_LR_x2'), 'io_backend': {'type': 'disk'}, 'phase': 'val',
                  'scale': 2}
    for protocol in ('basicsr-y', 'transenet-rgb'):
        psnr, ssim, dataset = recompute(experiment, 2, protocol, rsscn7_opt)
        row = by_key[(protocol, 'RSSCN7', 'train_MFGHMoE_UCMerced_x2')]
        assert float(row['psnr']) == pytest.approx(psnr, abs=1e-4)
        assert float(row['ssim']) == pytest.approx(ssim, abs=1e-4) and float(row['latency_ms']) > 0
        p = PROTOCOLS[protocol]
        sr_imgs = [p.quantise(imresize(item['lq'], 2)) for item in dataset]
        bicubic = by_key[(protocol, 'RSSCN7', 'Bicubic')]
        assert float(bicubic['psnr']) == pytest.approx(
            np.mean([p.measure(sr, tensor2img(item['gt']), 2)[0] for sr, item in zip(sr_imgs, dataset)]), abs=1e-4)
        assert float(bicubic['niqe']) == pytest.approx(np.mean([niqe(sr, 2) for sr in sr_imgs]), abs=1e-4)
        # the bicubic row against the independent computation of the protocol's definition, unrounded
        expected = np.mean([independent(protocol, imresize(item['lq'], 2), tensor2img(item['gt'])[..., ::-1], 2)
                            for item in dataset], axis=0)
        row = next(r for r in rows if (r.protocol, r.test_set, r.model.name) == (protocol, 'RSSCN7', 'Bicubic'))
        assert (row.psnr, row.ssim) == (pytest.approx(expected[0], abs=1e-6), pytest.approx(expected[1], abs=1e-6))
    assert by_key[('basicsr-y', 'RSSCN7', 'Bicubic')]['psnr'] != by_key[('transenet-rgb', 'RSSCN7', 'Bicubic')]['psnr']
    markdown = (out / 'bench.md').read_text()
    assert markdown.count('### ') == 4
    assert '### RSSCN7 x2, transenet-rgb: RGB, PSNR/SSIM per channel averaged, border 2 px, SR truncated' in markdown
    assert '| Model | PSNR (transenet-rgb) | SSIM (transenet-rgb) | NIQE (transenet-rgb) |' in markdown
    with open(out / 'bench_per_class.csv') as f:
        per_class = list(csv.DictReader(f))
    assert {(r['protocol'], r['test_set']) for r in per_class} == {
        (p, s) for p in ('basicsr-y', 'transenet-rgb') for s in ('UCMerced', 'RSSCN7')}


def test_protocols_sharing_a_conversion_share_niqe(trained: Path, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(trained)
    calls = []
    import hmoe_arch.commands.bench.evaluation as evaluation
    monkeypatch.setattr(evaluation, 'niqe', lambda img, crop, label: calls.append(crop) or niqe(img, crop))
    rows = run_bench([trained / 'experiments' / 'train_EDSR_UCMerced_x2'], tmp_path / 'out', runs=1,
                     protocols=['basicsr-y', 'haunet-rgb', 'ttst-y'], metrics=['niqe'])
    bicubic = {r.protocol: r for r in rows if r.model.name == 'Bicubic'}
    images = sum(len(v) for v in bicubic['basicsr-y'].per_class.values())
    # basicsr-y and haunet-rgb round and crop alike: one NIQE per image for both, another for ttst-y (for
    # bicubic and for EDSR)
    assert images > 0 and len(calls) == 2 * 2 * images and sorted(set(calls)) == [0, 2]
    assert bicubic['basicsr-y'].metrics['niqe'] == bicubic['haunet-rgb'].metrics['niqe']
    assert bicubic['basicsr-y'].metrics['niqe'] != bicubic['ttst-y'].metrics['niqe']
    assert bicubic['basicsr-y'].psnr != bicubic['haunet-rgb'].psnr


def test_command_line_options_reach_run_bench(monkeypatch: pytest.MonkeyPatch) -> None:
    import hmoe_arch.commands.bench as bench  # cli imports run_bench from it when the command runs
    seen = {}
    monkeypatch.setattr(bench, 'run_bench', lambda sources, out, **kwargs: seen.update(kwargs))
    assert main(['bench', 'a.yml', '--protocol', 'ttst-y', '--protocol', 'haunet-rgb', '--test-set', 'X',
                 '--test-set', 'Y', '--lpips']) == 0
    assert (seen['protocols'], seen['test_sets'], seen['metrics']) == (['ttst-y', 'haunet-rgb'], [Path('X'), Path('Y')],
                                                                       ['lpips'])
    assert main(['bench', 'a.yml']) == 0
    assert (seen['protocols'], seen['test_sets'], seen['metrics']) == (['basicsr-y'], [], [])


def test_test_set_errors(trained: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.chdir(trained)
    experiment = str(trained / 'experiments' / 'train_MFGHMoE_UCMerced_x2')
    only_x4 = tmp_path / 'Only_x4'
    (only_x4 / 'Test_HR').mkdir(parents=True)
    (only_x4 / 'Test_LR_x4').mkdir()
    cases = [
        (['--test-set', str(only_x4)], rf'--test-set {only_x4}: no Test_LR_x2 for a x2 model \(found: Test_LR_x4; '
                                       r'basicsr prepare ... --scales 2 writes it\)'),
        (['--test-set', str(tmp_path / 'nope')], 'no such folder'),
        (['--test-set', str(tmp_path)], 'no Test_HR folder'),
        (['--test-set', 'datasets/UCMerced', '--test-set', str(tmp_path / 'x' / 'UCMerced')],
         'two folders share a name'),
    ]
    for args, message in cases:
        with pytest.raises(OptionError, match=message):
            run_bench([Path(experiment)], tmp_path / 'out', runs=1, test_sets=[Path(a) for a in args[1::2]])
    assert not (tmp_path / 'out').exists()
    if importlib.util.find_spec('lpips') is not None:
        monkeypatch.setenv('TORCH_HOME', str(tmp_path / 'empty_torch_home'))
        with pytest.raises(OptionError, match='--lpips needs the AlexNet weights'):
            run_bench([Path(experiment)], tmp_path / 'out', runs=1, metrics=['lpips'])
        assert not (tmp_path / 'out').exists() and not (tmp_path / 'empty_torch_home').exists()
    with pytest.raises(SystemExit) as exit_info:
        main(['bench', experiment, '--protocol', 'psnr-y'])
    assert exit_info.value.code == 2 and "invalid choice: 'psnr-y'" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------------
# a network_g that does not fit its checkpoint, progress, the plot
def mismatch_source(tmp_path: Path, network: dict, checkpoint: dict) -> Path:
    """``options/test_ucm_x4.yml`` with ``network`` as its network_g, its weights ``checkpoint`` saved in tmp_path."""
    weights = tmp_path / 'weights.pth'
    torch.save(checkpoint, weights)
    opt = yaml.safe_load((OPTIONS / 'test_ucm_x4.yml').read_text())
    opt['path']['pretrain_network_g'] = str(weights)
    if network:
        opt['network_g'] = network
    source = tmp_path / 'test_tiny.yml'
    source.write_text(yaml.safe_dump(opt))
    return source


def refusal(argv: list, log: list) -> str:
    """The one line ``basicsr`` logs when it refuses ``argv`` with exit status 2."""
    assert main(argv) == 2
    assert '\n' not in log[-1], log[-1]
    return log[-1]


def test_bench_says_which_network_options_differ_from_the_checkpoint(tmp_path: Path, basicsr_log) -> None:
    config = {'type': 'MFGHMoEArch', **tiny(upscale=4, expert_groups=SMALL_GROUPS)}
    net = build_network(dict(config))
    source = mismatch_source(tmp_path, {}, {'params_ema': net.state_dict(), 'network_g': config})
    line = refusal(['bench', str(source), '--out', str(tmp_path / 'out')], basicsr_log)
    weights = tmp_path / 'weights.pth'
    assert line.startswith(f'basicsr bench: {source}: network_g does not fit the checkpoint {weights} '
                           '(path.pretrain_network_g): network_g.embed_dim is 180 but the checkpoint holds 24; '
                           'network_g.depths is [6, 6, 6, 6, 6, 6] but the checkpoint holds [1, 1]; '
                           'network_g.num_heads is [6, 6, 6, 6, 6, 6] but the checkpoint holds [2, 2]; '
                           'network_g.window_size is 16 but the checkpoint holds 4; '
                           'network_g.squeeze_factor is 30 but the checkpoint holds 6; '
                           'network_g.expert_groups is [{kernel_size: 1, num_experts: 8}, {kernel_size: 3, '
                           'num_experts: 8}] but the checkpoint holds [{kernel_size: 1, num_experts: 2}, '
                           '{kernel_size: 3, num_experts: 2}]; to fix, give network_g these values in '), line
    # compress_ratio 3 and overlap_ratio 0.5 give the tiny network the same widths: not named
    assert 'compress_ratio' not in line and 'overlap_ratio' not in line
    assert line.endswith(', or point path.pretrain_network_g at weights trained with this network_g')
    # the --force_yml entries it suggests make the option file load the checkpoint exactly
    suggested = shlex.split(line.split('(or add --force_yml ')[1].split(')')[0])
    fixed = build(model_from_source(source, suggested), torch.device('cpu'))
    for key, value in fixed.state_dict().items():
        assert torch.equal(value, net.state_dict()[key])

    # an experiment folder: its option file and its weights, the values the options left at their defaults
    experiment = tmp_path / 'experiment'
    (experiment / 'models').mkdir(parents=True)
    opt = yaml.safe_load(source.read_text())
    opt['network_g'] = {'type': 'MFGHMoEArch', 'upscale': 4, **tiny(embed_dim=48, expert_groups=SMALL_GROUPS)}
    del opt['network_g']['window_size']
    (experiment / 'train.yml').write_text(yaml.safe_dump(opt))
    torch.save({'params_ema': net.state_dict()}, experiment / 'models' / 'net_g_latest.pth')
    line = refusal(['bench', str(experiment), '--out', str(tmp_path / 'out')], basicsr_log)
    assert line == (f'basicsr bench: {experiment / "train.yml"}: network_g does not fit the checkpoint '
                    f'{experiment / "models" / "net_g_latest.pth"}: network_g.embed_dim is 48 but the checkpoint '
                    'holds 24; network_g.window_size is 16 (the default) but the checkpoint holds 4; to fix, give '
                    f'network_g these values in {experiment / "train.yml"} (or add --force_yml network_g:embed_dim=24 '
                    'network_g:window_size=4)')


def test_bench_names_the_first_tensor_of_another_architecture_that_does_not_fit(tmp_path: Path,
                                                                                basicsr_log) -> None:
    edsr = {'type': 'EDSR', 'num_in_ch': 3, 'num_out_ch': 3, 'num_feat': 8, 'num_block': 1, 'upscale': 4}
    state = build_network(dict(edsr)).state_dict()
    weights = tmp_path / 'weights.pth'
    fix = ('; to fix, give network_g the options the checkpoint was trained with, or point path.pretrain_network_g '
           'at weights trained with this network_g')
    source = mismatch_source(tmp_path, {**edsr, 'num_feat': 16}, {'params_ema': state, 'network_g': edsr})
    assert refusal(['bench', str(source)], basicsr_log) == (
        f'basicsr bench: {source}: network_g does not fit the checkpoint {weights} (path.pretrain_network_g): '
        'conv_first.weight is [8, 3, 3, 3] in the checkpoint but [16, 3, 3, 3] in the network network_g builds; '
        f'the checkpoint was saved with network_g.num_feat: 8{fix}')
    # a plain state_dict: no saved options to compare; the paper's MFG-HMoE options against EDSR weights
    source = mismatch_source(tmp_path, {}, state)
    assert refusal(['bench', str(source)], basicsr_log) == (
        f'basicsr bench: {source}: network_g does not fit the checkpoint {weights} (path.pretrain_network_g): '
        f'conv_first.weight is [8, 3, 3, 3] in the checkpoint but [180, 3, 3, 3] in the network network_g builds{fix}')


def test_bench_refuses_an_experiment_whose_training_is_running(tmp_path: Path, basicsr_log) -> None:
    import fcntl
    experiment = tmp_path / 'experiments' / 'tiny'
    (experiment / 'models').mkdir(parents=True)
    shutil.copy(OPTIONS / 'train_ucm_x2.yml', experiment)
    torch.save({'params_ema': {}}, experiment / 'models' / 'net_g_latest.pth')  # a new run's first checkpoint
    with open(tmp_path / 'experiments' / '.tiny.lock', 'w') as held:  # as basicsr train holds it
        held.write('pid 4242, started 2024-05-01 10:00:00')
        held.flush()
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        line = refusal(['bench', str(experiment), '--out', str(tmp_path / 'out')], basicsr_log)
    assert line == (f'basicsr bench: {experiment}: a training of this experiment is running (pid 4242, started '
                    '2024-05-01 10:00:00); its weights are not final, and a new training of this name moves the '
                    'folder aside: bench it when the training has finished')
    assert not (tmp_path / 'out').exists()


def test_experiment_lock_is_shared_by_readers_and_keeps_trainings_out(tmp_path: Path) -> None:
    from hmoe_arch.commands.bench import experiment_lock
    from hmoe_arch.locking import exclusive_lock
    experiment = tmp_path / 'experiments' / 'tiny'
    experiment.mkdir(parents=True)
    lock = tmp_path / 'experiments' / '.tiny.lock'
    with experiment_lock(experiment), experiment_lock(experiment):  # two benches at once
        with pytest.raises(OptionError, match=r'^held by another process$'):
            with exclusive_lock(lock, lambda holder: OptionError(f'held by {holder}')):
                pass
    with exclusive_lock(lock, lambda holder: OptionError(f'held by {holder}')):  # free again
        assert lock.read_text().startswith(f'pid {os.getpid()}, started ')
        with pytest.raises(OptionError, match=rf'a training of this experiment is running \(pid {os.getpid()}, '):
            with experiment_lock(experiment):
                pass
    assert lock.read_text() == ''  # the record went with the lock


def test_no_training_of_the_name_starts_while_bench_reads_its_folder(workdir: Path, tmp_path: Path, basicsr_log,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from hmoe_arch.commands.bench import experiment_lock
    monkeypatch.chdir(tmp_path)
    (tmp_path / 'datasets').symlink_to(workdir / 'datasets')
    experiment = tmp_path / 'experiments' / 'tiny'
    (experiment / 'models').mkdir(parents=True)
    (experiment / 'models' / 'net_g_latest.pth').write_bytes(b'the finished run')
    with experiment_lock(Path('experiments/tiny')):
        line = refusal(['train', '-opt', str(OPTIONS / 'train_ucm_x2.yml'), '--force_yml', *TINY_TRAINING,
                        'name=tiny', 'train:total_iter=1'], basicsr_log)
    assert line == (f'basicsr train: {experiment}: in use by another process (basicsr bench reading it, or a training '
                    'of this name starting); wait for it to finish or choose another name')
    assert sorted(p.name for p in (tmp_path / 'experiments').iterdir()) == ['.tiny.lock', 'tiny']
    assert (experiment / 'models' / 'net_g_latest.pth').read_bytes() == b'the finished run'


def test_bench_shows_progress_unless_told_not_to(trained: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                 capsys) -> None:
    monkeypatch.chdir(trained)
    experiment = trained / 'experiments' / 'train_EDSR_UCMerced_x2'
    capsys.readouterr()
    rows = run_bench([experiment], tmp_path / 'shown', runs=1)
    shown = capsys.readouterr().err
    images = sum(len(v) for v in rows[0].per_class.values())
    for name in ('Bicubic', 'train_EDSR_UCMerced_x2'):
        # tqdm's bar: images done of all, elapsed<remaining (the ETA), in images
        assert re.search(rf'{name} on UCMerced_test: 100%.*\| {images}/{images} \[\d\d:\d\d<\d\d:\d\d, *'
                         r'[\d.]+image/s\]', shown), shown
    run_bench([experiment], tmp_path / 'silent', runs=1, progress=False)
    silent = capsys.readouterr().err
    assert 'UCMerced_test:' not in silent and 'image/s' not in silent
    assert (tmp_path / 'silent' / 'bench.csv').read_text().count('\n') == 3


def test_plot_keeps_every_text_inside_the_image(tmp_path: Path) -> None:
    def row(name: str, latency: float, psnr: float) -> BenchRow:
        return BenchRow(model=BenchModel(name=name, scale=4, dataset_opt={}), protocol='basicsr-y',
                        test_set='UCMerced_test', psnr=psnr, ssim=0.7, latency_ms=latency)

    long_name = 'an_experiment_name_' * 12
    rows = [row('Bicubic', float('nan'), 26.74), row('ex_edsr_tiny', 10.37, 27.60), row('ex_hat_tiny', 52.60, 27.39),
            row('ex_mfghmoe_tiny', 68.12, 27.00), row(long_name, 12345.6, 26.5)]
    path = tmp_path / 'plot.png'
    texts = plot_psnr_latency(rows, path)
    image = cv2.imread(str(path))
    height, width = image.shape[:2]
    drawn = [t.text for t in texts]
    for label in ('ex_edsr_tiny (UCMerced_test x4)', 'ex_hat_tiny (UCMerced_test x4)',
                  'ex_mfghmoe_tiny (UCMerced_test x4)', 'latency (ms)', 'PSNR (dB), basicsr-y', '13580.2'):
        assert label in drawn
    # a label wider than the image is shrunk, then shortened
    assert any(t.startswith('an_experiment_name_') and t.endswith('...') for t in drawn)
    for text in texts:  # the extent OpenCV's renderer gives each text (cv2.getTextSize) lies inside the image
        left, top, right, bottom = text.box()
        assert 0 <= left and right < width and 0 <= top and bottom < height, (text, width, height)
    # and no ink reaches the image's edge: nothing was cut off there
    edges = np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]])
    assert (edges == 255).all()
