"""LR synthesis shared by the dataset (on-the-fly LR) and ``basicsr prepare`` (stored LR), so both give the
same LR for the same GT (to float rounding, see ``bicubic``).

- ``bicubic``: MATLAB's ``imresize`` (antialiased bicubic), as the authors' training. ``basicsr prepare`` uses
  BasicSR's port (``basicsr.utils.matlab_functions.imresize``), so stored test sets are bit for bit what it
  gives. It loops in Python over output rows and channels (about 2 ms for a 64x64 training patch, a sixth of a
  tiny training step's data time), so training patches use :func:`imresize_bicubic`: the same weights and
  mirrored borders folded into one ``(out, in)`` matrix per axis, and two matrix products. The values equal
  BasicSR's to float rounding (max 3.6e-7 on the 210 real UCMerced images, whole and 64x64 crops); after 8-bit
  rounding 25 of their 2.74 million samples are one level apart (``tests/test_degradations.py``);
- ``bilinear``: antialiased bilinear (triangle filter), what the paper's text names.

The result is rounded to 8 bits, like an LR image stored as PNG.
"""
import math
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F
from basicsr.data.transforms import mod_crop
from basicsr.utils.matlab_functions import calculate_weights_indices, imresize

DEGRADATIONS = ('bicubic', 'bilinear')


def crop_to_scale(img: np.ndarray, scale: int) -> np.ndarray:
    """Crop ``(H, W, C)`` at the bottom/right to multiples of ``scale`` (never resize)."""
    return mod_crop(img, scale)


@lru_cache(maxsize=32)
def bicubic_matrix(in_length: int, scale: float) -> np.ndarray:
    """MATLAB's antialiased bicubic resampling of one axis as a matrix.

    BasicSR's ``calculate_weights_indices`` gives each output pixel its weights over a window of the input
    padded symmetrically at both ends, the edge pixel repeated (``... x1 x0 | x0 x1 ...``); the padded positions
    are mapped back to the input pixels they copy, and the weights summed into the output pixel's row.

    Args:
        in_length: Input pixels along the axis.
        scale: Output size over input size (``1 / 4`` for x4 downsampling).

    Returns:
        Float32 ``(ceil(in_length * scale), in_length)``, read-only (it is cached); output = matrix @ input along
        the axis.
    """
    out_length = math.ceil(in_length * scale)
    weights, indices, sym_len_start, _ = calculate_weights_indices(in_length, out_length, scale, 'cubic', 4, True)
    source = indices.long().numpy() - sym_len_start
    source = np.where(source < 0, -1 - source, source)
    source = np.where(source >= in_length, 2 * in_length - 1 - source, source)
    matrix = np.zeros((out_length, in_length), np.float64)
    np.add.at(matrix, (np.arange(out_length)[:, None].repeat(source.shape[1], 1), source), weights.double().numpy())
    matrix = matrix.astype(np.float32)
    matrix.setflags(write=False)
    return matrix


def imresize_bicubic(img: np.ndarray, scale: float) -> np.ndarray:
    """MATLAB ``imresize(img, scale)`` (antialiased bicubic) of ``(H, W, C)`` float32, like BasicSR's
    ``imresize`` for NumPy input (heights first, then widths; not rounded or clipped)."""
    rows = bicubic_matrix(img.shape[0], scale)
    cols = bicubic_matrix(img.shape[1], scale)
    height_resized = np.tensordot(rows, img.astype(np.float32, copy=False), axes=(1, 0))
    return np.ascontiguousarray(np.tensordot(height_resized, cols, axes=(1, 1)).transpose(0, 2, 1))


def downsample(img: np.ndarray, scale: int, degradation: str = 'bicubic', reference: bool = False) -> np.ndarray:
    """LR of a GT image.

    Args:
        img: ``(H, W, C)`` float32 in [0, 1] with H and W multiples of ``scale``.
        scale: Integer factor.
        degradation: ``'bicubic'`` or ``'bilinear'``.
        reference: ``bicubic`` with BasicSR's own ``imresize`` (``basicsr prepare``) instead of
            :func:`imresize_bicubic` (training patches).

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
        lr = imresize(img, 1 / scale) if reference else imresize_bicubic(img, 1 / scale)
    else:
        tensor = torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1))).unsqueeze(0)
        lr = F.interpolate(tensor, size=(height // scale, width // scale), mode='bilinear', align_corners=False,
                           antialias=True)[0].numpy().transpose(1, 2, 0)
    return (np.clip(lr, 0, 1) * 255.0).round().astype(np.float32) / 255.0
