"""A network with its weights from a checkpoint: weights of every origin, options from an option file, overrides or
the checkpoint alone, the checks on scale and values, and errors that name the flag and the file."""
import resource
import time
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
import torch.nn as nn

from hmoe_arch import MFGHMoEArch
from hmoe_arch.errors import OptionError
from hmoe_arch.loading import (
    checkpoint_scale,
    load_network,
    local_weights,
    measured_scale,
    network_and_scale,
    network_options,
    read_weights,
    with_overrides,
)
from hmoe_arch.tiling import blended_tiled_forward

from util import HAT_RGB_MEAN, SMALL_GROUPS, load_reference, tiny, write_image

TINY_ARGS = ['embed_dim=24', 'depths=[1, 1]', 'num_heads=[2, 2]', 'window_size=4', 'img_size=16',
             'squeeze_factor=6', 'expert_groups=[{kernel_size: 1, num_experts: 2}, {kernel_size: 3, num_experts: 2}]']
OURS = tiny(upscale=2, top_k=2, rgb_mean=[0.5, 0.4, 0.3], img_range=2.0, expert_groups=SMALL_GROUPS)


@pytest.fixture
def weights(tmp_path: Path) -> Path:
    """A x2 checkpoint without stored options (``params`` and ``params_ema``)."""
    net = MFGHMoEArch(**tiny(upscale=2, expert_groups=SMALL_GROUPS))
    path = tmp_path / 'net_g_latest.pth'
    torch.save({'params': net.state_dict(), 'params_ema': net.state_dict()}, path)
    return path


@pytest.fixture
def ours(tmp_path: Path) -> Path:
    """A checkpoint as MFGHMoEModel writes it: params, params_ema and network_g."""
    net = MFGHMoEArch(**OURS)
    path = tmp_path / 'ours.pth'
    torch.save({'params': net.state_dict(), 'params_ema': net.state_dict(),
                'network_g': {'type': 'MFGHMoEArch', **OURS}}, path)
    return path


@pytest.mark.parametrize('name', ['tiny_hat_x2', 'tiny_authors_x2', 'hat_x4', 'official_mfghmoe_x4'])
def test_hat_and_authors_weights(tmp_path: Path, name: str) -> None:
    ref = load_reference(name)
    scale, window = ref['config']['upscale'], ref['config']['window_size']
    path = tmp_path / f'{name}.pth'
    torch.save({'params_ema': ref['state_dict']}, path)
    extra = {'moe': False, 'mfa': False, 'rgb_mean': HAT_RGB_MEAN} if 'hat' in name else {}
    args = [f'{k}={v}' for k, v in {**ref['config'], **extra}.items()]
    net = load_network(path, network_options(None, args), torch.device('cpu'))
    assert checkpoint_scale(ref['state_dict']) == scale
    with torch.no_grad():
        out = blended_tiled_forward(net, ref['input'][:1], scale, window, tile=64, overlap=8)
    assert (out - ref['output'][:1]).abs().max() <= 1e-4


def test_weights_that_do_not_fit_are_named(tmp_path: Path, weights: Path) -> None:
    with pytest.raises(OptionError, match=r'trained for x2, but the network is x4 \(use --arch-args upscale=2\)'):
        load_network(weights, network_options(None, TINY_ARGS + ['upscale=4']), torch.device('cpu'))
    with pytest.raises(OptionError, match=r'^path.pretrain_network_g .*net_g_latest.pth: trained for x2, but the '
                                          r'network is x4 \(set network_g.upscale: 2\)$'):
        load_network(weights, network_options(None, TINY_ARGS + ['upscale=4']), torch.device('cpu'),
                     label='path.pretrain_network_g')
    with pytest.raises(OptionError, match=r'^--weights .*nope.pth: no such file$'):
        load_network(tmp_path / 'nope.pth', network_options(None, TINY_ARGS), torch.device('cpu'))
    with pytest.raises(OptionError, match='does not fit the network'):
        load_network(weights, network_options(None, TINY_ARGS + ['upscale=2', 'embed_dim=12']),
                     torch.device('cpu'))
    with pytest.raises(OptionError, match=r'^network_g: MFGHMoEArch: `top_k` must be an integer >= 1, got 0$'):
        load_network(weights, network_options(None, TINY_ARGS + ['upscale=2', 'top_k=0']), torch.device('cpu'))


