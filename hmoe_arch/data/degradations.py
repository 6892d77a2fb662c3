"""LR synthesis shared by the dataset (on-the-fly LR) and ``basicsr prepare`` (stored LR), so both give the
same LR for the same GT.

- ``bicubic``: MATLAB's ``imresize`` (BasicSR's ``imresize``, antialiased bicubic), as the authors' training;
- ``bilinear``: antialiased bilinear (triangle filter), what the paper's text names.

The result is rounded to 8 bits, like an LR image stored as PNG.
"""
import numpy as np
import torch
import torch.nn.functional as F
from basicsr.data.transforms import mod_crop
from basicsr.utils.matlab_functions import imresize

DEGRADATIONS = ('bicubic', 'bilinear')


def crop_to_scale(img: np.ndarray, scale: int) -> np.ndarray:
    """Crop ``(H, W, C)`` at the bottom/right to multiples of ``scale`` (never resize)."""
    return mod_crop(img, scale)


def downsample(img: np.ndarray, scale: int, degradation: str = 'bicubic') -> np.ndarray:
    """LR of a GT image.

    Args:
        img: ``(H, W, C)`` float32 in [0, 1] with H and W multiples of ``scale``.
        scale: Integer factor.
        degradation: ``'bicubic'`` or ``'bilinear'``.

    Returns:
        ``(H / scale, W / scale, C)`` float32 in [0, 1], quantised to multiples of 1/255.
    """
    if degradation not in DEGRADATIONS:
        raise ValueError(f'degradation must be one of {DEGRADATIONS}, got {degradation!r}')
    height, width = img.shape[:2]
    if height % scale or width % scale:
        raise ValueError(f'downsample: image size {height}x{width} is not a multiple of the scale {scale}; '
                         'crop it first (crop_to_scale)')
    if degradation == 'bicubic':
        lr = imresize(img, 1 / scale)
    else:
        tensor = torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1))).unsqueeze(0)
        lr = F.interpolate(tensor, size=(height // scale, width // scale), mode='bilinear', align_corners=False,
                           antialias=True)[0].numpy().transpose(1, 2, 0)
    return (np.clip(lr, 0, 1) * 255.0).round().astype(np.float32) / 255.0
