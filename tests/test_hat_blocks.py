"""HAT building blocks against brute-force computations of the same definitions."""
import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from hmoe_arch.archs import hat_blocks
from hmoe_arch.archs.hat_blocks import (
    SHIFT_MASK_VALUE,
    OverlappingCrossAttentionBlock,
    PatchEmbed,
    PatchUnEmbed,
    ResidualHybridAttentionGroup,
    WindowAttention,
    image_to_tokens,
    init_trunc_normal,
    relative_position_index_overlap,
    relative_position_index_self,
    scaled_attention,
    shifted_window_mask,
    tokens_to_image,
    window_partition,
    window_reverse,
)


def test_window_partition_layout_and_round_trip() -> None:
    x = torch.arange(2 * 4 * 6 * 3, dtype=torch.float32).view(2, 4, 6, 3)
    windows = window_partition(x, 2)
    assert windows.shape == (2 * 2 * 3, 4, 3)
    assert torch.equal(windows[1], x[0, 0:2, 2:4].reshape(4, 3))
    assert torch.equal(windows[6 + 4], x[1, 2:4, 2:4].reshape(4, 3))
    assert torch.equal(window_reverse(windows, 2, 4, 6), x)


def test_truncated_normal_init_fills_real_tensors_and_skips_meta_ones(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    weight = torch.zeros(200, 100)
    init_trunc_normal(weight)
    assert weight.std().item() == pytest.approx(0.02, rel=0.05) and weight.abs().max().item() < 0.1
    calls = []
    monkeypatch.setattr(hat_blocks, 'trunc_normal_', lambda tensor, std: calls.append(tensor.device.type))
    init_trunc_normal(torch.empty(3, 4, device='meta'))
    init_trunc_normal(torch.empty(3, 4))
    assert calls == ['cpu']


def test_tokens_round_trip() -> None:
    x = torch.rand(2, 5, 3, 4)
    assert torch.equal(tokens_to_image(image_to_tokens(x), (3, 4)), x)
    assert torch.equal(image_to_tokens(x)[:, 4 + 1], x[:, :, 1, 1])
    assert torch.equal(PatchUnEmbed()(PatchEmbed(5, norm=False)(x), (3, 4)), x)


def test_relative_position_index_self_brute_force() -> None:
    w = 3
    rpi = relative_position_index_self(w)
    for i in range(w * w):
        for j in range(w * w):
            dy, dx = i // w - j // w, i % w - j % w
            assert rpi[i, j] == (dy + w - 1) * (2 * w - 1) + (dx + w - 1)


def test_relative_position_index_overlap_brute_force() -> None:
    w, o = 2, 4
    rpi = relative_position_index_overlap(w, o)
    assert rpi.shape == (w * w, o * o)
    for i in range(w * w):
        for j in range(o * o):
            dy, dx = j // o - i // w, j % o - i % w
            assert rpi[i, j] == (dy + w - o + 1) * (w + o - 1) + (dx + w - o + 1)
    # HAT's offset leaves some indices negative; they wrap around the table and every entry is used once
    assert torch.equal((rpi % (w + o - 1) ** 2).unique(), torch.arange((w + o - 1) ** 2))


def test_shifted_window_mask_separates_wrapped_regions() -> None:
    mask = shifted_window_mask(8, 8, 4, 2)
    assert mask.shape == (4, 16, 16)
    assert torch.equal(mask[0], torch.zeros(16, 16))
    last = mask[3]
    assert set(last.unique().tolist()) == {SHIFT_MASK_VALUE, 0.0}
    assert last[0, 0] == 0 and last[0, 2] == SHIFT_MASK_VALUE and last[0, 8] == SHIFT_MASK_VALUE and last[0, 1] == 0


def _hat_mask(height: int, width: int, window_size: int, shift_size: int) -> torch.Tensor:
    """HAT's own mask value, -100, where ours has SHIFT_MASK_VALUE."""
    mask = shifted_window_mask(height, width, window_size, shift_size)
    return mask.masked_fill(mask != 0, -100.0)


def test_masked_attention_weights_are_exactly_zero_and_match_hats_mask(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    attn = WindowAttention(dim=16, window_size=4, num_heads=2)
    rpi = relative_position_index_self(4)
    x = torch.randn(2 * 4, 16, 16, requires_grad=True)
    ours = shifted_window_mask(8, 8, 4, 2)
    probabilities = {}
    dropout = F.dropout

    def keep(tensor, *args, **kwargs):  # the explicit path's dropout sees the probabilities (B * nW, h, N, N)
        if tensor.dim() == 4:
            probabilities['p'] = tensor
        return dropout(tensor, *args, **kwargs)

    monkeypatch.setattr(F, 'dropout', keep)
    out = attn(x, rpi, ours)
    # HAT's -100 leaves probabilities of about exp(-100), subnormal floats the CPU multiplies slowly; ours are 0
    masked = (ours != 0).unsqueeze(1).repeat(2, 2, 1, 1)
    assert torch.equal(probabilities['p'][masked], torch.zeros(int(masked.sum())))
    (grad_ours,) = torch.autograd.grad(out.square().sum(), [attn.relative_position_bias_table])
    hat = attn(x, rpi, _hat_mask(8, 8, 4, 2))
    hat_p = probabilities['p'][masked]
    assert 0 < hat_p.abs().max() < torch.finfo(torch.float32).tiny
    (grad_hat,) = torch.autograd.grad(hat.square().sum(), [attn.relative_position_bias_table])
    torch.testing.assert_close(out, hat, rtol=0, atol=1e-6)
    torch.testing.assert_close(grad_ours, grad_hat, rtol=1e-5, atol=1e-6)


def test_window_attention_matches_brute_force() -> None:
    attn = WindowAttention(dim=8, window_size=2, num_heads=2)
    x = torch.rand(3, 4, 8)
    rpi = relative_position_index_self(2)
    mask = torch.zeros(3, 4, 4)
    mask[1, 0, 3] = -100.0
    out = attn(x, rpi, mask)
    q, k, v = attn.qkv(x).view(3, 4, 3, 2, 4).permute(2, 0, 3, 1, 4)
    expected = torch.empty(3, 4, 8)
    for b in range(3):
        for h in range(2):
            scores = q[b, h] @ k[b, h].T / 2.0
            for i in range(4):
                for j in range(4):
                    scores[i, j] += attn.relative_position_bias_table[rpi[i, j], h] + mask[b, i, j]
            expected[b, :, h * 4:(h + 1) * 4] = scores.softmax(-1) @ v[b, h]
    torch.testing.assert_close(out, attn.proj(expected))


def test_overlapping_cross_attention_matches_brute_force() -> None:
    block = OverlappingCrossAttentionBlock(dim=4, window_size=2, overlap_ratio=1.0, num_heads=1, qkv_bias=True,
                                           qk_scale=None, mlp_ratio=2.0)
    height, width = 4, 4
    x = torch.rand(1, height * width, 4)
    rpi = relative_position_index_overlap(2, 4)
    out = block(x, (height, width), rpi)
    q, k, v = block.qkv(block.norm1(x)).view(height, width, 12).split(4, dim=-1)
    # the 4x4 window around a 2x2 query window reaches one pixel beyond it on each side (zero padding)
    k_pad = F.pad(k.permute(2, 0, 1), (1, 1, 1, 1)).permute(1, 2, 0)
    v_pad = F.pad(v.permute(2, 0, 1), (1, 1, 1, 1)).permute(1, 2, 0)
    attn_out = torch.empty(height, width, 4)
    for wy in range(2):
        for wx in range(2):
            queries = q[2 * wy:2 * wy + 2, 2 * wx:2 * wx + 2].reshape(4, 4)
            keys = k_pad[2 * wy:2 * wy + 4, 2 * wx:2 * wx + 4].reshape(16, 4)
            values = v_pad[2 * wy:2 * wy + 4, 2 * wx:2 * wx + 4].reshape(16, 4)
            scores = queries @ keys.T / 2.0 + block.relative_position_bias_table[rpi, 0]
            attn_out[2 * wy:2 * wy + 2, 2 * wx:2 * wx + 2] = (scores.softmax(-1) @ values).view(2, 2, 4)
    y = block.proj(attn_out.view(1, -1, 4)) + x
    torch.testing.assert_close(out, y + block.mlp(block.norm2(y)))


def test_residual_group_is_a_residual() -> None:
    group = ResidualHybridAttentionGroup(dim=8, depth=2, num_heads=2, window_size=2, shift_size=1, compress_ratio=2,
                                         squeeze_factor=2, conv_scale=0.01, overlap_ratio=1.0, mlp_ratio=2.0,
                                         qkv_bias=True, qk_scale=None, drop=0.0, attn_drop=0.0, drop_path=(0.0, 0.0),
                                         use_checkpoint=False, resi_connection='1conv')
    with pytest.raises(TypeError):  # blocks are built with keywords only
        ResidualHybridAttentionGroup(8, 2, 2, 2, 1, 2, 2, 0.01, 1.0, 2.0, True, None, 0.0, 0.0, (0.0, 0.0), False,
                                     '1conv')
    x = torch.rand(2, 16, 8)
    torch.nn.init.zeros_(group.conv.weight)
    torch.nn.init.zeros_(group.conv.bias)
    assert torch.equal(group(x, (4, 4), relative_position_index_self(2), relative_position_index_overlap(2, 4),
                             shifted_window_mask(4, 4, 2, 1)), x)


@pytest.mark.parametrize('bias_grad', [True, False], ids=['bias-grad', 'fixed-bias'])
@pytest.mark.parametrize('windows_per_image', [1, 2, 6])
@pytest.mark.parametrize('head_dim', [30, 32])
def test_both_attention_paths_match_a_per_row_computation(head_dim: int, windows_per_image: int,
                                                          bias_grad: bool) -> None:
    # 6 windows = 6 / G images of G windows each; window i takes bias[i % G] (its shift mask) in both paths;
    # with a fixed bias the fused path runs PyTorch's kernel, with a learnt one the explicit computation
    tensors = [torch.randn(6, 3, 16, head_dim, requires_grad=True) for _ in range(3)]
    bias = torch.randn(1, 3, 16, 16, requires_grad=bias_grad)
    mask = torch.zeros(windows_per_image, 1, 16, 16)
    mask[::2, :, :, 8:] = -100.0
    q, k, v = tensors
    inputs = tensors + [bias] * bias_grad
    rows = [((q[i] * head_dim ** -0.5) @ k[i].transpose(-2, -1) + bias[0] + mask[i % windows_per_image]
             ).softmax(-1) @ v[i] for i in range(6)]
    expected = torch.stack(rows)
    upstream = torch.linspace(-1, 1, expected.numel()).view_as(expected)
    expected_grads = torch.autograd.grad((expected * upstream).sum(), inputs)
    for fused in (False, True):
        out = scaled_attention(*tensors, bias + mask, head_dim ** -0.5, 0.0, fused)
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
        grads = torch.autograd.grad((out * upstream).sum(), inputs)
        for grad, expected_grad in zip(grads, expected_grads):
            torch.testing.assert_close(grad, expected_grad, atol=1e-5, rtol=1e-5)


def test_the_fused_kernel_is_skipped_on_the_cpu_where_the_bias_needs_a_gradient(
        monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    kernel = F.scaled_dot_product_attention
    monkeypatch.setattr(F, 'scaled_dot_product_attention', lambda *a, **k: calls.append(1) or kernel(*a, **k))
    q, k, v = (torch.randn(2, 2, 16, 8, requires_grad=True) for _ in range(3))
    learnt, fixed = torch.randn(1, 2, 16, 16, requires_grad=True), torch.randn(1, 2, 16, 16)
    scaled_attention(q, k, v, learnt, 0.3, 0.0, True)  # training: PyTorch would fall back to an unfused path
    assert calls == []
    with torch.no_grad():  # inference
        scaled_attention(q, k, v, learnt, 0.3, 0.0, True)
    scaled_attention(q, k, v, fixed, 0.3, 0.0, True)  # gradients for q, k, v only: the kernel has them
    assert calls == [1, 1]
    scaled_attention(q, k, v, fixed, 0.3, 0.0, False)
    assert calls == [1, 1]


@pytest.mark.parametrize('head_dim', [30, 32])
def test_fused_attention_takes_the_fused_kernel_for_strided_keys(head_dim: int) -> None:
    # OCAB's keys and values come out of F.unfold with the head dimension strided; the math fallback would
    # store the probabilities, so the fused path must hand the kernel a unit-stride head dimension
    q = torch.randn(4, 2, 16, head_dim)
    k, v = (torch.randn(4, 2, head_dim, 36).transpose(-2, -1) for _ in range(2))
    bias = torch.randn(1, 2, 16, 36)
    assert k.stride(-1) != 1
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):  # raises if the inputs do not qualify for it
        fused = scaled_attention(q, k, v, bias, head_dim ** -0.5, 0.0, True)
    torch.testing.assert_close(fused, scaled_attention(q, k, v, bias, head_dim ** -0.5, 0.0, False),
                               atol=1e-5, rtol=1e-5)


def test_attention_dropout_only_in_training() -> None:
    attn = WindowAttention(dim=8, window_size=2, num_heads=2, attn_drop=0.5)
    x, rpi = torch.rand(4, 4, 8), relative_position_index_self(2)
    attn.train()
    assert not torch.allclose(attn(x, rpi), attn(x, rpi))
    attn.eval()
    assert torch.equal(attn(x, rpi), attn(x, rpi))