def test_arch_args_still_override_the_checkpoint(ours: Path) -> None:
    net = load_network(ours, None, torch.device('cpu'), overrides=['top_k=1', 'attention=plain'])
    assert net.upsample.moe.gate.top_k == 1 and net.network_options['attention'] == 'plain'
    assert net.network_options['rgb_mean'] == [0.5, 0.4, 0.3] and not net.training


def test_a_checkpoint_no_network_can_be_read_from_asks_for_the_options(tmp_path: Path) -> None:
    torch.save({'params': {'body.0.weight': torch.zeros(4, 3, 3, 3)}}, tmp_path / 'other.pth')
    with pytest.raises(OptionError, match=r'other.pth: cannot tell the network from the file \(not an MFGHMoEArch/HAT '
                                          r'state_dict: no tensor conv_first.weight\); give its option file with -opt'):
        load_network(tmp_path / 'other.pth', None, torch.device('cpu'))


def test_options_come_from_the_option_file_and_the_overrides(tmp_path: Path) -> None:
    option = tmp_path / 'x3.yml'
    option.write_text('scale: 3\nnetwork_g:\n  type: MFGHMoEArch\n  embed_dim: 24\n  upscale: 3\n')
    assert network_and_scale(option, ['embed_dim=12', 'depths=[1, 1]']) == (
        {'type': 'MFGHMoEArch', 'embed_dim': 12, 'upscale': 3, 'depths': [1, 1]}, 3)
    assert network_options(option, ()) == {'type': 'MFGHMoEArch', 'embed_dim': 24, 'upscale': 3}
    assert network_and_scale(None, ['upscale=2']) == ({'type': 'MFGHMoEArch', 'upscale': 2}, None)
    stored = {'type': 'MFGHMoEArch', 'top_k': 2}
    assert with_overrides(stored, ['top_k=1']) == {'type': 'MFGHMoEArch', 'top_k': 1}
    assert stored == {'type': 'MFGHMoEArch', 'top_k': 2}  # a copy: the checkpoint's options stay as read
    with pytest.raises(OptionError, match=r"'network_g:top_k': expected key:sub=value"):
        network_options(None, ['top_k'])
    (tmp_path / 'plain.yml').write_text('scale: 2\n')
    with pytest.raises(OptionError, match='network_g'):
        network_options(tmp_path / 'plain.yml', ())


def test_read_weights_picks_the_entry_and_refuses_what_is_not_finite(tmp_path: Path, weights: Path) -> None:
    checkpoint, state = read_weights(weights, 'params_ema', '--weights')
    assert set(checkpoint) == {'params', 'params_ema'} and state.keys() == checkpoint['params_ema'].keys()
    broken = {key: {k: v.clone() for k, v in state.items()} for key in ('params', 'params_ema')}
    broken['params_ema']['conv_last.weight'][0, 0, 0, 0] = float('inf')
    torch.save(broken, tmp_path / 'inf.pth')
    with pytest.raises(OptionError, match=r"^--weights .*inf.pth: 1 tensor\(s\) hold NaN or Inf values, e.g. "
                                          r"\['conv_last.weight'\]"):
        read_weights(tmp_path / 'inf.pth', 'params_ema', '--weights')
    _, state = read_weights(tmp_path / 'inf.pth', 'params', '--weights')  # the other entry is finite
    assert torch.isfinite(state['conv_last.weight']).all()
    torch.save({'epoch': 3}, tmp_path / 'odd.pth')
    with pytest.raises(OptionError, match=r"^path.pretrain_network_g .*odd.pth: expected a state_dict .*\['epoch'\]$"):
        read_weights(tmp_path / 'odd.pth', 'params', 'path.pretrain_network_g')


def test_local_weights_names_the_flag_of_a_bad_url(tmp_path: Path) -> None:
    assert local_weights(str(tmp_path / 'w.pth')) == tmp_path / 'w.pth'
    with pytest.raises(OptionError, match=r'^path.pretrain_network_g https://example.invalid/w.pth#md5=abc: the part '
                                          r'after # must be sha256=<64 hex digits>$'):
        local_weights('https://example.invalid/w.pth#md5=abc', 'path.pretrain_network_g')


