"""The configuration a state_dict describes: round trips over many configurations, the authors' and HAT's
checkpoints, and the options this project stores in its checkpoints."""
import re
import resource
import time
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
import yaml

from hmoe_arch import MFGHMoEArch
from hmoe_arch.archs.config import (
    DEFAULT_MAX_MEMORY_GIB,
    ESTIMATE_LR_SIDE,
    GIB,
    MAX_MEMORY_VARIABLE,
    RAISE_WITH_OPTION,
    RECONSTRUCTION_WIDTH,
    check_network,
    check_network_size,
    config_from_state_dict,
    memory_limit_gib,
    network_config,
)
from hmoe_arch.archs.config import HAT_RGB_MEAN as HAT_RGB_MEAN_IN_LIBRARY
from hmoe_arch.errors import ConfigError

from util import HAT_RGB_MEAN, SMALL_GROUPS, load_reference, tiny

CONFIGS = [
    tiny(),
    tiny(embed_dim=30, depths=[2, 1, 1], num_heads=[3, 5, 6], window_size=8, img_size=32, squeeze_factor=5),
    tiny(compress_ratio=4, squeeze_factor=7, mlp_ratio=1.5, qkv_bias=False, overlap_ratio=1.0),
    tiny(upscale=3, routing='single', expert_groups=[{'kernel_size': 1, 'num_experts': 2},
                                                     {'kernel_size': 5, 'num_experts': 3}]),
    tiny(upscale=2, expert_groups=[{'kernel_size': 3, 'num_experts': 1}, {'kernel_size': 1, 'num_experts': 4},
                                   {'kernel_size': 3, 'num_experts': 2}], mfa=False),
    tiny(ape=True, patch_norm=False, resi_connection='identity', in_chans=1),
    tiny(moe=False, mfa=False, rgb_mean=HAT_RGB_MEAN, upscale=8),
    tiny(moe=False, mfa=False, rgb_mean=HAT_RGB_MEAN, upscale=3, embed_dim=18, num_heads=[3, 6]),
]


@pytest.mark.parametrize('config', CONFIGS, ids=range(len(CONFIGS)))
def test_round_trip_rebuilds_the_same_network(config: dict) -> None:
    net = MFGHMoEArch(**config).eval()
    inferred = config_from_state_dict(net.state_dict())
    for key in ('embed_dim', 'depths', 'num_heads', 'window_size', 'moe', 'mfa', 'in_chans'):
        assert inferred[key] == config.get(key, MFGHMoEArch.__init__.__kwdefaults__[key]), key
    if not config.get('ape'):
        inferred['img_size'] = config['img_size']  # only ape records it; it sets where shifts are disabled
    if config.get('moe', True):
        inferred['rgb_mean'] = config.get('rgb_mean')
    rebuilt = MFGHMoEArch(**inferred).eval()
    rebuilt.load_state_dict(net.state_dict(), strict=True)
    x = torch.rand(1, config.get('in_chans', 3), 16, 16 if config.get('ape') else 24)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), net(x), rtol=0, atol=0)


@pytest.mark.parametrize('name', ['tiny_authors_x2', 'tiny_hat_x2', 'official_mfghmoe_x4', 'official_mfghmoe_x2',
                                  'hat_x4'])
def test_foreign_checkpoints_reproduce_their_reference_outputs(name: str) -> None:
    ref = load_reference(name)
    config = config_from_state_dict(ref['state_dict'])
    net = MFGHMoEArch(**config).eval()
    net.load_pretrained(ref['state_dict'], strict=True)
    with torch.no_grad():
        assert (net(ref['input']) - ref['output']).abs().max() <= 1e-4
    assert config['upscale'] == ref['config']['upscale'] and config['squeeze_factor'] == ref['config']['squeeze_factor']


