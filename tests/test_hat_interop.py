"""Drop-in for HAT users, against HAT's own code in ../shared/peers/HAT: HAT option files through `basicsr train`,
HAT's own train.py/test.py with one added line, HAT weights into MFG-HMoE, and our exact-HAT weights into HAT."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from util import REFERENCE_DIR

pytestmark = pytest.mark.slow  # runs HAT's code and trainings in subprocesses

HAT_SOURCE = REFERENCE_DIR.parent / 'peers' / 'HAT'
OPTIONS = Path(__file__).resolve().parents[1] / 'options'
TINY = {'embed_dim': 12, 'depths': [1], 'num_heads': [2], 'window_size': 4, 'squeeze_factor': 4, 'img_size': 16}
HAT_TINY = dict(TINY, upscale=4, in_chans=3, compress_ratio=3, conv_scale=0.01, overlap_ratio=0.5, img_range=1.0,
                mlp_ratio=2, upsampler='pixelshuffle', resi_connection='1conv')


def install_into(site: Path, name: str, version: str = '0.1.0') -> None:
    """Record the package ``site/name`` as the installed distribution ``name`` (the dist-info ``pip install
    --target site`` leaves): ``basicsr train|test`` import plugins from installed distributions only."""
    info = site / f'{name}-{version}.dist-info'
    info.mkdir()
    (info / 'METADATA').write_text(f'Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n')
    (info / 'top_level.txt').write_text(f'{name}\n')


@pytest.fixture
def hat_copy(tmp_path: Path) -> Path:
    """A writable copy of HAT's package (its train.py writes experiments/ beside itself), installed there (with
    the folder on PYTHONPATH, as ``run(..., hat_root=...)`` does); skips without HAT."""
    if not (HAT_SOURCE / 'hat' / 'train.py').is_file():
        pytest.skip(f'HAT peer code not available: {HAT_SOURCE}/hat is missing (it ships in ../shared/peers)')
    root = tmp_path / 'HAT'
    shutil.copytree(HAT_SOURCE / 'hat', root / 'hat', ignore=shutil.ignore_patterns('__pycache__'))
    install_into(root, 'hat')
    return root


def run(args, cwd: Path, hat_root: Path = None, timeout: int = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    if hat_root is not None:
        env['PYTHONPATH'] = os.pathsep.join([str(hat_root), env.get('PYTHONPATH', '')])
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def hat_option_file(path: Path, workdir: Path, network: dict, **changes) -> Path:
    """HAT's own fine-tuning option file with only the network and the data paths changed (plus a short run)."""
    opt = yaml.safe_load((HAT_SOURCE / 'options' / 'train' /
                          'train_HAT_SRx4_finetune_from_ImageNet_pretrain.yml').read_text())
    data = workdir / 'datasets' / 'UCMerced'
    opt['datasets']['train'].update(dataroot_gt=str(data / 'Test_HR'), dataroot_lq=str(data / 'Test_LR_x4'),
                                    gt_size=32, num_worker_per_gpu=0, batch_size_per_gpu=2)
    del opt['datasets']['train']['meta_info_file']
    opt['datasets']['val_1'].update(dataroot_gt=str(data / 'Test_HR'), dataroot_lq=str(data / 'Test_LR_x4'))
    del opt['datasets']['val_2']
    opt['network_g'] = network
    opt['path']['pretrain_network_g'] = None
    opt['num_gpu'] = 0
    opt['train']['total_iter'] = 2
    opt['val']['val_freq'] = 2
    opt['logger'].update(print_freq=1, save_checkpoint_freq=2, use_tb_logger=False)
    for key, value in changes.items():
        opt[key] = value
    path.write_text(yaml.safe_dump(opt, sort_keys=False))
    return path


def test_a_hat_option_file_trains_through_basicsr_train(workdir: Path, hat_copy: Path, tmp_path: Path) -> None:
    option = hat_option_file(tmp_path / 'hat_mfghmoe.yml', workdir, {'type': 'MFGHMoEArch', 'upscale': 4, **TINY})
    done = run(['-m', 'hmoe_arch', 'train', '-opt', str(option)], tmp_path, hat_root=hat_copy)
    assert done.returncode == 0, done.stderr[-3000:]
    exp = tmp_path / 'experiments' / 'train_HAT_SRx4_finetune_from_ImageNet_pretrain'
    assert (exp / 'models' / 'net_g_2.pth').is_file()
    assert "Model [HATModel] is created." in done.stderr
    assert 'importing plugin hat (distribution hat 0.1.0), because model_type names its type HATModel' in done.stderr
    log = next(exp.glob('train_*.log')).read_text()
    assert log.count('model_type HATModel trains the MoE network without what MFGHMoEModel adds') == 1


