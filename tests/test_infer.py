"""``basicsr infer``: every baseline architecture, files and folders, bad inputs (loading the network:
test_loading.py)."""
from pathlib import Path

import cv2
import pytest
import torch

from hmoe_arch import MFGHMoEArch
from hmoe_arch.commands.cli import main
from hmoe_arch.commands.infer import infer
from hmoe_arch.errors import OptionError
from hmoe_arch.loading import network_options

from util import SMALL_GROUPS, tiny, write_image

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
    with pytest.raises(OptionError, match='--tile must be >= 1 and 0 <= --tile-pad < --tile, got 8 and 32'):
        infer(weights, tmp_path / 'gray.png', tmp_path / 'o.png', tile=8, tile_pad=32, progress=False)


# ------------------------------------------------------------------------------------------------------
# no silent wrong output
OPTIONS = Path(__file__).resolve().parents[1] / 'options'
BASELINES = {  # small versions of the shipped baseline networks
    'edsr': ['num_feat=16', 'num_block=1'],
    'rcan': ['num_feat=16', 'num_group=1', 'num_block=1', 'squeeze_factor=4'],
    'rrdbnet': ['num_feat=16', 'num_block=1', 'num_grow_ch=8'],
    'swinir': ['embed_dim=12', 'depths=[1]', 'num_heads=[2]', 'window_size=4', 'img_size=16'],
    'hat': ['embed_dim=12', 'depths=[1]', 'num_heads=[2]', 'window_size=4', 'img_size=16', 'squeeze_factor=4'],
}


@pytest.mark.parametrize('arch', sorted(BASELINES))
def test_every_baseline_architecture_gives_its_full_scale_output(arch: str, tmp_path: Path) -> None:
    from basicsr.archs import build_network
    from basicsr.utils import img2tensor, tensor2img
    option = OPTIONS / 'baselines' / f'train_ucm_x4_{arch}.yml'
    net = build_network(network_options(option, BASELINES[arch])).eval()
    torch.save({'params_ema': net.state_dict()}, tmp_path / 'w.pth')
    write_image(tmp_path / 'scene.png', 16, 18, seed=1)  # 18: not a multiple of the window (padded)
    infer(tmp_path / 'w.pth', tmp_path / 'scene.png', tmp_path / 'sr.png', opt_path=option, arch_args=BASELINES[arch],
          progress=False)
    sr = cv2.imread(str(tmp_path / 'sr.png'))
    assert sr.shape == (64, 72, 3)
    lq = img2tensor(cv2.imread(str(tmp_path / 'scene.png')).astype('float32') / 255, bgr2rgb=True).unsqueeze(0)
    with torch.no_grad():
        expected = tensor2img(net(lq)) if arch not in ('swinir', 'hat') else None
    if expected is not None:  # whole-image forward (the image is smaller than one tile)
        assert abs(sr.astype(int) - expected.astype(int)).max() <= 1


def test_option_file_scale_is_checked_against_the_network(tmp_path: Path) -> None:
    from basicsr.archs import build_network
    option = OPTIONS / 'baselines' / 'train_ucm_x4_edsr.yml'
    net = build_network(network_options(option, BASELINES['edsr']))
    torch.save({'params': net.state_dict()}, tmp_path / 'w.pth')
    wrong = tmp_path / 'x2.yml'
    wrong.write_text(option.read_text().replace('scale: 4', 'scale: 2', 1))
    write_image(tmp_path / 'scene.png', 16, 16, seed=1)
    with pytest.raises(OptionError, match=r"the network upscales x4, but the option file's scale says x2"):
        infer(tmp_path / 'w.pth', tmp_path / 'scene.png', tmp_path / 'sr.png', opt_path=wrong,
              arch_args=BASELINES['edsr'], progress=False)
    assert not (tmp_path / 'sr.png').exists()


def test_non_finite_weights_are_refused(tmp_path: Path, weights: Path) -> None:
    state = torch.load(weights, weights_only=True)
    state['params_ema']['conv_last.weight'][0, 0, 0, 0] = float('nan')
    torch.save(state, tmp_path / 'nan.pth')
    write_image(tmp_path / 'scene.png', 16, 16, seed=1)
    with pytest.raises(OptionError, match=r'nan.pth: 1 tensor\(s\) hold NaN or Inf values, e.g. \[\'conv_last.weight'):
        infer(tmp_path / 'nan.pth', tmp_path / 'scene.png', tmp_path / 'sr.png', arch_args=TINY_ARGS + ['upscale=2'],
              progress=False)
    assert not (tmp_path / 'sr.png').exists()


def test_a_file_that_is_not_a_checkpoint_is_named_without_unsafe_advice(tmp_path: Path) -> None:
    (tmp_path / 'w.pth').write_text('not a checkpoint')
    write_image(tmp_path / 'scene.png', 16, 16, seed=1)
    with pytest.raises(OptionError) as error:
        infer(tmp_path / 'w.pth', tmp_path / 'scene.png', tmp_path / 'sr.png', progress=False)
    assert str(error.value) == (f'--weights {tmp_path / "w.pth"}: not a PyTorch checkpoint of tensors (torch.load with '
                                'weights_only=True cannot read it; files that need arbitrary unpickling are refused)')