def test_stored_options_supply_what_tensors_do_not_record() -> None:
    options = tiny(top_k=2, rgb_mean=[0.5, 0.4, 0.3], img_range=255.0, drop_path_rate=0.0, attention='plain')
    net = MFGHMoEArch(**options)
    config = network_config({'params': net.state_dict(), 'network_g': {'type': 'MFGHMoEArch', **options}},
                            net.state_dict())
    assert (config['top_k'], config['rgb_mean'], config['img_range'], config['attention']) == (
        2, [0.5, 0.4, 0.3], 255.0, 'plain')
    foreign = network_config({'params': net.state_dict()}, net.state_dict())
    assert (foreign['top_k'], foreign['rgb_mean'], foreign['img_range']) == (1, None, 1.0)
    edsr = {'type': 'EDSR', 'num_feat': 16, 'num_block': 1, 'upscale': 4}
    assert network_config({'params': {}, 'network_g': edsr}, {}) == edsr


def test_other_state_dicts_are_named() -> None:
    with pytest.raises(ConfigError, match='no tensor conv_first.weight'):
        config_from_state_dict({'body.0.weight': torch.zeros(1)})
    state = MFGHMoEArch(**tiny()).state_dict()
    state['upsample.0.experts.0.weight'] = torch.zeros(5, 64, 1, 1)
    with pytest.raises(ConfigError, match=r'upsample.0.experts.0.weight has the shape \[5, 64, 1, 1\]'):
        config_from_state_dict(state)


def test_hat_state_dicts_get_hats_rgb_mean() -> None:
    assert list(HAT_RGB_MEAN_IN_LIBRARY) == HAT_RGB_MEAN  # the library's constant is HAT's published mean
    config = config_from_state_dict(MFGHMoEArch(**tiny(moe=False, mfa=False, upscale=2)).state_dict())
    assert config['rgb_mean'] == HAT_RGB_MEAN and config['img_range'] == 1.0
    gray = config_from_state_dict(MFGHMoEArch(**tiny(moe=False, mfa=False, upscale=2, in_chans=1)).state_dict())
    assert gray['rgb_mean'] is None  # HAT's mean is for RGB


# ------------------------------------------------------------------------------------------------------
# what a file may make this package build, and how large
SIZED = [
    {'type': 'MFGHMoEArch'},  # the paper's network
    {'type': 'MFGHMoEArch', **tiny()},
    {'type': 'MFGHMoEArch', **CONFIGS[1]},
    {'type': 'MFGHMoEArch', **CONFIGS[2]},
    {'type': 'MFGHMoEArch', **tiny(upscale=3, routing='single', balance='bias', routing_norm='center',
                                   expert_groups=[{'kernel_size': 1, 'num_experts': 2},
                                                  {'kernel_size': 5, 'num_experts': 3}])},
    {'type': 'MFGHMoEArch', **tiny(upscale=2, balance='bias', mfa=False, top_k=2, expert_groups=SMALL_GROUPS)},
    {'type': 'MFGHMoEArch', **CONFIGS[5]},
    {'type': 'MFGHMOE', **CONFIGS[6]},
    {'type': 'EDSR', 'num_in_ch': 3, 'num_out_ch': 3, 'num_feat': 16, 'num_block': 2, 'upscale': 4},
    {'type': 'EDSR', 'num_in_ch': 3, 'num_out_ch': 3, 'num_feat': 16, 'num_block': 0, 'upscale': 3},
    {'type': 'RCAN', 'num_in_ch': 3, 'num_out_ch': 3, 'num_feat': 16, 'num_group': 2, 'num_block': 2,
     'squeeze_factor': 4, 'upscale': 2},
    {'type': 'RRDBNet', 'num_in_ch': 3, 'num_out_ch': 3, 'num_feat': 16, 'num_block': 2, 'num_grow_ch': 8, 'scale': 4},
    {'type': 'RRDBNet', 'num_in_ch': 1, 'num_out_ch': 3, 'num_feat': 16, 'num_block': 1, 'num_grow_ch': 8, 'scale': 1},
    {'type': 'SwinIR', 'embed_dim': 12, 'depths': [2, 1], 'num_heads': [2, 3], 'window_size': 4, 'img_size': 16,
     'upsampler': 'pixelshuffle', 'upscale': 4},
    {'type': 'SwinIR', 'embed_dim': 12, 'depths': [2], 'num_heads': [2], 'window_size': 8, 'img_size': 8, 'ape': True,
     'upsampler': 'pixelshuffledirect', 'upscale': 3, 'resi_connection': '3conv'},
    {'type': 'SwinIR', 'embed_dim': 12, 'depths': [3], 'num_heads': [2], 'window_size': 4, 'img_size': 12,
     'upsampler': 'nearest+conv', 'upscale': 4, 'qkv_bias': False, 'patch_norm': False},
]


