"""``basicsr infer``: weights of every origin, feathered tiling, files and folders, bad inputs."""
from pathlib import Path

import cv2
import pytest
import torch

from conftest import HAT_RGB_MEAN, SMALL_GROUPS, load_reference, tiny, write_image
from hmoe_arch import MFGHMoEArch
from hmoe_arch.cli import main
from hmoe_arch.infer import checkpoint_scale, infer, load_network, network_options
from hmoe_arch.options import OptionError
from hmoe_arch.tiling import blended_tiled_forward

TINY_ARGS = ['embed_dim=24', 'depths=[1, 1]', 'num_heads=[2, 2]', 'window_size=4', 'img_size=16',
             'squeeze_factor=6', 'expert_groups=[{kernel_size: 1, num_experts: 2}, {kernel_size: 3, num_experts: 2}]']


@pytest.fixture
def weights(tmp_path: Path) -> Path:
    net = MFGHMoEArch(**tiny(upscale=2, expert_groups=SMALL_GROUPS))
    path = tmp_path / 'net_g_latest.pth'
    torch.save({'params': net.state_dict(), 'params_ema': net.state_dict()}, path)
    return path


def test_folder_mode_with_expert_maps(tmp_path: Path, weights: Path) -> None:
    for i, size in enumerate([(20, 24), (13, 17)]):
        write_image(tmp_path / 'in' / f'scene{i}.png', *size, seed=i)
    (tmp_path / 'in' / 'notes.txt').write_text('not an image')
    written = infer(weights, tmp_path / 'in', tmp_path / 'out', arch_args=TINY_ARGS + ['upscale=2'], tile=8,
                    tile_pad=2, expert_map=True, progress=False)
    assert [p.name for p in written] == ['scene0_SR.png', 'scene1_SR.png']
    assert cv2.imread(str(written[1])).shape == (26, 34, 3)
    assert cv2.imread(str(tmp_path / 'out' / 'scene0_SR_experts.png')).shape[0] >= 40


def test_single_file_through_the_command_line(tmp_path: Path, weights: Path) -> None:
    write_image(tmp_path / 'scene.png', 16, 16, seed=3)
    code = main(['infer', '--weights', str(weights), '--input', str(tmp_path / 'scene.png'), '--output',
                 str(tmp_path / 'scene_x2.png'), '--arch-args', *TINY_ARGS, 'upscale=2', '--tile', '8',
                 '--tile-pad', '2', '--no-progress'])
    assert code == 0 and cv2.imread(str(tmp_path / 'scene_x2.png')).shape == (32, 32, 3)


@pytest.mark.parametrize('name', ['hat_x4', 'official_mfghmoe_x4'])
def test_hat_and_authors_weights(tmp_path: Path, name: str) -> None:
    ref = load_reference(f'{name}.pt')
    path = tmp_path / f'{name}.pth'
    torch.save({'params_ema': ref['state_dict']}, path)
    extra = {'moe': False, 'mfa': False, 'rgb_mean': HAT_RGB_MEAN} if name.startswith('hat') else {}
    args = [f'{k}={v}' for k, v in {**ref['config'], **extra}.items()]
    net = load_network(path, network_options(None, args), torch.device('cpu'))
    assert checkpoint_scale(ref['state_dict']) == 4
    with torch.no_grad():
        out = blended_tiled_forward(net, ref['input'][:1], 4, 8, tile=64, overlap=8)
    assert (out - ref['output'][:1]).abs().max() <= 1e-4


def test_bad_inputs_are_named(tmp_path: Path, weights: Path) -> None:
    with pytest.raises(OptionError, match='--input .*missing.png: no such file or folder'):
        infer(weights, tmp_path / 'missing.png', tmp_path / 'o.png', arch_args=TINY_ARGS, progress=False)
    (tmp_path / 'empty').mkdir()
    with pytest.raises(OptionError, match='no images'):
        infer(weights, tmp_path / 'empty', tmp_path / 'o', arch_args=TINY_ARGS, progress=False)
    write_image(tmp_path / 'gray.png', 8, 8, seed=0, channels=1)
    with pytest.raises(OptionError, match='gray.png: grayscale image; expected an 8-bit RGB image'):
        infer(weights, tmp_path / 'gray.png', tmp_path / 'o.png', arch_args=TINY_ARGS + ['upscale=2'],
              progress=False)
    with pytest.raises(OptionError, match=r'trained for x2, but the network is x4 \(use --arch-args upscale=2\)'):
        load_network(weights, network_options(None, TINY_ARGS + ['upscale=4']), torch.device('cpu'))
    with pytest.raises(OptionError, match='no such file'):
        load_network(tmp_path / 'nope.pth', network_options(None, TINY_ARGS), torch.device('cpu'))
    with pytest.raises(OptionError, match='--tile must be >= 1 and 0 <= --tile-pad < --tile, got 8 and 32'):
        infer(weights, tmp_path / 'gray.png', tmp_path / 'o.png', tile=8, tile_pad=32, progress=False)
    with pytest.raises(OptionError, match='does not fit the network'):
        load_network(weights, network_options(None, TINY_ARGS + ['upscale=2', 'embed_dim=12']),
                     torch.device('cpu'))
