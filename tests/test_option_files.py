"""Every option file shipped in options/: parses (safe --force_yml, BasicSR's semantics), builds its network and
datasets, is consistent, and trains."""
import argparse
import functools
import json
from pathlib import Path

import pytest
import torch
import yaml
from basicsr.archs import build_network
from basicsr.data import build_dataset

from hmoe_arch import MFGHMoEArch
from hmoe_arch.archs.config import HAT_RGB_MEAN
from hmoe_arch.commands.cli import main
from hmoe_arch.commands.pipeline import parse_options
from hmoe_arch.errors import OptionError
from hmoe_arch.options import apply_force_yml

from util import full_size_spec

OPTIONS = Path(__file__).resolve().parents[1] / 'options'
EXPERIMENT_FILES = sorted(p.name for p in OPTIONS.glob('*.yml'))
BY_SCALE = sorted(EXPERIMENT_FILES, key=lambda name: (name.split('_')[2][:2], name))  # equal networks adjacent
ARCH_LAYOUTS = {'archs/mfghmoe_x4.yml': 'official_mfghmoe_x4', 'archs/hat_x4.yml': 'hat_x4'}


@functools.lru_cache(maxsize=1)
def _network(network_json: str) -> torch.nn.Module:
    """The network of a ``network_g`` (as sorted JSON), built once for consecutive files that share it (a
    paper-size build takes about a second; the tests only read it)."""
    return build_network(json.loads(network_json))


def network_of(opt: dict) -> torch.nn.Module:
    return _network(json.dumps(opt['network_g'], sort_keys=True))


def test_force_yml_parses_yaml_values_and_never_executes() -> None:
    opt = {'train': {'total_iter': 100, 'optim_g': {'lr': 1e-4}}, 'name': 'x'}
    apply_force_yml(opt, 'train:total_iter=10')
    apply_force_yml(opt, 'train:optim_g:betas=[0.9, 0.99]')
    apply_force_yml(opt, 'train:new_key={a: 1}')
    apply_force_yml(opt, "name=__import__('os').system('false')")
    assert opt['train']['total_iter'] == 10 and opt['train']['optim_g']['betas'] == [0.9, 0.99]
    assert opt['train']['new_key'] == {'a': 1}
    assert opt['name'] == "__import__('os').system('false')"
    with pytest.raises(OptionError, match='no option train:missing'):
        apply_force_yml(opt, 'train:missing:lr=1')
    with pytest.raises(OptionError, match='expected key:sub=value'):
        apply_force_yml(opt, 'train:total_iter')
    with pytest.raises(OptionError, match='not a mapping'):
        apply_force_yml(opt, 'name:sub=1')


def test_the_promised_files_exist() -> None:
    expected = {f'{kind}_{ds}_x{s}.yml' for kind in ('train', 'test') for ds in ('ucm', 'aid') for s in (2, 4)}
    expected |= {'train_ucm_x4_lmdb.yml', 'train_ucm_x4_from_hat.yml'}
    assert set(EXPERIMENT_FILES) == expected
    assert {str(p.relative_to(OPTIONS)) for p in (OPTIONS / 'archs').glob('*.yml')} == set(ARCH_LAYOUTS)