@pytest.mark.parametrize('network', SIZED, ids=lambda n: n['type'])
def test_parameters_and_buffers_are_counted_exactly_from_the_arguments(network: dict) -> None:
    from basicsr.archs import build_network
    size = check_network(network)
    net = build_network(dict(network))
    assert size.parameters == sum(p.numel() for p in net.parameters())
    assert size.buffer_bytes == sum(b.numel() * b.element_size() for b in net.buffers())
    assert size.total_bytes == 4 * size.parameters + size.buffer_bytes + 4 * size.activation_values


@pytest.mark.parametrize('network', [SIZED[i] for i in (1, 2, 4, 5, 7, 8, 10, 11, 13, 15)], ids=lambda n: n['type'])
def test_the_activation_estimate_holds_every_layer_output_of_a_64x64_forward(network: dict) -> None:
    from basicsr.archs import build_network
    net = build_network(dict(network)).eval()
    largest = []
    for module in net.modules():
        module.register_forward_hook(lambda _m, _i, out: largest.append(out.numel()) if torch.is_tensor(out) else None)
    with torch.no_grad():
        channels = network.get('in_chans', network.get('num_in_ch', 3))
        output = net(torch.rand(1, channels, ESTIMATE_LR_SIDE, ESTIMATE_LR_SIDE))
    assert output.numel() + max(largest) <= check_network(network).activation_values


def huge_embed_dim_state() -> dict:
    """A handful of small tensors (about 3.6 MB) whose shapes describe an MFGHMoEArch with embed_dim 30000."""
    block = 'layers.0.residual_group.blocks.0.'
    return {'conv_first.weight': torch.zeros(30000, 3, 3, 3), 'relative_position_index_SA': torch.zeros(256, 1),
            'relative_position_index_OCA': torch.zeros(1, 576),
            block + 'attn.relative_position_bias_table': torch.zeros(1, 6), block + 'norm1.weight': torch.zeros(1),
            block + 'conv_block.cab.0.weight': torch.zeros(10000), block + 'conv_block.cab.3.attention.1.weight':
                torch.zeros(1000), block + 'mlp.fc1.weight': torch.zeros(60000),
            'upsample.0.experts.0.weight': torch.zeros(256, 64, 1, 1)}


def refused_quickly(action: Callable[[], Any], error: type) -> str:
    """The message of the ``error`` that ``action()`` raises, after checking that it is one line, came well under a
    second and raised this process's peak resident set by less than 100 MiB (nothing large was allocated)."""
    before, start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, time.perf_counter()
    with pytest.raises(error) as raised:
        action()
    assert time.perf_counter() - start < 1.0
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 100 * 1024
    assert '\n' not in str(raised.value)
    return str(raised.value)


def test_a_huge_configuration_read_from_small_tensors_is_refused_before_anything_is_built(monkeypatch) -> None:
    monkeypatch.delenv(MAX_MEMORY_VARIABLE, raising=False)
    state = huge_embed_dim_state()
    message = refused_quickly(lambda: config_from_state_dict(state), ConfigError)
    assert message.startswith('MFGHMoEArch with embed_dim: 30000 needs about ')
    assert message.endswith(f'more than the limit of 8 GiB; raise the limit with the environment variable '
                            f'{MAX_MEMORY_VARIABLE}=GIB')
    monkeypatch.setenv(MAX_MEMORY_VARIABLE, '1e9')  # raised: the configuration itself is returned, nothing built
    assert config_from_state_dict(state)['embed_dim'] == 30000


