"""Evaluation protocols: each against an independent computation of its definition (colour space, border,
averaging, 8-bit conversion), written here from the papers' formulas in numpy, on real and synthetic pairs,
bicubic outputs included."""
import math
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from basicsr.metrics import calculate_psnr, calculate_ssim
from basicsr.utils import tensor2img
from basicsr.utils.matlab_functions import imresize

from hmoe_arch.protocols import PROTOCOLS, Protocol, protocol

from util import SHARED_DATA


# ------------------------------------------------------------------------------------------------------
# the definitions, written out independently
def to_uint8(sr: torch.Tensor, rounding: bool) -> np.ndarray:
    """(3, H, W) RGB float in [0, 1] -> (H, W, 3) RGB uint8."""
    values = np.clip(sr.numpy().astype(np.float32), 0, 1).transpose(1, 2, 0) * np.float32(255)
    return (np.round(values) if rounding else np.floor(values)).astype(np.uint8)


def luma(rgb: np.ndarray) -> np.ndarray:
    """BT.601 studio-range Y of 8-bit RGB, with BasicSR's precision (0-1 values and the result held in float32)."""
    unit = rgb.astype(np.float32) / np.float32(255)
    y = unit[..., 0] * 65.481 + unit[..., 1] * 128.553 + unit[..., 2] * 24.966 + 16.0
    return (y / 255.0).astype(np.float32).astype(np.float64) * 255.0


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return math.inf if mse == 0 else 10 * math.log10(255.0 ** 2 / mse)


