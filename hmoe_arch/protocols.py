"""Evaluation protocols of the remote-sensing SR literature: how an SR output and its ground truth become PSNR/SSIM.

Papers disagree on the colour space, the border left out and how RGB channels are averaged, and even on how the
network's float output becomes 8-bit; a number is comparable only with numbers measured the same way. Each
:class:`Protocol` states all four, with the paper code that defines it (read from that code; see
``docs/protocols.md``). The arithmetic is BasicSR's (``calculate_psnr``/``calculate_ssim``: PSNR from the MSE
of 0-255 values, Wang et al.'s SSIM with an 11x11 Gaussian window, sigma 1.5, on the valid region), which the
papers' scripts reimplement with the same formulas.

Every protocol averages per-image values over the test set.
"""
from dataclasses import dataclass
from typing import Dict, Tuple

import numpy as np
import torch
from basicsr.metrics import calculate_psnr, calculate_ssim

COLOURS = ('y', 'rgb')
BORDERS = ('scale', 'none')
AVERAGING = ('single', 'per_channel')
TO_UINT8 = ('round', 'truncate')


@dataclass(frozen=True)
class Protocol:
    """One way of measuring PSNR/SSIM.

    Attributes:
        name: What ``basicsr bench --protocol`` takes.
        colour: ``'y'``: the luma of ITU-R BT.601 in studio range, ``16 + (65.481 R + 128.553 G + 24.966 B) / 255``
            on 0-255 values, kept as float (MATLAB's ``rgb2ycbcr``); ``'rgb'``: the three channels.
        border: ``'scale'``: ``scale`` pixels left out on every side; ``'none'``: the whole image.
        averaging: ``'single'``: one PSNR/SSIM over the compared channel (Y); ``'per_channel'``: PSNR and SSIM of
            R, G and B computed separately and averaged (not one MSE over all channels).
        to_uint8: How the SR output in [0, 1] becomes 8-bit before measuring: ``'round'`` (BasicSR's
            ``tensor2img``) or ``'truncate'`` (``astype(np.uint8)`` of the clipped 0-255 values).
        used_by: Papers and code bases that report numbers this way.
        sources: The files that define it (public URLs).
    """

    name: str
    colour: str
    border: str
    averaging: str
    to_uint8: str
    used_by: str
    sources: Tuple[str, ...]

    def __post_init__(self) -> None:
        for key, allowed in (('colour', COLOURS), ('border', BORDERS), ('averaging', AVERAGING),
                             ('to_uint8', TO_UINT8)):
            if getattr(self, key) not in allowed:
                raise ValueError(f'Protocol {self.name}: {key} must be one of {allowed}, got {getattr(self, key)!r}')
        if (self.colour == 'y') != (self.averaging == 'single'):
            raise ValueError(f'Protocol {self.name}: Y is one channel (averaging single), RGB is averaged per channel')

    def crop(self, scale: int) -> int:
        """Pixels left out on every side."""
        return scale if self.border == 'scale' else 0

    def describe(self, scale: int) -> str:
        """One line for table headings, e.g. ``basicsr-y: Y (BT.601), border 4 px, SR rounded to 8 bit``."""
        colour = 'Y (BT.601)' if self.colour == 'y' else 'RGB, PSNR/SSIM per channel averaged'
        border = f'border {self.crop(scale)} px' if self.border == 'scale' else 'no border'
        return f'{self.name}: {colour}, {border}, SR {"rounded" if self.to_uint8 == "round" else "truncated"} to 8 bit'

    def quantise(self, sr: torch.Tensor) -> np.ndarray:
        """An SR output ``(1, 3, H, W)`` or ``(3, H, W)``, RGB in [0, 1] -> ``(H, W, 3)`` BGR uint8."""
        values = sr.detach().squeeze(0).float().clamp(0, 1).cpu().numpy().transpose(1, 2, 0)[..., ::-1] * 255.0
        return (values.round() if self.to_uint8 == 'round' else values).astype(np.uint8)

    def measure(self, sr_img: np.ndarray, gt_img: np.ndarray, scale: int) -> Tuple[float, float]:
        """``(PSNR, SSIM)`` of two ``(H, W, 3)`` BGR uint8 images (the order ``cv2.imread`` gives)."""
        if sr_img.shape != gt_img.shape or sr_img.ndim != 3 or sr_img.shape[2] != 3:
            raise ValueError(f'Protocol {self.name}: expected two (H, W, 3) images of one size, got {sr_img.shape} '
                             f'and {gt_img.shape}')
        crop = self.crop(scale)
        if self.colour == 'y':
            return (float(calculate_psnr(sr_img, gt_img, crop, test_y_channel=True)),
                    float(calculate_ssim(sr_img, gt_img, crop, test_y_channel=True)))
        psnr = np.mean([calculate_psnr(sr_img[..., c], gt_img[..., c], crop) for c in range(3)])
        # BasicSR's SSIM of a 3-channel image is already the mean of the per-channel SSIMs
        return float(psnr), float(calculate_ssim(sr_img, gt_img, crop))


BASICSR = 'https://github.com/XPixelGroup/BasicSR/blob/v1.4.2/basicsr/metrics/psnr_ssim.py'
PROTOCOLS: Dict[str, Protocol] = {p.name: p for p in (
    Protocol(name='basicsr-y', colour='y', border='scale', averaging='single', to_uint8='round',
             used_by='MFG-HMoE (its test option files), HAT, SwinIR and other BasicSR-based papers; this '
                     "project's training validation",
             sources=(BASICSR, 'https://github.com/Mr-Bamboo/MFG-HMoE/blob/main/options/test/'
                               'test_HMoE_SRx4_UCMerced.yml')),
    Protocol(name='ttst-y', colour='y', border='none', averaging='single', to_uint8='truncate',
             used_by='TTST (Xiao et al., TIP 2024)',
             sources=('https://github.com/XY-boy/TTST/blob/main/metrics/Cal_PSNR_SSIM.py',
                      'https://github.com/XY-boy/TTST/blob/main/eval_4x.py')),
    Protocol(name='transenet-rgb', colour='rgb', border='scale', averaging='per_channel', to_uint8='truncate',
             used_by='TransENet (Lei et al., TGRS 2022) and papers that reuse its metric script',
             sources=('https://github.com/Shaosifan/TransENet/blob/master/codes/metric_scripts/calculate_PSNR_SSIM.py',
                      'https://github.com/Shaosifan/TransENet/blob/master/codes/demo_deploy.py')),
    Protocol(name='haunet-rgb', colour='rgb', border='scale', averaging='per_channel', to_uint8='round',
             used_by='HAUNet (Wang et al., TGRS 2023)',
             sources=('https://github.com/likakakaka/HAUNet_RSISR/blob/master/codes/metric_scripts/calculate_metric.py',
                      'https://github.com/likakakaka/HAUNet_RSISR/blob/master/codes/demo_deploy.py')),
)}
"""The protocols by name; ``basicsr-y`` is the default of ``basicsr bench``."""
DEFAULT_PROTOCOL = 'basicsr-y'


def protocol(name: str) -> Protocol:
    """The protocol called ``name``; a ``ValueError`` lists the known ones."""
    if name not in PROTOCOLS:
        raise ValueError(f'unknown protocol {name!r}; known: {", ".join(PROTOCOLS)} (see docs/protocols.md)')
    return PROTOCOLS[name]