WITHOUT_HAT = """
import runpy
import sys


class RefuseHat:
    @staticmethod
    def find_spec(name, path=None, target=None):
        if name == 'hat' or name.startswith('hat.'):
            raise ModuleNotFoundError(f'No module named {name!r}', name=name)
        return None


sys.meta_path.insert(0, RefuseHat())
runpy.run_module('hmoe_arch', run_name='__main__', alter_sys=True)
"""
"""``python -c WITHOUT_HAT ARGS`` is ``python -m hmoe_arch ARGS`` in an interpreter whose import system answers
``import hat`` (and its submodules) as where HAT is not installed, whatever is installed or on PYTHONPATH."""


@pytest.mark.parametrize('hat_on_path', [False, True], ids=['as-installed', 'hat-on-pythonpath'])
def test_without_hat_a_hat_option_file_gets_one_line_with_both_ways_out(workdir: Path, tmp_path: Path,
                                                                         hat_on_path: bool) -> None:
    """HAT made absent by the child itself: the same line whether or not HAT is installed (or on PYTHONPATH)."""
    if hat_on_path and not (HAT_SOURCE / 'hat' / '__init__.py').is_file():
        pytest.skip(f'HAT peer code not available: {HAT_SOURCE}/hat is missing (it ships in ../shared/peers)')
    option = hat_option_file(tmp_path / 'hat_mfghmoe.yml', workdir, {'type': 'MFGHMoEArch', 'upscale': 4, **TINY})
    done = run(['-c', WITHOUT_HAT, 'train', '-opt', str(option)], tmp_path,
               hat_root=HAT_SOURCE if hat_on_path else None)
    assert done.returncode == 2
    assert done.stderr.splitlines()[-1].endswith(
        "model_type: HATModel comes from HAT (the `hat` package), which cannot be imported (No module named 'hat'); "
        "install it (pip install --no-deps -e <your HAT checkout>) or use model_type: MFGHMoEModel, which adds what "
        "HATModel does (window padding, tiling)")
    assert not (tmp_path / 'experiments').exists()


def test_plugins_key_and_flag_import_the_named_package(workdir: Path, tmp_path: Path) -> None:
    option = hat_option_file(tmp_path / 'plugin.yml', workdir, {'type': 'MFGHMoEArch', 'upscale': 4, **TINY},
                             model_type='MFGHMoEModel', plugins=['no_such_plugin_package'])
    done = run(['-m', 'hmoe_arch', 'train', '-opt', str(option)], tmp_path)
    assert done.returncode == 2
    assert ('plugins: the option file names no_such_plugin_package, and an option file cannot import code by '
            'itself; if you trust the package, install it and enable it with --plugin no_such_plugin_package (or '
            'HMOE_ARCH_PLUGINS=no_such_plugin_package)') in done.stderr
    done = run(['-m', 'hmoe_arch', 'train', '-opt', str(option), '--plugin', 'no_such_plugin_package'], tmp_path)
    assert done.returncode == 2
    assert ("--plugin: cannot import no_such_plugin_package as a plugin (No module named 'no_such_plugin_package')"
            in done.stderr)
    site = tmp_path / 'site'
    site.mkdir()
    (site / 'my_types.py').write_text('from basicsr.models.sr_model import SRModel\n'
                                      'from basicsr.utils.registry import MODEL_REGISTRY\n'
                                      '@MODEL_REGISTRY.register()\nclass MyModel(SRModel):\n    pass\n')
    option = hat_option_file(tmp_path / 'mine.yml', workdir, {'type': 'MFGHMoEArch', 'upscale': 4, **TINY},
                             model_type='MyModel', val=None)  # SRModel does not pad the 62-pixel test image
    assert 'no model named MyModel is registered' in run(['-m', 'hmoe_arch', 'train', '-opt', str(option)],
                                                         tmp_path).stderr
    done = run(['-m', 'hmoe_arch', 'train', '-opt', str(option), '--plugin', 'my_types'], tmp_path, hat_root=site)
    assert done.returncode == 2  # on PYTHONPATH but not installed
    assert f'{site / "my_types.py"} is not part of an installed distribution (pip install it first)' in done.stderr
    install_into(site, 'my_types')
    done = run(['-m', 'hmoe_arch', 'train', '-opt', str(option), '--plugin', 'my_types'], tmp_path, hat_root=site)
    assert done.returncode == 0, done.stderr[-3000:]
    assert 'importing plugin my_types (distribution my_types 0.1.0), enabled by --plugin' in done.stderr
    assert 'Model [MyModel] is created.' in done.stderr


