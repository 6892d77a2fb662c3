"""Padding to the window size and tiled inference."""
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from hmoe_arch import MFGHMoEArch
from hmoe_arch.tiling import (
    ContextTile,
    blended_tiled_forward,
    context_tiles,
    feather,
    pad_to_multiple,
    padded_forward,
    tile_starts,
    tiled_forward,
)

from util import SMALL_GROUPS, tiny


def test_pad_to_multiple_reflects_and_keeps_the_image() -> None:
    x = torch.arange(30.).view(1, 1, 5, 6)
    padded = pad_to_multiple(x, 4)
    assert padded.shape == (1, 1, 8, 8)
    assert torch.equal(padded[..., :5, :6], x)
    assert torch.equal(padded[..., 5, :6], x[..., 3, :])  # reflect: row 5 mirrors row 3
    assert pad_to_multiple(x, 1) is x
    tiny_img = torch.rand(1, 1, 2, 2)
    assert pad_to_multiple(tiny_img, 8).shape == (1, 1, 8, 8)  # too small to reflect: replicate


def test_pad_to_multiple_traces_into_a_graph_that_pads_every_size() -> None:
    """What ``basicsr export`` relies on: traced on an input that needs no padding, the graph still pads others,
    choosing reflect or replicate from their shape, exactly as ``F.pad`` does."""
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', torch.jit.TracerWarning)  # its notes on shape arithmetic
        warnings.simplefilter('ignore', FutureWarning)  # torch.jit.trace is deprecated; the ONNX exporter uses it
        traced = torch.jit.trace(lambda t: pad_to_multiple(t, 4), torch.rand(1, 2, 8, 8))
    for height, width in [(5, 6), (8, 8), (7, 1), (2, 2), (1, 9), (3, 4)]:
        x = torch.rand(1, 2, height, width)
        pad_h, pad_w = (-height) % 4, (-width) % 4
        mode = 'reflect' if pad_h < height and pad_w < width else 'replicate'
        assert torch.equal(traced(x), F.pad(x, (0, pad_w, 0, pad_h), mode=mode)), (height, width)


def test_padded_forward_crops_to_the_input_size() -> None:
    calls = []

    def net(x):
        calls.append(tuple(x.shape))
        return F.interpolate(x, scale_factor=2, mode='nearest')

    x = torch.rand(1, 3, 5, 7)
    out = padded_forward(net, x, 2, 4)
    assert calls == [(1, 3, 8, 8)] and out.shape == (1, 3, 10, 14)
    torch.testing.assert_close(out, F.interpolate(x, scale_factor=2, mode='nearest'))


def test_tiles_cover_everything_and_match_the_untiled_output() -> None:
    net = MFGHMoEArch(**tiny(upscale=2, expert_groups=SMALL_GROUPS)).eval()
    x = torch.rand(1, 3, 22, 19)
    with torch.no_grad():
        full = padded_forward(net, x, 2, 4)
        tiled = tiled_forward(net, x, 2, 4, tile_size=8, tile_pad=4)
    assert tiled.shape == full.shape == (1, 3, 44, 38)
    assert (full - tiled).abs().mean() < 0.02
    for top in range(0, 44, 16):
        for left in range(0, 38, 16):
            assert tiled[..., top:top + 16, left:left + 16].abs().sum() > 0


def test_context_tiles_cover_the_image_once_with_clipped_context() -> None:
    tiles = context_tiles(10, 7, 4, 2)
    assert [(t.top, t.left) for t in tiles] == [(0, 0), (0, 4), (4, 0), (4, 4), (8, 0), (8, 4)]
    assert tiles[3] == ContextTile(4, 4, 8, 7, 2, 2, 10, 7)
    assert tiles[3].context() == (slice(2, 10), slice(2, 7))
    assert tiles[3].area() == (slice(4, 8), slice(4, 7)) and tiles[3].area(3) == (slice(12, 24), slice(12, 21))
    assert tiles[3].core() == (slice(2, 6), slice(2, 5)) and tiles[3].core(2) == (slice(4, 12), slice(4, 10))
    image, covered = np.arange(70).reshape(10, 7), np.zeros((10, 7), int)
    for tile in tiles:
        covered[tile.area()] += 1
        assert np.array_equal(image[tile.context()][tile.core()], image[tile.area()])  # the core is the own area
    assert (covered == 1).all()
    assert context_tiles(3, 3, 8, 4) == [ContextTile(0, 0, 3, 3, 0, 0, 3, 3)]
    assert context_tiles(0, 5, 4, 1) == []


