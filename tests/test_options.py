"""Every option file in options/ parses, builds its network and datasets, and is consistent."""
import argparse
import json
from pathlib import Path

import pytest
import yaml
from basicsr.archs import build_network
from basicsr.data import build_dataset

from conftest import reference_file
from hmoe_arch.cli import parse_options

OPTIONS = Path(__file__).resolve().parents[1] / 'options'
EXPERIMENT_FILES = sorted(p.name for p in OPTIONS.glob('*.yml'))
ARCH_LAYOUTS = {'archs/mfghmoe_x4.yml': 'official_mfghmoe_x4', 'archs/hat_x4.yml': 'hat_x4'}


def test_the_promised_files_exist() -> None:
    expected = {f'{kind}_{ds}_x{s}.yml' for kind in ('train', 'test') for ds in ('ucm', 'aid') for s in (2, 4)}
    expected |= {'train_ucm_x4_lmdb.yml', 'train_ucm_x4_from_hat.yml'}
    assert set(EXPERIMENT_FILES) == expected
    assert {str(p.relative_to(OPTIONS)) for p in (OPTIONS / 'archs').glob('*.yml')} == set(ARCH_LAYOUTS)


@pytest.mark.parametrize('name', EXPERIMENT_FILES)
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
    net = build_network(dict(opt['network_g']))
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
    net = build_network(dict(opt['network_g']))
    with open(reference_file('state_dict_spec_full.json')) as f:
        spec = json.load(f)[ARCH_LAYOUTS[relative]]
    assert {k: list(v.shape) for k, v in net.state_dict().items()} == spec['keys']