def test_hats_own_train_and_test_scripts_with_one_added_line(workdir: Path, hat_copy: Path, tmp_path: Path) -> None:
    for script in ('train.py', 'test.py'):
        path = hat_copy / 'hat' / script
        path.write_text('import hmoe_arch\n' + path.read_text())
    option = hat_option_file(tmp_path / 'mfghmoe.yml', workdir, {'type': 'MFGHMoEArch', 'upscale': 4, **TINY},
                             model_type='MFGHMoEModel', name='from_hat_script')
    done = run([str(hat_copy / 'hat' / 'train.py'), '-opt', str(option)], tmp_path, hat_root=hat_copy)
    assert done.returncode == 0, done.stderr[-3000:]
    weights = hat_copy / 'experiments' / 'from_hat_script' / 'models' / 'net_g_latest.pth'
    assert weights.is_file()
    test = yaml.safe_load(option.read_text())
    test.update(name='test_from_hat_script', datasets={'test_1': test['datasets']['val_1']})
    test['path'] = {'pretrain_network_g': str(weights), 'param_key_g': 'params_ema', 'strict_load_g': True}
    (tmp_path / 'test.yml').write_text(yaml.safe_dump(test, sort_keys=False))
    done = run([str(hat_copy / 'hat' / 'test.py'), '-opt', str(tmp_path / 'test.yml')], tmp_path, hat_root=hat_copy)
    assert done.returncode == 0, done.stderr[-3000:]
    assert '# psnr:' in done.stderr


def test_hat_weights_initialise_an_mfghmoe_run(workdir: Path, hat_copy: Path, tmp_path: Path) -> None:
    made = run(['-c', 'import hmoe_arch, sys, torch; from hat.archs.hat_arch import HAT; '  # a child: HAT registers
                f'torch.save({{"params_ema": HAT(**{HAT_TINY!r}).state_dict()}}, sys.argv[1])',
                str(tmp_path / 'HAT_tiny.pth')], tmp_path, hat_root=hat_copy)
    assert made.returncode == 0, made.stderr[-3000:]
    (tmp_path / 'datasets').symlink_to(workdir / 'datasets')
    force = [f'network_g:{k}={v}' for k, v in TINY.items()] + [
        f'path:pretrain_network_g={tmp_path / "HAT_tiny.pth"}', 'datasets:train:gt_size=32',
        'datasets:train:batch_size_per_gpu=2', 'datasets:train:num_worker_per_gpu=0', 'train:total_iter=1',
        'val:val_freq=1000', 'logger:save_checkpoint_freq=1', 'num_gpu=0']
    done = run(['-m', 'hmoe_arch', 'train', '-opt', str(OPTIONS / 'train_ucm_x4_from_hat.yml'), '--force_yml',
                *force], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert 'HAT_tiny.pth into MFGHMoEArch' in done.stderr
    assert 'Kept their initialisation: mfg.1, mfg.3' not in done.stderr  # one RHAG: mfg.1 only
    assert 'upsample.0' in done.stderr and 'aggr_conv' in done.stderr


def test_exact_hat_weights_load_strictly_in_hats_own_model(workdir: Path, hat_copy: Path, tmp_path: Path) -> None:
    exact = {'type': 'MFGHMoEArch', 'upscale': 4, 'moe': False, 'mfa': False, 'rgb_mean': [0.4488, 0.4371, 0.4040],
             **TINY}
    option = hat_option_file(tmp_path / 'exact.yml', workdir, exact, model_type='MFGHMoEModel', name='exact_hat')
    (tmp_path / 'datasets').symlink_to(workdir / 'datasets')
    done = run(['-m', 'hmoe_arch', 'train', '-opt', str(option)], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    weights = tmp_path / 'experiments' / 'exact_hat' / 'models' / 'net_g_latest.pth'
    test = yaml.safe_load(option.read_text())
    test.update(name='hat_reads_ours', model_type='HATModel', datasets={'test_1': test['datasets']['val_1']},
                network_g={'type': 'HAT', **HAT_TINY})
    test['path'] = {'pretrain_network_g': str(weights), 'param_key_g': 'params_ema', 'strict_load_g': True}
    (tmp_path / 'hat_test.yml').write_text(yaml.safe_dump(test, sort_keys=False))
    script = hat_copy / 'hat' / 'test.py'
    script.write_text('import hmoe_arch\n' + script.read_text())
    done = run([str(script), '-opt', str(tmp_path / 'hat_test.yml')], tmp_path, hat_root=hat_copy)
    assert done.returncode == 0, done.stderr[-3000:]
    assert 'Loading HAT model from' in done.stderr and '# psnr:' in done.stderr
