"""One error hierarchy: every refusal derives from HmoeError and carries the exit status the command line uses;
every documented option key with a wrong value is refused in one line."""
import inspect
import re
from pathlib import Path

import pytest
import yaml

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


DOCS = Path(__file__).resolve().parents[1] / 'docs'
NETWORK_BAD_VALUES = {
    'img_size': 'big', 'patch_size': 0, 'in_chans': 2.5, 'embed_dim': -24, 'depths': 'two', 'num_heads': [4, 'x'],
    'window_size': True, 'compress_ratio': 0, 'squeeze_factor': 'eight', 'conv_scale': 'small',
    'overlap_ratio': 'half', 'mlp_ratio': -2, 'qkv_bias': 'yes', 'qk_scale': 0, 'drop_rate': 1.5,
    'attn_drop_rate': 'none', 'drop_path_rate': -0.1, 'ape': 1, 'patch_norm': 'on', 'use_checkpoint': 'no',
    'upscale': 0, 'img_range': 0, 'upsampler': 'nearest+conv', 'resi_connection': '3conv', 'rgb_mean': [0.5],
    'mfa': 'true', 'moe': None, 'expert_groups': [{'kernel_size': 2, 'num_experts': 8}], 'routing': 'triple',
    'top_k': 9, 'routing_grad': 'reinforce', 'balance': 'loss', 'balance_rate': 2, 'balance_until': -5,
    'routing_norm': 'whiten', 'attention': 'flash',
}
"""A wrong value for every ``network_g`` key docs/training.md documents."""
MODEL_BAD_VALUES = {
    'train:aux_loss_weight': 'abc', 'train:routing_lr_scale': -1, 'train:skip_nonfinite': 1.5, 'use_amp': 'fp16',
    'compile': 'yes', 'tile': {'tile_size': 0, 'tile_pad': 4}, 'val:pbar': 'no', 'num_threads': 0,
    'val:save_expert_maps': 'maybe',
}
"""A wrong value for every key of :class:`MFGHMoEModel` and the commands (docs/training.md, docs/troubleshooting.md)."""


def documented_network_keys() -> set:
    """The ``network_g`` keys docs/training.md lists under "Keys": the HAT keys of its first paragraph and the
    first column of its table."""
    section = (DOCS / 'training.md').read_text().split('\n## Keys\n', 1)[1].split('\n## ', 1)[0]
    paragraph, table = section.split('\n| key |', 1)
    values = {'pixelshuffle', 'identity'}  # values named in the paragraph, not keys
    keys = {k for k in re.findall(r'`([a-z_]+)`', paragraph) if k not in values}
    return keys | set(re.findall(r'^\| `([a-z_]+)` \|', table, flags=re.M))


def test_every_documented_network_key_is_a_constructor_argument_with_a_bad_value_case() -> None:
    from hmoe_arch import MFGHMoEArch
    arguments = set(inspect.signature(MFGHMoEArch.__init__).parameters) - {'self', 'unknown'}
    assert documented_network_keys() == arguments
    assert set(NETWORK_BAD_VALUES) == arguments


@pytest.mark.parametrize('key, value', [*[(f'network_g:{k}', v) for k, v in NETWORK_BAD_VALUES.items()],
                                        *MODEL_BAD_VALUES.items()], ids=lambda v: v if isinstance(v, str) else '')
def test_every_documented_option_key_with_a_wrong_value_is_one_line_and_exit_2(
        key: str, value, tmp_path: Path, monkeypatch, capsys, basicsr_log) -> None:
    monkeypatch.chdir(tmp_path)
    opt = {
        'name': 'bad_key', 'model_type': 'MFGHMoEModel', 'scale': 4, 'num_gpu': 0, 'manual_seed': 0,
        'datasets': {'train': {'name': 'T', 'type': 'RSPairedDataset', 'dataroot_gt': str(tmp_path / 'missing'),
                               'gt_size': 64, 'batch_size_per_gpu': 1, 'num_worker_per_gpu': 0}},
        'network_g': {'type': 'MFGHMoEArch', 'upscale': 4, 'embed_dim': 24, 'depths': [2], 'num_heads': [4],
                      'window_size': 8, 'squeeze_factor': 8, 'expert_groups': [{'kernel_size': 1, 'num_experts': 2},
                                                                              {'kernel_size': 3, 'num_experts': 2}]},
        'path': {}, 'train': {'optim_g': {'type': 'Adam', 'lr': 2e-4}, 'total_iter': 1,
                              'scheduler': {'type': 'MultiStepLR', 'milestones': [10], 'gamma': 0.5},
                              'pixel_opt': {'type': 'L1Loss'}},
        'val': {'val_freq': 1, 'metrics': {}}, 'logger': {'print_freq': 1, 'save_checkpoint_freq': 1},
    }
    section, _, name = key.rpartition(':')
    (opt[section] if section else opt)[name] = value
    path = tmp_path / 'bad.yml'
    path.write_text(yaml.safe_dump(opt))
    assert main(['train', '-opt', str(path)]) == 2
    shown = name.split(':')[-1]
    assert len(basicsr_log[-1].splitlines()) == 1 and shown in basicsr_log[-1], basicsr_log[-1]
    captured = capsys.readouterr()
    assert 'Traceback' not in captured.out + captured.err
    assert not (tmp_path / 'experiments').exists()  # refused before anything was made
