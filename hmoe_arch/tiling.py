"""Inference on inputs of any size: padding to the window size and tiled inference with overlap.

One routine, shared by the model's validation/test and later by ``bench`` and ``infer``. Errors inside a tile
(out of memory included) propagate: no tile is ever left blank.
"""
import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F

Network = Callable[[torch.Tensor], torch.Tensor]


def pad_to_multiple(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """Pad ``(B, C, H, W)`` at the bottom/right to multiples of ``multiple`` (reflect, as HAT; replicate where
    the image is too small to reflect)."""
    height, width = x.shape[-2:]
    pad_h, pad_w = (-height) % multiple, (-width) % multiple
    if pad_h == 0 and pad_w == 0:
        return x
    mode = 'reflect' if pad_h < height and pad_w < width else 'replicate'
    return F.pad(x, (0, pad_w, 0, pad_h), mode=mode)


def padded_forward(net: Network, x: torch.Tensor, scale: int, window_size: int) -> torch.Tensor:
    """``net`` on ``x`` padded to the window size; the output is cropped back to ``(H*scale, W*scale)``."""
    height, width = x.shape[-2:]
    return net(pad_to_multiple(x, window_size))[..., :height * scale, :width * scale]


def tiled_forward(net: Network, x: torch.Tensor, scale: int, window_size: int, tile_size: int,
                  tile_pad: int, output_device: Optional[torch.device] = None) -> torch.Tensor:
    """Super-resolve ``x`` tile by tile.

    Each ``tile_size`` tile is processed with ``tile_pad`` pixels of context on every side (where the image
    has them) and only its own area is kept, so neighbouring tiles meet without seams from zero padding. The
    working memory is that of one tile, whatever the image size; with ``output_device`` (e.g. the CPU while
    the network runs on a GPU) the output is assembled there, so the device holds one tile at a time.

    Returns:
        ``(B, C, H*scale, W*scale)`` on ``output_device`` (default: the device of the network's output).
    """
    if tile_size < 1 or tile_pad < 0:
        raise ValueError(f'tile_size must be >= 1 and tile_pad >= 0, got {tile_size} and {tile_pad}')
    batch, channels, height, width = x.shape
    out = None
    for row in range(math.ceil(height / tile_size)):
        for col in range(math.ceil(width / tile_size)):
            top, left = row * tile_size, col * tile_size
            bottom, right = min(top + tile_size, height), min(left + tile_size, width)
            ctx_top, ctx_left = max(top - tile_pad, 0), max(left - tile_pad, 0)
            ctx_bottom, ctx_right = min(bottom + tile_pad, height), min(right + tile_pad, width)
            sr = padded_forward(net, x[..., ctx_top:ctx_bottom, ctx_left:ctx_right], scale, window_size)
            if out is None:
                out = torch.empty(batch, sr.shape[1], height * scale, width * scale, dtype=sr.dtype,
                                  device=output_device or sr.device)
            out[..., top * scale:bottom * scale, left * scale:right * scale] = sr[
                ..., (top - ctx_top) * scale:(bottom - ctx_top) * scale,
                (left - ctx_left) * scale:(right - ctx_left) * scale]
    return out
