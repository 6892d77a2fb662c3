"""The configuration a state_dict describes: round trips over many configurations, the authors' and HAT's
checkpoints, and the options this project stores in its checkpoints."""
import pytest
import torch

from hmoe_arch import MFGHMoEArch
from hmoe_arch.archs.config import HAT_RGB_MEAN as HAT_RGB_MEAN_IN_LIBRARY
from hmoe_arch.archs.config import config_from_state_dict, network_config
from hmoe_arch.errors import ConfigError

from util import HAT_RGB_MEAN, load_reference, tiny

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