@pytest.mark.parametrize('orientation', range(1, 9))
def test_exif_orientation_is_applied_like_a_viewer(orientation: int, tmp_path: Path) -> None:
    import numpy as np
    from PIL import Image, ImageOps

    from hmoe_arch.commands.infer import read_rgb
    rng = np.random.default_rng(orientation)
    stored = Image.fromarray(rng.integers(0, 255, (6, 9, 3), dtype=np.uint8))
    exif = Image.Exif()
    exif[0x0112] = orientation
    stored.save(tmp_path / 'photo.png', exif=exif)
    upright = np.asarray(ImageOps.exif_transpose(Image.open(tmp_path / 'photo.png')))
    np.testing.assert_array_equal((read_rgb(tmp_path / 'photo.png') * 255).round().astype(np.uint8), upright)


def test_unlisted_output_suffix_is_refused_not_made_a_folder(tmp_path: Path, weights: Path) -> None:
    write_image(tmp_path / 'scene.png', 16, 16, seed=1)
    with pytest.raises(OptionError, match=r'--output .*x.webp: .webp is not a format this command writes'):
        infer(weights, tmp_path / 'scene.png', tmp_path / 'x.webp', arch_args=TINY_ARGS + ['upscale=2'],
              progress=False)
    assert not (tmp_path / 'x.webp').exists()


def test_the_input_is_never_overwritten_and_own_outputs_are_not_inputs(tmp_path: Path, weights: Path) -> None:
    args = dict(arch_args=TINY_ARGS + ['upscale=2'], progress=False)
    write_image(tmp_path / 'a.png', 16, 16, seed=1)
    before = (tmp_path / 'a.png').read_bytes()
    with pytest.raises(OptionError, match=r'would overwrite the input .*a.png'):
        infer(weights, tmp_path / 'a.png', tmp_path / 'a.png', **args)
    assert (tmp_path / 'a.png').read_bytes() == before
    assert [p.name for p in infer(weights, tmp_path, tmp_path, **args)] == ['a_SR.png']
    assert [p.name for p in infer(weights, tmp_path, tmp_path, **args)] == ['a_SR.png']
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix == '.png') == ['a.png', 'a_SR.png']
    (tmp_path / 'a.png').unlink()
    with pytest.raises(OptionError, match=r'no images .* in this folder \(1 earlier outputs of this command'):
        infer(weights, tmp_path, tmp_path, **args)


def test_a_failed_write_leaves_no_complete_looking_file(tmp_path: Path, weights: Path, monkeypatch) -> None:
    write_image(tmp_path / 'a.png', 16, 16, seed=1)

    def half_write(path, img, *args):
        Path(path).write_bytes(b'\x89PNG half')
        raise KeyboardInterrupt

    monkeypatch.setattr(cv2, 'imwrite', half_write)
    with pytest.raises(KeyboardInterrupt):
        infer(weights, tmp_path / 'a.png', tmp_path / 'out' / 'a_SR.png', arch_args=TINY_ARGS + ['upscale=2'],
              progress=False)
    assert list((tmp_path / 'out').iterdir()) == []


def test_one_bad_file_in_a_folder_does_not_stop_the_others(tmp_path: Path, weights: Path, basicsr_log) -> None:
    import os
    folder = tmp_path / 'in'
    for name in ('a.png', 'c.png'):
        write_image(folder / name, 16, 16, seed=1)
    (folder / 'b.tif').write_bytes(b'')
    (folder / 'bad.tif').write_bytes(b'II*\0garbage')
    (folder / 'dir.png').mkdir()
    os.symlink(tmp_path / 'gone.png', folder / 'link.png')
    code = main(['infer', '--weights', str(weights), '--input', str(folder), '--output', str(tmp_path / 'out'),
                 '--arch-args', *TINY_ARGS, 'upscale=2', '--no-progress'])
    assert code == 2
    assert sorted(p.name for p in (tmp_path / 'out').iterdir()) == ['a_SR.png', 'c_SR.png']
    last = basicsr_log[-1]
    assert '4 of 6 input(s) not super-resolved' in last
    for expected in ('b.tif: empty file (0 bytes)', 'bad.tif: cannot be decoded as an image',
                     'dir.png: a folder, not an image file', 'link.png: a link to nothing (dangling symlink)'):
        assert expected in last, expected


def test_output_locations_that_cannot_be_written(tmp_path: Path, weights: Path, monkeypatch) -> None:
    args = dict(arch_args=TINY_ARGS + ['upscale=2'], progress=False)
    write_image(tmp_path / 'a.png', 16, 16, seed=1)
    (tmp_path / 'file').write_text('x')
    with pytest.raises(OptionError, match=r'--output .*file/out: .*file is a file, so nothing can be written under it'):
        infer(weights, tmp_path / 'a.png', tmp_path / 'file' / 'out', **args)

    def refuse(self, *a, **k):
        raise PermissionError(13, 'Permission denied')

    monkeypatch.setattr(Path, 'mkdir', refuse)
    with pytest.raises(OptionError, match=r'--output .*ro: cannot write there \(Permission denied\)'):
        infer(weights, tmp_path / 'a.png', tmp_path / 'ro' / 'a.png', **args)


def test_plain_tiff_inputs_raise_no_georeferencing_warning(tmp_path: Path, weights: Path) -> None:
    import warnings
    write_image(tmp_path / 'a.tif', 16, 16, seed=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        infer(weights, tmp_path / 'a.tif', tmp_path / 'out', arch_args=TINY_ARGS + ['upscale=2'], progress=False)
    assert [w for w in caught if 'Georeferenc' in type(w.message).__name__] == []
    assert (tmp_path / 'out' / 'a_SR.png').is_file()