def test_a_stored_network_g_of_another_type_is_refused_before_it_is_read() -> None:
    for stored in ({'type': 'SpyNet', 'load_path': '/etc/passwd'}, {'type': 'VGGFeatureExtractor'},
                   {'type': ['MFGHMoEArch']}):
        with pytest.raises(ConfigError, match=r"^its stored network_g: the type .* is not one this project builds "
                                              r"from a file; expected one of MFGHMoEArch, MFGHMOE, EDSR, RCAN, "
                                              r"RRDBNet, SwinIR$"):
            network_config({'params': {}, 'network_g': stored}, {})


@pytest.mark.parametrize('network, message', [
    ({'type': 'RRDBNet', 'num_in_ch': 3, 'num_out_ch': 3, 'num_block': 200000},
     r"^RRDBNet with num_block: 200000 has 200000 blocks in all, more than 1000 \(a fixed bound"),
    ({'type': 'MFGHMoEArch', 'depths': [1] * 600, 'num_heads': [6] * 600},
     r"^MFGHMoEArch with depths: \[1, 1, 1, \.\.\. \(600 entries\)\] has 1200 blocks in all"),
    ({'type': 'MFGHMoEArch', 'expert_groups': [{'kernel_size': 1, 'num_experts': 2000}]},
     r'^MFGHMoEArch: 2000 experts in all, more than 1024'),
    ({'type': 'SpyNet', 'load_path': '/etc/passwd'}, r"^network_g: the type 'SpyNet' is not one this project builds"),
    ({'type': 'EDSR', 'num_in_ch': 3, 'num_out_ch': 3, 'pretrained': 'https://example.invalid/edsr.pth'},
     r'^EDSR: the argument `pretrained` is refused: a network read from a file is built from plain values'),
    ({'type': 'RRDBNet', 'num_in_ch': 3, 'num_out_ch': 3, 'load_path': '/etc/passwd'},
     r'^RRDBNet: the argument `load_path` is refused'),
    ({'type': 'SwinIR', 'norm_layer': 'LayerNorm'}, r'^SwinIR: the argument `norm_layer` is refused'),
    ({'type': 'RCAN', 'num_in_ch': 3, 'num_out_ch': 3, 'num_blocks': 4},
     r"^RCAN: unknown argument\(s\) \['num_blocks'\]"),
    ({'type': 'EDSR', 'num_in_ch': 3, 'num_out_ch': 3, 'num_feat': 'wide'},
     r"^EDSR: `num_feat` must be an integer >= 1, got 'wide'$"),
    ({'type': 'SwinIR', 'img_size': 100000, 'window_size': 8}, r'^SwinIR with img_size: 100000 needs about 28,610 GiB'),
    ({'type': 'MFGHMoEArch', 'window_size': 256, 'img_size': 256}, r'^MFGHMoEArch with window_size: 256 needs about'),
])
def test_what_a_file_may_build_is_bounded_in_one_line_without_building(network: dict, message: str) -> None:
    assert re.search(message, refused_quickly(lambda: check_network(network), ConfigError))


def test_values_the_size_cannot_be_computed_from_are_left_to_the_constructor() -> None:
    from hmoe_arch.archs.mfghmoe_arch import NUM_FEAT
    assert RECONSTRUCTION_WIDTH == NUM_FEAT
    network = {'type': 'MFGHMoEArch', 'num_heads': [4, 'x'], 'depths': [2, 2]}
    assert check_network(network) is None
    with pytest.raises(ValueError, match=r"^MFGHMoEArch: `num_heads\[1\]` must be an integer >= 1, got 'x'$"):
        MFGHMoEArch(**{k: v for k, v in network.items() if k != 'type'})


