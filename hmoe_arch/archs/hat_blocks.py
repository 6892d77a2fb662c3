"""Building blocks of the HAT backbone (Chen et al., "Activating More Pixels in Image Super-Resolution
Transformer", CVPR 2023), written for this project.

Submodule and parameter names follow HAT's so that HAT checkpoints load with ``strict=True``:
``norm1``/``attn``/``conv_block``/``norm2``/``mlp`` in a hybrid attention block, ``overlap_attn`` in a
group, ``residual_group``/``conv`` in a residual hybrid attention group.

Token tensors are ``(B, H*W, C)`` (row-major pixels); image tensors are ``(B, C, H, W)``.
"""
from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from timm.layers import DropPath, Mlp, trunc_normal_
from torch.utils.checkpoint import checkpoint

Size2D = Tuple[int, int]


def init_trunc_normal(tensor: torch.Tensor, std: float = 0.02) -> None:
    """timm's truncated normal initialisation, in place; a tensor on the meta device (a network built only to
    check its arguments) holds no values and is left alone (on meta, the initialisation alone took 0.7 s for the
    paper-size network)."""
    if not tensor.is_meta:
        trunc_normal_(tensor, std=std)


def image_to_tokens(x: torch.Tensor) -> torch.Tensor:
    """``(B, C, H, W)`` -> ``(B, H*W, C)``."""
    return rearrange(x, 'b c h w -> b (h w) c')


def tokens_to_image(x: torch.Tensor, x_size: Size2D) -> torch.Tensor:
    """``(B, H*W, C)`` -> ``(B, C, H, W)``."""
    return rearrange(x, 'b (h w) c -> b c h w', h=x_size[0], w=x_size[1])


def window_partition(x: torch.Tensor, window_size: int) -> torch.Tensor:
    """Split ``(B, H, W, C)`` into non-overlapping windows ``(B * nW, window_size**2, C)``."""
    return rearrange(x, 'b (nh wh) (nw ww) c -> (b nh nw) (wh ww) c', wh=window_size, ww=window_size)


def window_reverse(windows: torch.Tensor, window_size: int, height: int, width: int) -> torch.Tensor:
    """Inverse of :func:`window_partition`: ``(B * nW, window_size**2, C)`` -> ``(B, H, W, C)``."""
    return rearrange(windows, '(b nh nw) (wh ww) c -> b (nh wh) (nw ww) c', nh=height // window_size,
                     nw=width // window_size, wh=window_size, ww=window_size)


def fused_kernel_applies(q: torch.Tensor, bias: torch.Tensor) -> bool:
    """Whether ``F.scaled_dot_product_attention`` computes this attention with a fused kernel. PyTorch's CPU
    kernel takes no gradient for an additive mask: with a bias that needs one (the relative position table while
    training) it falls back to an unfused computation that is slower than the explicit one (``docs/performance.md``,
    "Attention while training on the CPU"), so there the explicit computation is used. The values are the same to
    float rounding."""
    return not (q.device.type == 'cpu' and bias.requires_grad and torch.is_grad_enabled())


def scaled_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor, scale: float,
                     dropout_p: float, fused: bool) -> torch.Tensor:
    """``dropout(softmax(scale * q @ k^T + bias)) @ v`` over windows.

    Args:
        q: ``(B * G, h, Nq, d)``; k, v: ``(B * G, h, Nk, d)``: the windows of B images, G per image.
        bias: ``(G, h, Nq, Nk)`` additive bias, row ``i`` of the batch taking ``bias[i % G]`` (shifted
            windows: relative position bias plus each window's shift mask), or ``(1, h, Nq, Nk)`` for all.
            It is broadcast over the images, never copied per image.
        fused: Use ``F.scaled_dot_product_attention`` where it has a fused kernel for this call
            (:func:`fused_kernel_applies`); otherwise, and with ``False``, HAT's explicit computation, which stores
            the probabilities for backward. Fused kernels need the
            head dimension a multiple of 8 and contiguous: it is zero-padded (HAT's 30 becomes 32; the result
            is unchanged), or copied where its stride is not 1 (OCAB's unfolded keys and values); without
            that, PyTorch falls back to the explicit computation. With G > 1 the G windows of an image are
            passed as G * h heads of one batch row, so that the bias broadcasts over the batch. On the CPU the
            mask is passed with its batch dimension of 1: the CPU kernel broadcasts it, but copies a mask expanded
            to the batch into a contiguous one (a mask per window: 9 MB and 6 % of a tiny network's forward on a
            64x64 image).

    Returns:
        ``(B * G, h, Nq, d)``.
    """
    groups, heads, queries, keys = bias.shape[0], q.shape[1], q.shape[2], k.shape[2]
    if not (fused and fused_kernel_applies(q, bias)):
        attn = ((q * scale) @ k.transpose(-2, -1)).view(-1, groups, heads, queries, keys) + bias
        attn = attn.flatten(0, 1).softmax(dim=-1)
        return F.dropout(attn, dropout_p, training=dropout_p > 0) @ v
    head_dim = q.shape[-1]
    pad = (-head_dim) % 8
    if pad:
        q, k, v = (F.pad(t, (0, pad)) for t in (q, k, v))
    else:
        q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    if groups > 1:
        q, k, v = (t.reshape(-1, groups * heads, t.shape[2], t.shape[3]) for t in (q, k, v))
        bias = bias.reshape(1, groups * heads, queries, keys)
    mask = bias.to(q.dtype)
    if q.device.type != 'cpu':
        mask = mask.expand(q.shape[0], q.shape[1], queries, keys)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, scale=scale)
    out = out.reshape(-1, heads, queries, out.shape[-1])
    return out[..., :head_dim] if pad else out