def test_tiles_whose_context_covers_the_receptive_field_equal_the_untiled_output() -> None:
    """Two 3x3 convolutions see 2 LR pixels to each side: with ``tile_pad >= 2`` every kept pixel is computed from
    exactly the inputs the whole image gives it (zero padding only at the image's own border)."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(),
                              torch.nn.Conv2d(8, 12, 3, padding=1), torch.nn.PixelShuffle(2)).eval()
    x = torch.rand(2, 3, 23, 18)
    with torch.no_grad():
        whole = net(x)
        for tile_size, tile_pad in [(5, 2), (8, 3), (7, 6), (30, 0)]:
            torch.testing.assert_close(tiled_forward(net, x, 2, 1, tile_size, tile_pad), whole, rtol=0, atol=1e-6)
        assert (tiled_forward(net, x, 2, 1, 5, 1) - whole).abs().max() > 1e-3  # too little context shows


def test_tile_of_an_identity_network_is_exact() -> None:
    x = torch.rand(2, 3, 13, 9)
    out = tiled_forward(lambda t: F.interpolate(t, scale_factor=3, mode='nearest'), x, 3, 1, tile_size=4, tile_pad=1)
    torch.testing.assert_close(out, F.interpolate(x, scale_factor=3, mode='nearest'))


def test_errors_inside_a_tile_propagate() -> None:
    def failing(t):
        raise RuntimeError('CUDA out of memory (simulated)')

    with pytest.raises(RuntimeError, match='out of memory'):
        tiled_forward(failing, torch.rand(1, 3, 8, 8), 2, 4, tile_size=4, tile_pad=0)
    with pytest.raises(ValueError, match='tile_size must be >= 1'):
        tiled_forward(failing, torch.rand(1, 3, 8, 8), 2, 4, tile_size=0, tile_pad=0)


def test_output_can_be_assembled_on_another_device() -> None:
    x = torch.rand(1, 3, 9, 9)
    out = tiled_forward(lambda t: t.repeat_interleave(2, -1).repeat_interleave(2, -2), x, 2, 1, 4, 1,
                        output_device=torch.device('meta'))
    assert out.device.type == 'meta' and out.shape == (1, 3, 18, 18)


def test_feather_and_tile_layout() -> None:
    torch.testing.assert_close(feather(6, 2, 0), torch.tensor([1 / 3, 2 / 3, 1, 1, 1, 1]))
    torch.testing.assert_close(feather(5, 0, 2), torch.tensor([1, 1, 1, 2 / 3, 1 / 3]))
    assert tile_starts(10, 16, 4) == [0]
    assert tile_starts(40, 16, 4) == [0, 12, 24]
    assert tile_starts(41, 16, 4) == [0, 12, 24, 25]


def test_blended_tiles_match_the_whole_image() -> None:
    net = MFGHMoEArch(**tiny(upscale=2, expert_groups=SMALL_GROUPS)).eval()
    x = torch.rand(1, 3, 30, 27)
    experts = np.full((30, 27), -1)
    with torch.no_grad():
        whole = padded_forward(net, x, 2, 4)
        tiled = blended_tiled_forward(net, x, 2, 4, tile=20, overlap=8, expert_map=experts)
    assert tiled.shape == whole.shape
    # HAT's channel attention pools over its whole input, so tiles cannot equal the whole image exactly
    assert (tiled - whole).abs().mean() < 0.3 * whole.abs().mean()
    assert experts.min() >= 0 and experts.max() <= 3
    identity = blended_tiled_forward(lambda t: t.repeat_interleave(2, -1).repeat_interleave(2, -2), x, 2, 1, 8, 3)
    torch.testing.assert_close(identity, x.repeat_interleave(2, -1).repeat_interleave(2, -2))
