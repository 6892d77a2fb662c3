"""Inference on inputs of any size: padding to the window size and tiled inference.

Two tilings: tiles computed with surrounding context of which only their own area is kept
(:func:`context_tiles`, the grid; :func:`tiled_forward`, used by the model's validation/test and ``bench``; and the
blocks of ``infer`` and its GeoTIFF path) and :func:`blended_tiled_forward` (overlapping tiles averaged with
feather weights; used by ``infer`` within each block). Errors inside a tile (out of memory included) propagate:
no tile is ever left blank.
"""
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import numpy as np
import torch
from tqdm import tqdm

from .expert_maps import lr_expert_map

Network = Callable[[torch.Tensor], torch.Tensor]


def window_size_of(net: torch.nn.Module, network_opt: Optional[Dict[str, Any]] = None) -> int:
    """The multiple an input side must be for ``net``: its ``window_size`` attribute, else the ``window_size`` of its
    ``network_g`` options (BasicSR's SwinIR keeps none), else 1."""
    window = getattr(net, 'window_size', None)
    if window is None and network_opt is not None:
        window = network_opt.get('window_size')
    return int(window or 1)


def pad_to_multiple(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """Pad ``(B, C, H, W)`` at the bottom/right to multiples of ``multiple`` (reflect, as HAT; replicate where
    the image is too small to reflect: a pad not smaller than its side, on either axis).

    The padding gathers rows and columns at indices computed from the input's shape, with no branch on the
    sizes, so the same code traces into an ONNX graph that pads inputs of any size (``basicsr export``); outside
    a trace an input that needs no padding is returned as it is.
    """
    height, width = x.shape[-2:]
    pad_h = (height + multiple - 1) // multiple * multiple - height
    pad_w = (width + multiple - 1) // multiple * multiple - width
    if not torch.jit.is_tracing() and pad_h == 0 and pad_w == 0:
        return x
    reflect = torch.as_tensor((pad_h < height) & (pad_w < width), device=x.device)
    rows = _source_index(height, pad_h, reflect, x.device)
    cols = _source_index(width, pad_w, reflect, x.device)
    return x.index_select(-2, rows).index_select(-1, cols)


def _source_index(size: Union[int, torch.Tensor], pad: Union[int, torch.Tensor], reflect: torch.Tensor,
                  device: torch.device) -> torch.Tensor:
    """``(size + pad,)`` int64: the input position each position of one padded axis copies; itself inside the
    image, then the image mirrored about its last position (``reflect``, a 0-dim bool) or that position repeated.
    ``size`` and ``pad`` are ints, or 0-dim tensors while tracing."""
    index = torch.arange(size + pad, device=device)
    last = size - 1
    return torch.where(reflect, last - (last - index).abs(), index.clamp(max=last))


def padded_forward(net: Network, x: torch.Tensor, scale: int, window_size: int) -> torch.Tensor:
    """``net`` on ``x`` padded to the window size; the output is cropped back to ``(H*scale, W*scale)``."""
    height, width = x.shape[-2:]
    return net(pad_to_multiple(x, window_size))[..., :height * scale, :width * scale]


@dataclass(frozen=True)
class ContextTile:
    """One tile of a :func:`context_tiles` grid: its own area, rows ``top:bottom`` and columns ``left:right`` of the
    image, and the larger area it is computed from, up to ``pad`` more pixels on each side where the image has
    them (rows ``ctx_top:ctx_bottom``, columns ``ctx_left:ctx_right``)."""

    top: int
    left: int
    bottom: int
    right: int
    ctx_top: int
    ctx_left: int
    ctx_bottom: int
    ctx_right: int

    def context(self) -> Tuple[slice, slice]:
        """Rows and columns of the context area in the image."""
        return slice(self.ctx_top, self.ctx_bottom), slice(self.ctx_left, self.ctx_right)

    def area(self, scale: int = 1) -> Tuple[slice, slice]:
        """Rows and columns of the tile's own area in the image, or in its x``scale`` output."""
        return (slice(self.top * scale, self.bottom * scale), slice(self.left * scale, self.right * scale))

    def core(self, scale: int = 1) -> Tuple[slice, slice]:
        """Rows and columns of the tile's own area within the context area, or within the context area's
        x``scale`` output: the part of a result computed from :meth:`context` that is kept."""
        return (slice((self.top - self.ctx_top) * scale, (self.bottom - self.ctx_top) * scale),
                slice((self.left - self.ctx_left) * scale, (self.right - self.ctx_left) * scale))


def context_tiles(height: int, width: int, tile: int, pad: int) -> List[ContextTile]:
    """The tiles of ``tile`` x ``tile`` pixels (smaller at the bottom and right edges) that cover an image of
    ``height`` x ``width`` pixels without overlapping, row by row, each with ``pad`` pixels of context."""
    return [ContextTile(top, left, min(top + tile, height), min(left + tile, width), max(top - pad, 0),
                        max(left - pad, 0), min(top + tile + pad, height), min(left + tile + pad, width))
            for top in range(0, height, tile) for left in range(0, width, tile)]


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
    batch, _, height, width = x.shape
    out = None
    for tile in context_tiles(height, width, tile_size, tile_pad):
        sr = padded_forward(net, x[(..., *tile.context())], scale, window_size)
        if out is None:
            out = torch.empty(batch, sr.shape[1], height * scale, width * scale, dtype=sr.dtype,
                              device=output_device or sr.device)
        out[(..., *tile.area(scale))] = sr[(..., *tile.core(scale))]
    return out


def feather(length: int, ramp_before: int, ramp_after: int) -> torch.Tensor:
    """1D weights: rising over ``ramp_before`` samples, falling over ``ramp_after``, 1 in between (> 0)."""
    weights = torch.ones(length)
    if ramp_before:
        weights[:ramp_before] = torch.arange(1, ramp_before + 1) / (ramp_before + 1)
    if ramp_after:
        weights[length - ramp_after:] = torch.minimum(weights[length - ramp_after:],
                                                      torch.arange(ramp_after, 0, -1) / (ramp_after + 1))
    return weights


def tile_starts(size: int, tile: int, overlap: int) -> List[int]:
    """Start offsets of tiles of ``tile`` samples overlapping by ``overlap`` that cover ``size`` samples."""
    if size <= tile:
        return [0]
    stride = tile - overlap
    starts = list(range(0, size - tile, stride))
    return starts + [size - tile]


def blended_tiled_forward(net: Network, x: torch.Tensor, scale: int, window_size: int, tile: int,
                          overlap: int, progress: bool = False,
                          expert_map: Optional[np.ndarray] = None) -> torch.Tensor:
    """SR of ``x`` ``(1, C, H, W)`` from overlapping tiles averaged with feather weights; returns
    ``(1, C, H*scale, W*scale)`` on the CPU (the network's device holds one tile at a time). With
    ``expert_map`` (an ``(H, W)`` integer array, MoE networks) each LR pixel's expert is recorded there (in
    overlaps, from the later tile)."""
    if tile < 1 or not 0 <= overlap < tile:
        raise ValueError(f'tile must be >= 1 and 0 <= overlap < tile, got {tile} and {overlap}')
    _, channels, height, width = x.shape
    out = torch.zeros(1, channels, height * scale, width * scale)
    total = torch.zeros(1, 1, height * scale, width * scale)
    rows, cols = tile_starts(height, tile, overlap), tile_starts(width, tile, overlap)
    with tqdm(total=len(rows) * len(cols), unit='tile', disable=not progress, leave=False) as bar:
        for top in rows:
            for left in cols:
                bottom, right = min(top + tile, height), min(left + tile, width)
                sr = padded_forward(net, x[..., top:bottom, left:right], scale, window_size)
                if expert_map is not None:
                    expert_map[top:bottom, left:right] = lr_expert_map(net, bottom - top, right - left)
                ramp_v = feather((bottom - top) * scale, overlap * scale if top > 0 else 0,
                                 overlap * scale if bottom < height else 0)
                ramp_h = feather((right - left) * scale, overlap * scale if left > 0 else 0,
                                 overlap * scale if right < width else 0)
                weight = (ramp_v[:, None] * ramp_h[None, :])[None, None]
                region = (..., slice(top * scale, bottom * scale), slice(left * scale, right * scale))
                out[region] += sr.float().cpu() * weight
                total[region] += weight
                bar.update()
    return out.div_(total)