@pytest.mark.parametrize('name', BY_SCALE)
def test_option_file_builds_and_is_consistent(name: str, workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(workdir)
    is_train = name.startswith('train')
    args = argparse.Namespace(opt=str(OPTIONS / name), force_yml=None, launcher='none', auto_resume=False,
                              debug=False)
    opt = parse_options(args, str(workdir), is_train)
    scale = opt['scale']
    assert opt['network_g']['upscale'] == scale
    assert {m['crop_border'] for m in opt['val']['metrics'].values()} == {scale}
    assert all(m['test_y_channel'] for m in opt['val']['metrics'].values())
    assert opt['model_type'] == 'MFGHMoEModel'
    net = network_of(opt)
    assert net.upscale == scale
    for phase, dataset_opt in opt['datasets'].items():
        dataset = build_dataset(dataset_opt)
        item = dataset[0]
        if phase == 'train':
            assert item['gt'].shape[-1] == dataset_opt['gt_size']
            assert item['lq'].shape[-1] * scale == item['gt'].shape[-1]
            assert (dataset_opt['gt_size'] // scale) % opt['network_g']['window_size'] == 0
        else:
            assert item['lq'].shape[-1] * scale == item['gt'].shape[-1]
    if is_train:
        train = opt['train']
        assert train['total_iter'] == 100000 and train['optim_g']['type'] == 'Adam'
        assert train['optim_g']['lr'] == 2e-4 and train['ema_decay'] == 0.999
        assert train['pixel_opt']['type'] == 'L1Loss' and opt['datasets']['train']['batch_size_per_gpu'] == 4
        assert opt['path']['strict_load_g'] is (name != 'train_ucm_x4_from_hat.yml')


def test_from_hat_file_points_at_a_hat_checkpoint() -> None:
    opt = yaml.safe_load((OPTIONS / 'train_ucm_x4_from_hat.yml').read_text())
    assert opt['path']['pretrain_network_g'] == 'experiments/pretrained_models/HAT_SRx4.pth'
    assert opt['path']['param_key_g'] == 'params_ema' and opt['path']['strict_load_g'] is False


@pytest.mark.parametrize('relative', sorted(ARCH_LAYOUTS))
def test_network_blocks_build_the_published_layouts(relative: str) -> None:
    opt = yaml.safe_load((OPTIONS / relative).read_text())
    with torch.device('meta'):  # shapes only
        net = build_network(dict(opt['network_g']))
    spec = full_size_spec(ARCH_LAYOUTS[relative])
    assert {k: list(v.shape) for k, v in net.state_dict().items()} == spec['keys']


BASELINES = sorted(p.name for p in (OPTIONS / 'baselines').glob('*.yml'))
ABLATIONS = sorted(p.name for p in (OPTIONS / 'ablations').glob('*.yml'))


def test_baselines_and_ablations_are_complete() -> None:
    models = ('edsr', 'rrdbnet', 'rcan', 'swinir', 'hat')
    assert BASELINES == sorted(f'train_{ds}_x{s}_{m}.yml' for ds in ('ucm', 'aid') for s in (2, 4) for m in models)
    assert len(ABLATIONS) == 11


def _without(opt: dict, *keys: str) -> dict:
    return {k: v for k, v in opt.items() if k not in keys}


@pytest.mark.parametrize('name', BASELINES)
def test_baseline_matches_its_reference_except_the_network(name: str) -> None:
    opt = yaml.safe_load((OPTIONS / 'baselines' / name).read_text())
    dataset, scale = name.split('_')[1:3]
    reference = yaml.safe_load((OPTIONS / f'train_{dataset}_{scale}.yml').read_text())
    reference['train'].pop('aux_loss_weight')
    assert _without(opt, 'name', 'network_g') == _without(reference, 'name', 'network_g')
    assert opt['network_g'].get('upscale', opt['network_g'].get('scale')) == opt['scale']


def _baseline_networks() -> list:
    """One case per distinct baseline ``network_g`` (the UCMerced and AID files share theirs); the x2 networks
    are built in the full suite only (a paper-size build and forward takes about a second)."""
    networks = {}
    for name in BASELINES:
        network = yaml.safe_load((OPTIONS / 'baselines' / name).read_text())['network_g']
        networks.setdefault(json.dumps(network, sort_keys=True), name)
    return [pytest.param(name, marks=[pytest.mark.slow] if '_x2_' in name else []) for name in networks.values()]


@pytest.mark.parametrize('name', _baseline_networks())
def test_baseline_network_builds_and_upscales(name: str) -> None:
    opt = yaml.safe_load((OPTIONS / 'baselines' / name).read_text())
    net = build_network(dict(opt['network_g']))
    with torch.no_grad():
        lr = torch.rand(1, 3, 16, 16)
        assert net.eval()(lr).shape == (1, 3, 16 * opt['scale'], 16 * opt['scale'])


@pytest.mark.parametrize('name', ABLATIONS)
def test_ablation_matches_the_paper_file_except_the_moe_keys(name: str) -> None:
    opt = yaml.safe_load((OPTIONS / 'ablations' / name).read_text())
    reference = yaml.safe_load((OPTIONS / 'train_ucm_x4.yml').read_text())
    assert _without(opt, 'name', 'network_g') == _without(reference, 'name', 'network_g')
    moe_keys = ('expert_groups', 'routing', 'mfa')
    assert _without(opt['network_g'], *moe_keys) == _without(reference['network_g'], *moe_keys)
    with torch.device('meta'):  # the layout only: no values needed
        net = build_network(dict(opt['network_g']))
    assert isinstance(net, MFGHMoEArch) and net.moe
    groups = [(g['kernel_size'], g['num_experts']) for g in opt['network_g']['expert_groups']]
    assert [tuple(g) for g in net.upsample.moe.expert_groups] == groups
    assert [e.kernel_size[0] for e in net.upsample.moe.experts] == [k for k, n in groups for _ in range(n)]


@pytest.mark.parametrize('force, message', [
    (['network_g:embed_dims=60'], r'network_g: MFGHMoEArch: unknown keyword\(s\) \[.embed_dims.\] \(did you mean: '
                                  r'embed_dims -> embed_dim\?\)'),
    (['network_g:upscale=2'], r'network_g.upscale is 2 but scale is 4'),
    (['val:metrics:psnr:crop_border=2'], r'val.metrics.psnr.crop_border is 2 but scale is 4'),
    (['datasets:train:dataroot_gt=datasets/nowhere'], r'datasets.train.dataroot_gt: datasets/nowhere does not exist'),
    (['datasets:train:split_file=datasets/none.txt'], r'datasets.train.split_file: datasets/none.txt does not exist'),
    (['datasets:train:gt_size=200'], r'datasets.train.gt_size \(200\) must be a multiple of scale x window_size '
                                     r'\(4 x 16 = 64\)'),
    (['datasets:train:batch_size_per_gpu=64'], r'datasets.train.batch_size_per_gpu: a batch of 64 .* larger than '
                                               r'the training set \(9 images\)'),
])
def test_options_are_validated_before_training(force: list, message: str, workdir: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(workdir)
    args = argparse.Namespace(opt=str(OPTIONS / 'train_ucm_x4.yml'), force_yml=force, launcher='none',
                              auto_resume=False, debug=False)
    with pytest.raises(OptionError, match=message):
        parse_options(args, str(workdir), True)


# ------------------------------------------------------------------------------------------------------
# every shipped training file starts training
SMALL_NETWORKS = {  # keys that shrink each architecture; everything else comes from the file
    'MFGHMoEArch': {'embed_dim': 12, 'depths': [1], 'num_heads': [2], 'window_size': 4, 'squeeze_factor': 4,
                    'img_size': 16},
    'EDSR': {'num_feat': 16, 'num_block': 1},
    'RCAN': {'num_feat': 16, 'num_group': 1, 'num_block': 1, 'squeeze_factor': 4},
    'RRDBNet': {'num_feat': 16, 'num_block': 1, 'num_grow_ch': 8},
    'SwinIR': {'embed_dim': 12, 'depths': [1], 'num_heads': [2], 'window_size': 4, 'img_size': 16},
}
TRAINING_FILES = [name for name in EXPERIMENT_FILES if name.startswith('train')] + [
    f'{folder}/{p.name}' for folder in ('baselines', 'ablations') for p in sorted((OPTIONS / folder).glob('*.yml'))]


@pytest.mark.slow
@pytest.mark.parametrize('name', TRAINING_FILES)
def test_every_shipped_training_file_trains_one_iteration(name: str, workdir: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / 'datasets').symlink_to(workdir / 'datasets')
    monkeypatch.chdir(tmp_path)
    opt = yaml.safe_load((OPTIONS / name).read_text())
    network = opt['network_g']
    small = SMALL_NETWORKS[network['type']]
    force = [f'network_g:{k}={json.dumps(v)}' for k, v in small.items()]
    window = small.get('window_size', 1)
    force += [f'datasets:train:gt_size={opt["scale"] * max(window, 4) * 2}', 'datasets:train:batch_size_per_gpu=2',
              'datasets:train:num_worker_per_gpu=0', 'train:total_iter=1', 'val:val_freq=1',
              'logger:save_checkpoint_freq=1', 'logger:print_freq=1', 'logger:use_tb_logger=false', 'num_gpu=0']
    if opt['path'].get('pretrain_network_g'):  # the HAT initialisation: a small HAT checkpoint of the same shape
        hat = MFGHMoEArch(**small, upscale=opt['scale'], moe=False, mfa=False, rgb_mean=HAT_RGB_MEAN)
        torch.save({'params_ema': hat.state_dict()}, tmp_path / 'hat.pth')
        force.append(f'path:pretrain_network_g={tmp_path / "hat.pth"}')
    assert main(['train', '-opt', str(OPTIONS / name), '--force_yml', *force]) == 0
    models = tmp_path / 'experiments' / opt['name'] / 'models'
    assert sorted(p.name for p in models.iterdir()) == ['net_g_1.pth', 'net_g_latest.pth']


def test_baseline_and_ablation_files_are_the_generators_output() -> None:
    import importlib.util
    spec = importlib.util.spec_from_file_location('generate_options', OPTIONS / 'generate.py')
    generate = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generate)
    files = generate.generated()
    committed = set((OPTIONS / 'baselines').glob('*.yml')) | set((OPTIONS / 'ablations').glob('*.yml'))
    assert set(files) == committed
    stale = [path.name for path, text in files.items() if path.read_text() != text]
    assert stale == [], f'regenerate with python options/generate.py: {stale}'


def test_no_option_file_carries_keys_nothing_reads() -> None:
    every = sorted(OPTIONS.rglob('*.yml'))
    assert [p.name for p in every if 'dist_params' in yaml.safe_load(p.read_text())] == []