def relative_position_index_self(window_size: int) -> torch.Tensor:
    """Index into a ``(2w-1)^2`` bias table for every (query, key) pair of a ``w x w`` window.

    Returns:
        Long tensor ``(w*w, w*w)``.
    """
    coords = torch.stack(torch.meshgrid(torch.arange(window_size), torch.arange(window_size), indexing='ij'))
    coords = coords.flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (window_size - 1)
    return rel[..., 0] * (2 * window_size - 1) + rel[..., 1]


def relative_position_index_overlap(window_size: int, overlap_window_size: int) -> torch.Tensor:
    """Index into a ``(w+o-1)^2`` bias table for queries of a ``w x w`` window and keys of the centred
    ``o x o`` overlapping window.

    HAT's offset ``w - o + 1`` leaves part of the indices negative; they wrap around the table, so every
    entry is still used by exactly one relative offset. Kept as is: HAT checkpoints are trained with it.

    Returns:
        Long tensor ``(w*w, o*o)``.
    """
    def grid(n: int) -> torch.Tensor:
        return torch.stack(torch.meshgrid(torch.arange(n), torch.arange(n), indexing='ij')).flatten(1)

    rel = (grid(overlap_window_size)[:, None, :] - grid(window_size)[:, :, None]).permute(1, 2, 0)
    rel = rel + (window_size - overlap_window_size + 1)
    return rel[..., 0] * (window_size + overlap_window_size - 1) + rel[..., 1]


SHIFT_MASK_VALUE = -1.0e4
"""Additive mask between pixels of different regions in a shifted window. HAT adds -100, whose softmax weights
(about ``exp(-100) = 4e-44``) are subnormal floats: they change no output in float32 (they are far below the
rounding of the unmasked terms), but every multiplication with them takes the CPU's slow subnormal path
(one ``bmm`` with such weights took 70x as long, ``docs/performance.md``; ``torch.set_flush_denormal``
does not reach the worker threads of a 2-thread run). With -1e4, ``exp`` underflows to exactly zero. Outputs
and gradients equal HAT's to float rounding (tests/test_hat_blocks.py, and the reference vectors of HAT and the
authors' network). The value is finite so that no row becomes NaN and it stays in float16's range."""


def shifted_window_mask(height: int, width: int, window_size: int, shift_size: int) -> torch.Tensor:
    """Additive attention mask of shifted-window attention: 0 within a region, :data:`SHIFT_MASK_VALUE` across
    regions.

    Returns:
        Float tensor ``(nW, window_size**2, window_size**2)``.
    """
    region = torch.zeros(1, height, width, 1)
    bounds = (slice(0, -window_size), slice(-window_size, -shift_size), slice(-shift_size, None))
    label = 0
    for rows in bounds:
        for cols in bounds:
            region[:, rows, cols, :] = label
            label += 1
    labels = window_partition(region, window_size).squeeze(-1)
    diff = labels.unsqueeze(1) - labels.unsqueeze(2)
    return torch.zeros_like(diff).masked_fill(diff != 0, SHIFT_MASK_VALUE)