def test_checkpoint_scale_reads_the_upsampler() -> None:
    assert checkpoint_scale(MFGHMoEArch(**tiny(upscale=3, expert_groups=SMALL_GROUPS)).state_dict()) == 3
    assert checkpoint_scale(MFGHMoEArch(**tiny(moe=False, mfa=False, upscale=8)).state_dict()) == 8
    assert checkpoint_scale({'body.0.weight': torch.zeros(4, 3, 3, 3)}) is None
    with pytest.raises(OptionError, match=r'upsample.0.experts.0.weight has the shape \[5, 64, 1, 1\]'):
        checkpoint_scale({'upsample.0.experts.0.weight': torch.zeros(5, 64, 1, 1)})


class Resize(nn.Module):
    """Any input ``(B, C, H, W)`` -> ``(B, C, height, width)`` (nearest neighbour)."""

    def __init__(self, height: int, width: int) -> None:
        super().__init__()
        self.size = (height, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.interpolate(x, size=self.size)


def test_measured_scale_checks_every_declaration() -> None:
    cpu = torch.device('cpu')
    assert measured_scale(nn.Upsample(scale_factor=3), {'the option file\'s scale': None}, cpu, window=4) == 3
    assert measured_scale(nn.Upsample(scale_factor=2), {}, cpu, window=16, in_chans=1) == 2
    with pytest.raises(OptionError, match=r"^the network upscales x2, but the option file's scale says x4; the "
                                          r"weights or the options are for another scale$"):
        measured_scale(nn.Upsample(scale_factor=2), {'the option file\'s scale': 4}, cpu, window=4)
    with pytest.raises(OptionError, match=r'^the network maps a 8x8 input to 20x20: not an integer upscaling factor$'):
        measured_scale(Resize(20, 20), {}, cpu, window=4)


# ------------------------------------------------------------------------------------------------------
# crafted checkpoints: refused in one line, at once, without a large allocation
def refused_quickly(action: Callable[[], Any]) -> str:
    """The message of the OptionError ``action()`` raises, after checking that it is one line, came well under a
    second and raised this process's peak resident set by less than 100 MiB (nothing large was allocated)."""
    before, start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, time.perf_counter()
    with pytest.raises(OptionError) as raised:
        action()
    assert time.perf_counter() - start < 1.0
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 100 * 1024
    assert '\n' not in str(raised.value)
    return str(raised.value)


def crafted(name: str) -> dict:
    """The checkpoint of each case (small files; the comments say what the code before refused nothing of)."""
    tiny_state = MFGHMoEArch(**tiny(upscale=2, expert_groups=SMALL_GROUPS)).state_dict()
    block = 'layers.0.residual_group.blocks.0.'
    return {
        # 1.7 KB: built 200000 RRDBs (69 s, 2.7 GB) before failing
        'rrdbnet': {'params': {'x': torch.zeros(1)},
                    'network_g': {'type': 'RRDBNet', 'num_in_ch': 3, 'num_out_ch': 3, 'num_block': 200000}},
        # ran torch.load('/etc/passwd') / downloaded VGG19
        'spynet': {'params': {'x': torch.zeros(1)}, 'network_g': {'type': 'SpyNet', 'load_path': '/etc/passwd'}},
        'vgg': {'params': {'x': torch.zeros(1)}, 'network_g': {'type': 'VGGFeatureExtractor'}},
        # a few hundred pickle bytes showing 3e8 values: the NaN check asked for them all
        'broadcast': {'params': {'conv_first.weight': torch.zeros(1).expand(300_000_000)}},
        # a handful of small tensors describing embed_dim 30000: the network was built
        'embed_dim': {'params': {'conv_first.weight': torch.zeros(30000, 3, 3, 3),
                                 'relative_position_index_SA': torch.zeros(256, 1),
                                 'relative_position_index_OCA': torch.zeros(1, 576),
                                 block + 'attn.relative_position_bias_table': torch.zeros(1, 6),
                                 block + 'norm1.weight': torch.zeros(1),
                                 block + 'conv_block.cab.0.weight': torch.zeros(10000),
                                 block + 'conv_block.cab.3.attention.1.weight': torch.zeros(1000),
                                 block + 'mlp.fc1.weight': torch.zeros(60000),
                                 'upsample.0.experts.0.weight': torch.zeros(256, 64, 1, 1)}},
        # loaded silently: integers into float weights, a negative relative-position index
        'int64': {'params': {**tiny_state, 'conv_first.weight': tiny_state['conv_first.weight'].long()}},
        'negative_index': {'params': {**tiny_state, 'relative_position_index_SA':
                                      tiny_state['relative_position_index_SA'].clone().fill_(-3)}},
    }[name]


CRAFTED = {
    'rrdbnet': r'^--weights .*rrdbnet.pth: its stored network_g: RRDBNet with num_block: 200000 has 200000 blocks in '
               r'all, more than 1000 \(a fixed bound; the paper\'s network has 42\)$',
    'spynet': r"^--weights .*spynet.pth: its stored network_g: the type 'SpyNet' is not one this project builds from a "
              r"file; expected one of MFGHMoEArch, MFGHMOE, EDSR, RCAN, RRDBNet, SwinIR$",
    'vgg': r"^--weights .*vgg.pth: its stored network_g: the type 'VGGFeatureExtractor' is not one this project",
    'broadcast': r'^--weights .*broadcast.pth: conv_first.weight shows 300,000,000 values \[300000000\] but stores 1 '
                 r'\(a broadcast or overlapping view\); refused before its values are used$',
    'embed_dim': r'^--weights .*embed_dim.pth: the network it holds: MFGHMoEArch with embed_dim: 30000 needs about '
                 r'[\d.,]+ GiB \(.*\), more than the limit of 8 GiB; raise the limit with --max-memory GIB \(or the '
                 r'environment variable HMOE_MAX_MEMORY_GIB\)$',
    'int64': r'^--weights .*int64.pth: conv_first.weight is refused: a torch.int64 tensor \(integer values\) where the '
             r'network expects floating point values \(torch.float32\)$',
    'negative_index': r'^--weights .*negative_index.pth: relative_position_index_SA is refused: holds -3 at \[0, 0\], '
                      r'a negative index \(the network has \d+\); this buffer follows from the window sizes',
}


@pytest.mark.parametrize('name', sorted(CRAFTED))
def test_crafted_checkpoints_are_refused_in_one_line_before_anything_large_is_made(name: str, tmp_path: Path,
                                                                                  monkeypatch) -> None:
    import re
    monkeypatch.delenv('HMOE_MAX_MEMORY_GIB', raising=False)
    torch.save(crafted(name), tmp_path / f'{name}.pth')
    assert (tmp_path / f'{name}.pth').stat().st_size < 4 * 2 ** 20
    message = refused_quickly(lambda: load_network(tmp_path / f'{name}.pth', None, torch.device('cpu')))
    assert re.search(CRAFTED[name], message), message


def test_the_memory_limit_is_a_flag_of_infer_export_and_bench(tmp_path: Path, weights: Path, monkeypatch,
                                                              basicsr_log) -> None:
    from hmoe_arch.commands.cli import build_parser, main
    monkeypatch.delenv('HMOE_MAX_MEMORY_GIB', raising=False)
    options = network_options(None, TINY_ARGS + ['upscale=2'])
    with pytest.raises(OptionError, match=r'^network_g: MFGHMoEArch needs about 0.0\d+ GiB .* more than '
                                          r'the limit of 0.001 GiB; raise the limit with --max-memory GIB'):
        load_network(weights, options, torch.device('cpu'), max_memory=0.001)
    assert load_network(weights, options, torch.device('cpu')).upscale == 2  # default 8 GiB
    monkeypatch.setenv('HMOE_MAX_MEMORY_GIB', '0.001')
    with pytest.raises(OptionError, match='more than the limit of 0.001 GiB'):
        load_network(weights, options, torch.device('cpu'))
    assert load_network(weights, options, torch.device('cpu'), max_memory=1000).upscale == 2  # the flag wins
    parser = build_parser()
    commands = (['infer', '--weights', 'w', '--input', 'i', '--output', 'o'],
                ['export', '--weights', 'w', '--out', 'o.safetensors'], ['bench', 'x.yml'])
    for command in commands:
        assert parser.parse_args([*command, '--max-memory', '1000']).max_memory == 1000.0
        assert parser.parse_args(command).max_memory is None
    write_image(tmp_path / 'in.png', 8, 8, seed=0)
    code = main(['infer', '--weights', str(weights), '--input', str(tmp_path / 'in.png'), '--output',
                 str(tmp_path / 'out.png'), '--arch-args', *TINY_ARGS, 'upscale=2', '--max-memory', '0.001'])
    assert code == 2 and 'more than the limit of 0.001 GiB; raise the limit with --max-memory' in basicsr_log[-1]
    with pytest.raises(SystemExit) as exit_status:
        main(['export', '--weights', str(weights), '--out', str(tmp_path / 'w.safetensors'), '--max-memory', '0'])
    assert exit_status.value.code == 2