def gaussian_window(size: int = 11, sigma: float = 1.5) -> np.ndarray:
    x = np.arange(size) - size // 2
    g = np.exp(-x ** 2 / (2 * sigma ** 2))
    g /= g.sum()
    return np.outer(g, g)


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    """Wang et al. 2004 on one channel: 11x11 Gaussian (sigma 1.5) statistics over every full window."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    w = gaussian_window()
    windows = [np.lib.stride_tricks.sliding_window_view(x, w.shape) for x in (a, b, a * a, b * b, a * b)]
    mu_a, mu_b, aa, bb, ab = [np.einsum('ijkl,kl->ij', x, w) for x in windows]
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    var_a, var_b, cov = aa - mu_a ** 2, bb - mu_b ** 2, ab - mu_a * mu_b
    ratio = (2 * mu_a * mu_b + c1) * (2 * cov + c2) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))
    return float(np.mean(ratio))


DEFINITIONS = {
    # name: (colour, border is the scale, rounding)
    'basicsr-y': ('y', True, True),
    'ttst-y': ('y', False, False),
    'transenet-rgb': ('rgb', True, False),
    'haunet-rgb': ('rgb', True, True),
}


def independent(name: str, sr: torch.Tensor, gt_rgb: np.ndarray, scale: int):
    colour, cropped, rounding = DEFINITIONS[name]
    sr_rgb = to_uint8(sr, rounding)
    c = scale if cropped else 0
    if c:
        sr_rgb, gt_rgb = sr_rgb[c:-c, c:-c], gt_rgb[c:-c, c:-c]
    if colour == 'y':
        return psnr(luma(sr_rgb), luma(gt_rgb)), ssim(luma(sr_rgb), luma(gt_rgb))
    return (np.mean([psnr(sr_rgb[..., k], gt_rgb[..., k]) for k in range(3)]),
            np.mean([ssim(sr_rgb[..., k], gt_rgb[..., k]) for k in range(3)]))


# ------------------------------------------------------------------------------------------------------
# pairs
def real_pairs(scale: int, size: int = 256):
    """Real UCMerced GT (the top-left ``size`` x ``size``) and its bicubic SR (MATLAB imresize down and up), plus a
    noisy SR with values outside [0, 1], so rounding, truncation and clipping all matter."""
    images = sorted((SHARED_DATA / 'UCMerced_mini' / 'Images').glob('*/*.tif'))[::70]
    if not images:
        pytest.skip(f'real UCMerced subset not available under {SHARED_DATA}')
    for path in images:
        bgr = cv2.imread(str(path))[:size, :size]
        h, w = bgr.shape[0] // scale * scale, bgr.shape[1] // scale * scale
        gt_rgb = np.ascontiguousarray(bgr[:h, :w, ::-1])
        gt = torch.from_numpy(gt_rgb.transpose(2, 0, 1).copy()).float() / 255
        lr = imresize(gt, 1 / scale)
        yield path.stem + '_bicubic', imresize(lr, scale), gt_rgb
        noisy = gt + torch.randn(gt.shape, generator=torch.Generator().manual_seed(h)) * 0.05
        yield path.stem + '_noisy', noisy, gt_rgb


def synthetic_pairs(scale: int):
    generator = torch.Generator().manual_seed(scale)
    for k in range(2):
        gt = (torch.rand(3, 40, 48, generator=generator) * 255).round() / 255
        yield f'synthetic{k}', (gt + torch.randn(gt.shape, generator=generator) * 0.1), \
            (gt.numpy().transpose(1, 2, 0) * 255).round().astype(np.uint8)


@pytest.mark.parametrize('name', sorted(PROTOCOLS))
@pytest.mark.parametrize('scale', [2, 4])
def test_each_protocol_equals_its_definition(name: str, scale: int) -> None:
    p = protocol(name)
    pairs = list(synthetic_pairs(scale)) + list(real_pairs(scale, size=100))
    for label, sr, gt_rgb in pairs:
        got = p.measure(p.quantise(sr), np.ascontiguousarray(gt_rgb[..., ::-1]), scale)
        expected = independent(name, sr, gt_rgb, scale)
        assert got[0] == pytest.approx(expected[0], abs=1e-6), (label, 'psnr')
        assert got[1] == pytest.approx(expected[1], abs=1e-6), (label, 'ssim')


def test_the_protocols_really_differ() -> None:
    """On one bicubic pair every protocol gives a different PSNR (no two definitions collapsed into one)."""
    label, sr, gt_rgb = next(p for p in real_pairs(4) if p[0].endswith('_bicubic'))
    gt_bgr = np.ascontiguousarray(gt_rgb[..., ::-1])
    values = {name: p.measure(p.quantise(sr), gt_bgr, 4)[0] for name, p in PROTOCOLS.items()}
    assert len({round(v, 6) for v in values.values()}) == len(values), values


def test_basicsr_y_is_what_basicsr_validation_logs() -> None:
    p = protocol('basicsr-y')
    for _, sr, gt_rgb in synthetic_pairs(3):
        gt_bgr = np.ascontiguousarray(gt_rgb[..., ::-1])
        sr_img = tensor2img(sr.unsqueeze(0))
        assert np.array_equal(p.quantise(sr), sr_img)
        assert p.measure(sr_img, gt_bgr, 3) == (calculate_psnr(sr_img, gt_bgr, 3, test_y_channel=True),
                                                calculate_ssim(sr_img, gt_bgr, 3, test_y_channel=True))


def test_truncation_and_rounding() -> None:
    sr = torch.tensor([0.0, 0.4 / 255, 1.7 / 255, 254.6 / 255, 1.2, -0.3]).view(3, 1, 2)
    def channel_major(img: np.ndarray) -> list:
        return img[..., ::-1].transpose(2, 0, 1).ravel().tolist()

    assert channel_major(protocol('basicsr-y').quantise(sr)) == [0, 0, 2, 255, 255, 0]
    assert channel_major(protocol('ttst-y').quantise(sr)) == [0, 0, 1, 254, 255, 0]


def test_descriptions_name_what_is_measured() -> None:
    assert protocol('basicsr-y').describe(4) == 'basicsr-y: Y (BT.601), border 4 px, SR rounded to 8 bit'
    assert protocol('ttst-y').describe(4) == 'ttst-y: Y (BT.601), no border, SR truncated to 8 bit'
    assert protocol('transenet-rgb').describe(2) == ('transenet-rgb: RGB, PSNR/SSIM per channel averaged, border '
                                                     '2 px, SR truncated to 8 bit')
    assert all(p.sources and all(s.startswith('https://github.com/') for s in p.sources) for p in PROTOCOLS.values())


def test_bad_definitions_and_names_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown protocol 'psnr-y'; known: basicsr-y, ttst-y, transenet-rgb"):
        protocol('psnr-y')
    with pytest.raises(ValueError, match='colour must be one of'):
        Protocol(name='x', colour='lab', border='none', averaging='single', to_uint8='round', used_by='', sources=())
    with pytest.raises(ValueError, match='RGB is averaged per channel'):
        Protocol(name='x', colour='rgb', border='none', averaging='single', to_uint8='round', used_by='', sources=())
    p = protocol('basicsr-y')
    with pytest.raises(ValueError, match=r'expected two \(H, W, 3\) images of one size, got \(4, 4, 3\) and '):
        p.measure(np.zeros((4, 4, 3), np.uint8), np.zeros((4, 5, 3), np.uint8), 2)


def test_docs_page_lists_every_protocol() -> None:
    page = (Path(__file__).resolve().parents[1] / 'docs' / 'protocols.md').read_text()
    for name, p in PROTOCOLS.items():
        assert f'`{name}`' in page, name
        assert all(source in page for source in p.sources), name