class WindowAttention(nn.Module):
    """Multi-head self-attention inside ``w x w`` windows with a learned relative position bias.

    Args:
        dim: Channels C.
        window_size: Window side w.
        num_heads: Heads; must divide ``dim``.
        qkv_bias: Learn a bias for the query/key/value projection.
        qk_scale: Query scale; ``None`` means ``head_dim ** -0.5``.
        attn_drop: Dropout on the attention probabilities.
        proj_drop: Dropout after the output projection.
        fused: Compute attention with ``scaled_dot_product_attention`` (see :func:`scaled_attention`).
    """

    def __init__(self, dim: int, window_size: int, num_heads: int, qkv_bias: bool = True,
                 qk_scale: Optional[float] = None, attn_drop: float = 0.0, proj_drop: float = 0.0,
                 fused: bool = True) -> None:
        super().__init__()
        self.fused = fused
        self.dim = dim
        self.window_size = window_size
        self.num_heads = num_heads
        self.scale = qk_scale or (dim // num_heads) ** -0.5
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window_size - 1) ** 2, num_heads))
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        init_trunc_normal(self.relative_position_bias_table)

    def forward(self, x: torch.Tensor, rpi: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """
        Args:
            x: Windows ``(B * nW, N, C)`` with ``N = w * w``.
            rpi: Relative position index ``(N, N)``.
            mask: Additive mask ``(nW, N, N)`` of shifted windows, or ``None``.

        Returns:
            ``(B * nW, N, C)``.
        """
        n = x.shape[1]
        q, k, v = rearrange(self.qkv(x), 'b n (three h d) -> three b h n d', three=3, h=self.num_heads)
        # contiguous (h, N, N), so that the sum with the mask is contiguous too and reshapes as a view
        bias = self.relative_position_bias_table[rpi.reshape(-1)].reshape(n, n, -1).permute(2, 0, 1).contiguous()
        bias = bias.unsqueeze(0)
        if mask is not None:
            bias = bias + mask.unsqueeze(1)
        dropout = self.attn_drop.p if self.training else 0.0
        x = rearrange(scaled_attention(q, k, v, bias, self.scale, dropout, self.fused), 'b h n d -> b n (h d)')
        return self.proj_drop(self.proj(x))


class ChannelAttention(nn.Module):
    """Squeeze-and-excitation channel attention: ``x * sigmoid(W2 relu(W1 avgpool(x)))``."""

    def __init__(self, num_feat: int, squeeze_factor: int) -> None:
        super().__init__()
        self.attention = nn.Sequential(
            nn.AdaptiveAvgPool2d(1),
            nn.Conv2d(num_feat, num_feat // squeeze_factor, 1),
            nn.ReLU(inplace=True),
            nn.Conv2d(num_feat // squeeze_factor, num_feat, 1),
            nn.Sigmoid(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W)`` -> ``(B, C, H, W)``."""
        return x * self.attention(x)


class ChannelAttentionBlock(nn.Module):
    """HAT's CAB: Conv3x3 (C -> C/compress) -> GELU -> Conv3x3 (-> C) -> channel attention."""

    def __init__(self, num_feat: int, compress_ratio: int, squeeze_factor: int) -> None:
        super().__init__()
        self.cab = nn.Sequential(
            nn.Conv2d(num_feat, num_feat // compress_ratio, 3, 1, 1),
            nn.GELU(),
            nn.Conv2d(num_feat // compress_ratio, num_feat, 3, 1, 1),
            ChannelAttention(num_feat, squeeze_factor),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W)`` -> ``(B, C, H, W)``."""
        return self.cab(x)


class HybridAttentionBlock(nn.Module):
    """HAT's HAB: (shifted) window attention in parallel with a scaled channel attention block, then an MLP.

    ``x + drop_path(attn(norm1(x))) + conv_scale * cab(norm1(x))`` followed by
    ``x + drop_path(mlp(norm2(x)))``.
    """

    def __init__(self, *, dim: int, num_heads: int, window_size: int, shift_size: int, compress_ratio: int,
                 squeeze_factor: int, conv_scale: float, mlp_ratio: float, qkv_bias: bool,
                 qk_scale: Optional[float], drop: float, attn_drop: float, drop_path: float,
                 fused_attention: bool = True) -> None:
        super().__init__()
        self.window_size = window_size
        self.shift_size = shift_size
        self.conv_scale = conv_scale
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim=dim, window_size=window_size, num_heads=num_heads, qkv_bias=qkv_bias,
                                    qk_scale=qk_scale, attn_drop=attn_drop, proj_drop=drop, fused=fused_attention)
        self.conv_block = ChannelAttentionBlock(num_feat=dim, compress_ratio=compress_ratio,
                                                squeeze_factor=squeeze_factor)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(in_features=dim, hidden_features=int(dim * mlp_ratio), act_layer=nn.GELU, drop=drop)

    def forward(self, x: torch.Tensor, x_size: Size2D, rpi: torch.Tensor, attn_mask: torch.Tensor) -> torch.Tensor:
        """
        Args:
            x: Tokens ``(B, H*W, C)``.
            x_size: ``(H, W)``, multiples of the window size.
            rpi: Relative position index ``(w*w, w*w)``.
            attn_mask: Mask of shifted windows ``(nW, w*w, w*w)``, used when ``shift_size > 0``.

        Returns:
            ``(B, H*W, C)``.
        """
        height, width = x_size
        shortcut = x
        x = self.norm1(x).view(x.shape[0], height, width, -1)
        conv_x = image_to_tokens(self.conv_block(x.permute(0, 3, 1, 2)))
        if self.shift_size > 0:
            x = torch.roll(x, shifts=(-self.shift_size, -self.shift_size), dims=(1, 2))
            mask = attn_mask
        else:
            mask = None
        attn_x = window_reverse(self.attn(window_partition(x, self.window_size), rpi, mask), self.window_size,
                                height, width)
        if self.shift_size > 0:
            attn_x = torch.roll(attn_x, shifts=(self.shift_size, self.shift_size), dims=(1, 2))
        x = shortcut + self.drop_path(attn_x.flatten(1, 2)) + conv_x * self.conv_scale
        return x + self.drop_path(self.mlp(self.norm2(x)))


class OverlappingCrossAttentionBlock(nn.Module):
    """HAT's OCAB: queries from ``w x w`` windows attend to keys/values of the enlarged, overlapping
    ``o x o`` windows (``o = w + int(overlap_ratio * w)``) centred on them, then an MLP."""

    def __init__(self, *, dim: int, window_size: int, overlap_ratio: float, num_heads: int, qkv_bias: bool,
                 qk_scale: Optional[float], mlp_ratio: float, fused_attention: bool = True) -> None:
        super().__init__()
        self.fused = fused_attention
        self.dim = dim
        self.window_size = window_size
        self.num_heads = num_heads
        self.scale = qk_scale or (dim // num_heads) ** -0.5
        self.overlap_win_size = int(window_size * overlap_ratio) + window_size
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.relative_position_bias_table = nn.Parameter(
            torch.zeros((window_size + self.overlap_win_size - 1) ** 2, num_heads))
        init_trunc_normal(self.relative_position_bias_table)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(in_features=dim, hidden_features=int(dim * mlp_ratio), act_layer=nn.GELU)

    def forward(self, x: torch.Tensor, x_size: Size2D, rpi: torch.Tensor) -> torch.Tensor:
        """
        Args:
            x: Tokens ``(B, H*W, C)``.
            x_size: ``(H, W)``.
            rpi: Relative position index ``(w*w, o*o)``.

        Returns:
            ``(B, H*W, C)``.
        """
        height, width = x_size
        ws, ows = self.window_size, self.overlap_win_size
        shortcut = x
        qkv = self.qkv(self.norm1(x)).view(x.shape[0], height, width, 3 * self.dim)
        q, k, v = qkv.chunk(3, dim=-1)
        q = rearrange(window_partition(q, ws), 'b n (h d) -> b h n d', h=self.num_heads)
        kv = rearrange(torch.cat((k, v), dim=-1), 'b h w c -> b c h w')
        kv = F.unfold(kv, kernel_size=ows, stride=ws, padding=(ows - ws) // 2)
        k, v = rearrange(kv, 'b (two h d ow) nw -> two (b nw) h ow d', two=2, h=self.num_heads, ow=ows * ows)
        bias = self.relative_position_bias_table[rpi.reshape(-1)].reshape(ws * ws, ows * ows, -1)
        out = scaled_attention(q, k, v, bias.permute(2, 0, 1).unsqueeze(0), self.scale, 0.0, self.fused)
        x = window_reverse(rearrange(out, 'b h n d -> b n (h d)'), ws, height, width)
        x = self.proj(x.flatten(1, 2)) + shortcut
        return x + self.mlp(self.norm2(x))


class HybridAttentionGroupBody(nn.Module):
    """The attention part of a residual hybrid attention group: ``depth`` HABs (every second one with
    shifted windows) followed by one OCAB. With ``use_checkpoint`` each block is recomputed in backward
    (``torch.utils.checkpoint``) instead of keeping its activations."""

    def __init__(self, *, dim: int, depth: int, num_heads: int, window_size: int, shift_size: int,
                 compress_ratio: int, squeeze_factor: int, conv_scale: float, overlap_ratio: float,
                 mlp_ratio: float, qkv_bias: bool, qk_scale: Optional[float], drop: float, attn_drop: float,
                 drop_path: Tuple[float, ...], use_checkpoint: bool, fused_attention: bool = True) -> None:
        super().__init__()
        self.use_checkpoint = use_checkpoint
        self.blocks = nn.ModuleList([
            HybridAttentionBlock(
                dim=dim, num_heads=num_heads, window_size=window_size, shift_size=0 if i % 2 == 0 else shift_size,
                compress_ratio=compress_ratio, squeeze_factor=squeeze_factor, conv_scale=conv_scale,
                mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, qk_scale=qk_scale, drop=drop, attn_drop=attn_drop,
                drop_path=drop_path[i], fused_attention=fused_attention)
            for i in range(depth)
        ])
        self.overlap_attn = OverlappingCrossAttentionBlock(
            dim=dim, window_size=window_size, overlap_ratio=overlap_ratio, num_heads=num_heads, qkv_bias=qkv_bias,
            qk_scale=qk_scale, mlp_ratio=mlp_ratio, fused_attention=fused_attention)

    def _run(self, block: nn.Module, *args) -> torch.Tensor:
        if self.use_checkpoint and self.training and torch.is_grad_enabled():
            return checkpoint(block, *args, use_reentrant=False)
        return block(*args)

    def forward(self, x: torch.Tensor, x_size: Size2D, rpi_sa: torch.Tensor, rpi_oca: torch.Tensor,
                attn_mask: torch.Tensor) -> torch.Tensor:
        """``(B, H*W, C)`` -> ``(B, H*W, C)``."""
        for block in self.blocks:
            x = self._run(block, x, x_size, rpi_sa, attn_mask)
        return self._run(self.overlap_attn, x, x_size, rpi_oca)


class ResidualHybridAttentionGroup(nn.Module):
    """HAT's RHAG: ``x + conv(attention_body(x))`` with a 3x3 conv (``resi_connection='1conv'``) or
    nothing (``'identity'``) on the image layout."""

    def __init__(self, *, dim: int, depth: int, num_heads: int, window_size: int, shift_size: int,
                 compress_ratio: int, squeeze_factor: int, conv_scale: float, overlap_ratio: float,
                 mlp_ratio: float, qkv_bias: bool, qk_scale: Optional[float], drop: float, attn_drop: float,
                 drop_path: Tuple[float, ...], use_checkpoint: bool, resi_connection: str,
                 fused_attention: bool = True) -> None:
        super().__init__()
        self.residual_group = HybridAttentionGroupBody(
            dim=dim, depth=depth, num_heads=num_heads, window_size=window_size, shift_size=shift_size,
            compress_ratio=compress_ratio, squeeze_factor=squeeze_factor, conv_scale=conv_scale,
            overlap_ratio=overlap_ratio, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, qk_scale=qk_scale, drop=drop,
            attn_drop=attn_drop, drop_path=drop_path, use_checkpoint=use_checkpoint, fused_attention=fused_attention)
        self.conv = nn.Conv2d(dim, dim, 3, 1, 1) if resi_connection == '1conv' else nn.Identity()

    def forward(self, x: torch.Tensor, x_size: Size2D, rpi_sa: torch.Tensor, rpi_oca: torch.Tensor,
                attn_mask: torch.Tensor) -> torch.Tensor:
        """``(B, H*W, C)`` -> ``(B, H*W, C)``."""
        y = self.residual_group(x, x_size, rpi_sa, rpi_oca, attn_mask)
        return image_to_tokens(self.conv(tokens_to_image(y, x_size))) + x


class PatchEmbed(nn.Module):
    """Image ``(B, C, H, W)`` -> tokens ``(B, H*W, C)``, optionally LayerNorm-ed. HAT's patch embedding
    never merges pixels: one token per pixel."""

    def __init__(self, embed_dim: int, norm: bool) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(embed_dim) if norm else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = image_to_tokens(x)
        return x if self.norm is None else self.norm(x)


class PatchUnEmbed(nn.Module):
    """Tokens ``(B, H*W, C)`` -> image ``(B, C, H, W)``."""

    def forward(self, x: torch.Tensor, x_size: Size2D) -> torch.Tensor:
        return tokens_to_image(x, x_size)
