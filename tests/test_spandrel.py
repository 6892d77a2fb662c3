"""spandrel loads MFG-HMoE checkpoints (ours and the authors') once hmoe_arch.spandrel is imported; HAT stays HAT."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hmoe_arch import MFGHMoEArch
from hmoe_arch.errors import CheckpointError, ConfigError

from util import HAT_RGB_MEAN, SMALL_GROUPS, load_reference, tiny

spandrel = pytest.importorskip('spandrel', reason='spandrel is not installed (pip install -e .[spandrel])')
import hmoe_arch.spandrel  # noqa: E402  (registers the architecture)

VARIANTS = [
    tiny(upscale=2),
    tiny(upscale=4, routing='single', mfa=False, window_size=8, img_size=32),
    tiny(upscale=3, expert_groups=[{'kernel_size': 1, 'num_experts': 2}, {'kernel_size': 3, 'num_experts': 1},
                                   {'kernel_size': 5, 'num_experts': 2}]),
]


@pytest.mark.parametrize('config', VARIANTS, ids=range(len(VARIANTS)))
def test_our_checkpoints_load_as_mfghmoe_with_equal_outputs(config: dict, tmp_path: Path) -> None:
    net = MFGHMoEArch(**config).eval()
    torch.save({'params': net.state_dict(), 'params_ema': net.state_dict(), 'network_g': config}, tmp_path / 'w.pth')
    model = spandrel.ModelLoader().load_from_file(tmp_path / 'w.pth')
    assert isinstance(model, spandrel.ImageModelDescriptor) and model.architecture.id == 'MFGHMoE'
    assert model.scale == config['upscale'] and model.size_requirements.multiple_of == config['window_size']
    assert (model.supports_half, model.supports_bfloat16) == (False, True)
    x = torch.rand(1, 3, 13, 18)  # not a multiple of the window: spandrel pads and crops
    with torch.no_grad():
        from hmoe_arch.tiling import padded_forward
        expected = padded_forward(net, x, config['upscale'], config['window_size']).clamp(0, 1)
        assert (model(x) - expected).abs().max() <= 1e-5


@pytest.mark.parametrize('name', ['tiny_authors_x2', 'official_mfghmoe_x4'])
def test_the_authors_checkpoint_loads_and_reproduces_their_output(tmp_path: Path, name: str) -> None:
    ref = load_reference(name)
    torch.save({'params': ref['state_dict']}, tmp_path / 'authors.pth')
    model = spandrel.ModelLoader().load_from_file(tmp_path / 'authors.pth')
    assert model.architecture.id == 'MFGHMoE' and model.scale == ref['config']['upscale']
    with torch.no_grad():
        assert (model(ref['input']) - ref['output'].clamp(0, 1)).abs().max() <= 1e-5


def test_hat_checkpoints_keep_loading_as_hat(tmp_path: Path) -> None:
    net = MFGHMoEArch(**tiny(moe=False, mfa=False, rgb_mean=HAT_RGB_MEAN, upscale=2))
    torch.save({'params_ema': net.state_dict()}, tmp_path / 'hat.pth')
    assert spandrel.ModelLoader().load_from_file(tmp_path / 'hat.pth').architecture.id == 'HAT'


def test_registration_is_idempotent_and_before_hat() -> None:
    assert hmoe_arch.spandrel.register() is False
    order = [support.architecture.id for support in spandrel.MAIN_REGISTRY.architectures('detection')]
    assert order.index('MFGHMoE') < order.index('HAT')


@pytest.mark.slow
def test_without_spandrel_the_import_names_the_extra() -> None:
    code = ('import sys; sys.modules["spandrel"] = None\n'
            'try:\n    import hmoe_arch.spandrel\nexcept ImportError as error:\n    print(error)')
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=300).stdout.strip()
    assert out == 'hmoe_arch.spandrel needs spandrel: pip install -e .[spandrel]'


def test_bfloat16_as_advertised(tmp_path: Path) -> None:
    config = tiny(expert_groups=[{'kernel_size': 1, 'num_experts': 2}, {'kernel_size': 3, 'num_experts': 2}])
    torch.manual_seed(0)
    net = MFGHMoEArch(**config).eval()
    torch.save({'params': net.state_dict(), 'network_g': config}, tmp_path / 'w.pth')
    model = spandrel.ModelLoader().load_from_file(tmp_path / 'w.pth')
    assert model.supports_bfloat16
    x = torch.rand(1, 3, 16, 16)
    with torch.no_grad():
        expected = model(x)
        out = model.to(torch.bfloat16)(x.bfloat16())
    assert out.dtype == torch.bfloat16 and out.shape == expected.shape
    assert (out.float() - expected).abs().mean() < 0.01


def detected_state(**replaced: torch.Tensor) -> dict:
    """A tiny MFG-HMoE state_dict (every key spandrel detects it by) with ``replaced`` tensors."""
    return {**MFGHMoEArch(**tiny(upscale=2, expert_groups=SMALL_GROUPS)).state_dict(), **replaced}


def test_a_state_dict_describing_a_huge_network_is_refused_before_it_is_built(monkeypatch) -> None:
    monkeypatch.delenv('HMOE_MAX_MEMORY_GIB', raising=False)
    state = detected_state(**{'conv_first.weight': torch.zeros(30000, 3, 3, 3),
                              'layers.0.residual_group.blocks.0.conv_block.cab.0.weight': torch.zeros(10000),
                              'layers.0.residual_group.blocks.0.conv_block.cab.3.attention.1.weight': torch.zeros(5000),
                              'layers.0.residual_group.blocks.0.mlp.fc1.weight': torch.zeros(60000)})
    with pytest.raises(ConfigError, match=r'^MFGHMoEArch with embed_dim: 30000 needs about [\d.,]+ GiB \(.*\), more '
                                          r'than the limit of 8 GiB; raise the limit with the environment variable '
                                          r'HMOE_MAX_MEMORY_GIB=GIB$'):
        spandrel.ModelLoader().load_from_state_dict(state)


def test_the_spandrel_limit_is_the_environment_variable(monkeypatch) -> None:
    monkeypatch.setenv('HMOE_MAX_MEMORY_GIB', '0.001')
    with pytest.raises(ConfigError, match=r'more than the limit of 0.001 GiB; raise the limit with the environment '
                                          r'variable HMOE_MAX_MEMORY_GIB=GIB$'):
        spandrel.ModelLoader().load_from_state_dict(detected_state())
    monkeypatch.setenv('HMOE_MAX_MEMORY_GIB', '1')
    assert spandrel.ModelLoader().load_from_state_dict(detected_state()).scale == 2


def test_crafted_tensors_are_refused_naming_the_key() -> None:
    state = detected_state()
    for key, value, message in (
            ('conv_first.weight', state['conv_first.weight'].int(), r'conv_first.weight is refused: a torch.int32 '
                                                                     r'tensor \(integer values\)'),
            ('relative_position_index_SA', state['relative_position_index_SA'] - 1000,
             r'relative_position_index_SA is refused: holds -\d+ at \[0, 0\], a negative index'),
            ('conv_last.bias', torch.zeros(1).expand(3), r'conv_last.bias shows 3 values \[3\] but stores 1')):
        with pytest.raises(CheckpointError, match=rf'^spandrel state_dict: {message}'):
            spandrel.ModelLoader().load_from_state_dict({**state, key: value})