def test_the_memory_limit_is_raisable_and_read_from_the_environment(monkeypatch) -> None:
    monkeypatch.delenv(MAX_MEMORY_VARIABLE, raising=False)
    large = {'type': 'MFGHMoEArch', 'embed_dim': 2400}  # about 14 GiB: a legitimate, if large, configuration
    with pytest.raises(ConfigError, match=r'^MFGHMoEArch with embed_dim: 2400 needs about 14.4 GiB \(3,582,552,817 '
                                          r'parameters: 13.3 GiB, .*more than the limit of 8 GiB; raise the limit '
                                          r'with --max-memory GIB'):
        check_network(large)
    assert check_network(large, max_memory=1000).parameters == 3_582_552_817
    with torch.device('meta'):  # the same count as the network, without memory for it
        assert sum(p.numel() for p in MFGHMoEArch(embed_dim=2400).parameters()) == 3_582_552_817
    assert memory_limit_gib() == DEFAULT_MAX_MEMORY_GIB == 8.0
    monkeypatch.setenv(MAX_MEMORY_VARIABLE, '20')
    assert memory_limit_gib() == 20.0 and check_network_size(large).total_bytes < 20 * GIB
    assert memory_limit_gib(1.5) == 1.5  # the flag or option key wins over the variable
    monkeypatch.setenv(MAX_MEMORY_VARIABLE, 'lots')
    with pytest.raises(ConfigError, match=rf"^{MAX_MEMORY_VARIABLE}='lots': expected a number of GiB > 0$"):
        memory_limit_gib()
    with pytest.raises(ConfigError, match=r'^max_memory: expected a number of GiB > 0, got -1$'):
        memory_limit_gib(-1)


def train_option_file(tmp_path: Path, **top_level) -> Path:
    opt = {'name': 'big', 'model_type': 'MFGHMoEModel', 'scale': 4, 'num_gpu': 0, 'manual_seed': 0,
           'datasets': {'train': {'name': 'T', 'type': 'RSPairedDataset', 'dataroot_gt': str(tmp_path / 'missing'),
                                  'gt_size': 64, 'batch_size_per_gpu': 1}},
           'network_g': {'type': 'MFGHMoEArch', 'embed_dim': 30000, 'upscale': 4}, 'path': {},
           'logger': {'print_freq': 1, 'save_checkpoint_freq': 1}, **top_level}
    path = tmp_path / 'big.yml'
    path.write_text(yaml.safe_dump(opt))
    return path


def test_an_option_file_asking_for_too_much_memory_is_refused_by_train(tmp_path: Path, monkeypatch,
                                                                       basicsr_log) -> None:
    from hmoe_arch.commands.cli import main
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(MAX_MEMORY_VARIABLE, raising=False)
    assert main(['train', '-opt', str(train_option_file(tmp_path))]) == 2
    assert basicsr_log[-1].startswith('basicsr train: network_g: MFGHMoEArch with embed_dim: 30000 needs about ')
    assert basicsr_log[-1].endswith(f'more than the limit of 8 GiB; {RAISE_WITH_OPTION}')
    assert not (tmp_path / 'experiments').exists()
    assert main(['train', '-opt', str(train_option_file(tmp_path, max_memory='lots'))]) == 2
    assert basicsr_log[-1] == ("basicsr train: max_memory: expected a number of GiB > 0 (the limit on a network's "
                               "estimated memory), got 'lots'")


def test_max_memory_in_an_option_file_raises_the_limit(tmp_path: Path, monkeypatch) -> None:
    from hmoe_arch.commands.pipeline import validate_options
    monkeypatch.delenv(MAX_MEMORY_VARIABLE, raising=False)
    opt = {'network_g': {'type': 'MFGHMoEArch', 'embed_dim': 2400, 'upscale': 4}, 'scale': 4, 'datasets': {}}
    with pytest.raises(ValueError, match=r'^network_g: MFGHMoEArch with embed_dim: 2400 needs about 14.4 GiB'):
        validate_options(opt)
    validate_options({**opt, 'max_memory': 1000})  # checked, then built on the meta device only
