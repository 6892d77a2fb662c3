"""Sparse dispatch of the heterogeneous expert bank against a dense masked reference of the same math."""
from typing import List

import pytest
import torch
import torch.nn.functional as F

from hmoe_arch.archs.experts import HeterogeneousMoE, MoEUpsampler, gather_neighbourhoods
from hmoe_arch.archs.routing import ROUTING_GRAD_MODES

UNEVEN = [(1, 2), (3, 3), (5, 2)]


def spread(moe: HeterogeneousMoE) -> None:
    """Gates with the spread of a trained router, so that a small input reaches every expert."""
    for name, param in moe.gate.named_parameters():
        if name.endswith('bias'):
            torch.nn.init.zeros_(param)
        else:
            torch.nn.init.normal_(param, std=0.1 if 'embedding' in name else 3.0)


def grads(tensors: List[torch.Tensor]) -> List[torch.Tensor]:
    out = [t.grad.clone() for t in tensors]
    for t in tensors:
        t.grad = None
    return out


@pytest.mark.parametrize('routing_kind', ['dual', 'single'])
@pytest.mark.parametrize('top_k', [1, 2])
def test_sparse_equals_dense_outputs_and_gradients(routing_kind: str, top_k: int) -> None:
    moe = HeterogeneousMoE(3, 2, 6, UNEVEN, top_k, routing_kind, 'straight_through')
    spread(moe)
    x = torch.randn(2, 3, 8, 7, requires_grad=True)
    features = torch.randn(2, 6, 8, 7, requires_grad=True)
    out = F.pixel_shuffle(moe(x, features), 2)
    assert out.shape == (2, 3, 16, 14)
    assert set(moe.last_routing.expert.flatten().tolist()) == set(range(7)), 'precondition: all experts used'

    upstream = torch.randn_like(out)
    params = list(moe.parameters())
    (out * upstream).sum().backward()
    sparse_grads = grads([x, features] + params)

    routing = moe.gate(features.permute(0, 2, 3, 1).reshape(-1, 6))
    dense = F.pixel_shuffle(moe.dense_dispatch(x, routing).view(2, 8, 7, 12).permute(0, 3, 1, 2), 2)
    torch.testing.assert_close(out, dense, atol=1e-5, rtol=1e-5)
    (dense * upstream).sum().backward()
    dense_grads = grads([x, features] + params)
    names = ['x', 'routing_features'] + [n for n, _ in moe.named_parameters()]
    for name, sparse_grad, dense_grad in zip(names, sparse_grads, dense_grads):
        torch.testing.assert_close(sparse_grad, dense_grad, atol=1e-5, rtol=1e-5, msg=name)
    gate_grads = [g for n, g in zip(names, sparse_grads) if n.startswith('gate.')]
    assert all(g.abs().sum() > 0 for g in gate_grads)


def test_top1_weights_are_exactly_one_so_outputs_equal_the_selected_expert() -> None:
    moe = HeterogeneousMoE(2, 3, 4, [(1, 3), (3, 3)], 1, 'dual')
    spread(moe)
    x, features = torch.randn(1, 2, 5, 5), torch.randn(1, 4, 5, 5)
    out = F.pixel_shuffle(moe(x, features), 3)
    assert torch.equal(moe.last_routing.weight, torch.ones(25, 1))
    maps = moe.routing_maps()
    for y in range(5):
        for col in range(5):
            expert = moe.experts[int(maps['expert'][0, y, col, 0])]
            block = F.pixel_shuffle(expert(x), 3)[0, :, 3 * y:3 * y + 3, 3 * col:3 * col + 3]
            torch.testing.assert_close(out[0, :, 3 * y:3 * y + 3, 3 * col:3 * col + 3], block, atol=1e-6, rtol=1e-6)


def test_gather_neighbourhoods_equals_unfold() -> None:
    x = torch.randn(2, 3, 4, 5)
    pixels = torch.tensor([0, 7, 19, 20, 39])
    for k in (1, 3, 5):
        reference = F.unfold(x, k, padding=k // 2).permute(0, 2, 1).reshape(40, -1)[pixels]
        torch.testing.assert_close(gather_neighbourhoods(x, pixels, k), reference)


@pytest.mark.parametrize('kernel_size', [1, 3, 5])
def test_gather_neighbourhoods_gradient_equals_unfolds_with_repeated_pixels(kernel_size: int) -> None:
    """The folded gradient of the rows equals autograd's through ``F.unfold``, also where a pixel is gathered
    twice (top-2 routing within a group) and at the borders, in every image of the batch."""
    x = torch.randn(2, 3, 4, 5, requires_grad=True)
    pixels = torch.tensor([0, 7, 7, 19, 20, 39, 39, 4])
    upstream = torch.randn(len(pixels), 3 * kernel_size ** 2)
    (gather_neighbourhoods(x, pixels, kernel_size) * upstream).sum().backward()
    ours, x.grad = x.grad, None
    columns = F.unfold(x, kernel_size, padding=kernel_size // 2).permute(0, 2, 1).reshape(40, -1)
    (columns[pixels] * upstream).sum().backward()
    torch.testing.assert_close(ours, x.grad, atol=1e-6, rtol=1e-6)
    assert ours[1].abs().sum() > 0 and ours[0].abs().sum() > 0


def test_experts_unused_by_the_batch_get_no_gradient_and_cost_nothing() -> None:
    moe = HeterogeneousMoE(4, 2, 4, [(1, 2), (3, 2)], 1, 'dual')
    with torch.no_grad():
        moe.gate.w_group_gate.bias.copy_(torch.tensor([100.0, -100.0]))
        moe.gate.w_expert_gates[0].bias.copy_(torch.tensor([100.0, -100.0]))
    moe(torch.randn(1, 4, 4, 4), torch.randn(1, 4, 4, 4)).sum().backward()
    assert moe.last_routing.expert.unique().tolist() == [0]
    assert moe.experts[0].weight.grad.abs().sum() > 0
    assert all(moe.experts[i].weight.grad is None for i in (1, 2, 3))


def test_upsampler_pixel_shuffles_and_keeps_the_authors_key_layout() -> None:
    up = MoEUpsampler(3, 4, 4, [(1, 2), (3, 2)], 1, 'dual')
    assert up(torch.randn(2, 4, 5, 6), torch.randn(2, 4, 5, 6)).shape == (2, 4, 15, 18)
    keys = set(up.state_dict())
    assert {'0.experts.0.weight', '0.experts.3.bias', '0.gate.w_group_gate.weight', '0.gate.w_expert_gates.1.bias',
            '0.gate.group_embedding.weight'} <= keys
    assert up.state_dict()['0.experts.2.weight'].shape == (36, 4, 3, 3)


@pytest.mark.parametrize('top_k', [1, 2])
def test_upsampler_gradients_equal_pixel_shuffles_own(top_k: int) -> None:
    """The upsampler's training backward (the HR gradient read straight into the experts' row layout) gives the
    gradients that ``nn.PixelShuffle``'s own backward gives, for every input and parameter; eval mode takes
    ``nn.PixelShuffle`` itself, with the same output."""
    torch.manual_seed(0)
    up = MoEUpsampler(3, 4, 5, UNEVEN, top_k, 'dual', 'straight_through')
    spread(up.moe)
    x = torch.randn(2, 4, 6, 5, requires_grad=True)
    features = torch.randn(2, 5, 6, 5, requires_grad=True)
    upstream = torch.randn(2, 4, 18, 15)
    inputs = [x, features] + list(up.parameters())
    out = up(x, features)
    (out * upstream).sum().backward()
    ours = grads(inputs)
    reference = up[1](up.moe(x, features))
    torch.testing.assert_close(out, reference, rtol=0, atol=0)
    (reference * upstream).sum().backward()
    theirs = grads(inputs)
    names = ['x', 'routing_features'] + [n for n, _ in up.named_parameters()]
    for name, a, b in zip(names, ours, theirs):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6, msg=name)
    assert ours[0].abs().sum() > 0 and ours[1].abs().sum() > 0
    with torch.no_grad():
        torch.testing.assert_close(up(x, features), reference, rtol=0, atol=0)


def test_routing_maps_of_the_last_forward() -> None:
    moe = HeterogeneousMoE(4, 2, 4, [(1, 2), (3, 2)], 2, 'dual')
    with pytest.raises(RuntimeError, match='no forward'):
        moe.routing_maps()
    moe(torch.randn(3, 4, 2, 5), torch.randn(3, 4, 2, 5))
    maps = moe.routing_maps()
    assert maps['group'].shape == (3, 2, 5) and maps['expert'].shape == (3, 2, 5, 2)
    assert torch.equal(maps['expert'] // 2, maps['group'].unsqueeze(-1).expand(-1, -1, -1, 2))
    torch.testing.assert_close(maps['weight'].sum(-1), torch.ones(3, 2, 5))
    assert not maps['weight'].requires_grad


@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize('routing', ['dual', 'single'])
def test_a_network_cast_to_another_dtype_routes_in_float32_or_wider(dtype: torch.dtype, routing: str) -> None:
    torch.manual_seed(0)
    moe = HeterogeneousMoE(4, 2, 4, [(1, 2), (3, 2)], 1, routing).eval()
    with torch.no_grad():  # routers and features exact in bfloat16: every dtype must take the float32 decisions
        for p in moe.gate.parameters():
            p.copy_(p.bfloat16().float())
    x, features = torch.randn(2, 4, 3, 5), torch.randn(2, 4, 3, 5).bfloat16().float()
    with torch.no_grad():
        expected = moe(x, features)
        wanted = moe.last_routing.expert.clone()
        out = moe.to(dtype)(x.to(dtype), features.to(dtype))
    assert out.dtype == dtype and next(moe.gate.parameters()).dtype == dtype
    assert moe.last_routing.weight.dtype == torch.promote_types(dtype, torch.float32)
    assert torch.equal(moe.last_routing.expert, wanted)
    torch.testing.assert_close(out.float(), expected, atol=5e-2 if dtype == torch.bfloat16 else 5e-3, rtol=0)


def test_centered_routing_features_follow_a_running_mean_in_training_only() -> None:
    from hmoe_arch.archs.experts import CENTER_MOMENTUM, HeterogeneousMoE

    torch.manual_seed(0)
    moe = HeterogeneousMoE(4, 2, 6, [(1, 2), (3, 2)], top_k=1, routing='dual', routing_norm='center')
    rows = torch.randn(50, 6) + 5.0
    moe.eval()
    torch.testing.assert_close(moe.centered_rows(rows), rows)  # nothing learnt yet: zero mean, frozen in eval
    moe.train()
    first = moe.centered_rows(rows)
    torch.testing.assert_close(moe.feature_mean, rows.mean(0))  # the first batch as it is
    torch.testing.assert_close(first, rows - rows.mean(0))
    other = torch.randn(30, 6)
    moe.centered_rows(other)
    torch.testing.assert_close(moe.feature_mean, rows.mean(0) + CENTER_MOMENTUM * (other.mean(0) - rows.mean(0)))
    assert int(moe.feature_batches) == 2
    moe.eval()
    frozen = moe.feature_mean.clone()
    moe.centered_rows(other)
    assert torch.equal(moe.feature_mean, frozen)


def test_the_bank_hands_its_routing_grad_record_to_the_routers_and_switches_both() -> None:
    moe = HeterogeneousMoE(4, 2, 4, [(1, 2), (3, 2)], 1, 'dual', 'centered')
    assert moe.routing_grad is ROUTING_GRAD_MODES['centered'] and moe.gate.routing_grad is moe.routing_grad
    x, features = torch.randn(1, 4, 3, 3), torch.randn(1, 4, 3, 3, requires_grad=True)
    moe(x, features)
    assert moe.aux_loss().requires_grad  # routers with autograd
    moe.set_routing_grad('none')
    assert moe.routing_grad is ROUTING_GRAD_MODES['none'] and moe.gate.routing_grad is moe.routing_grad
    out = moe(x, features)
    assert not moe.aux_loss().requires_grad  # routers without autograd: no gradient reaches them or the features
    out.sum().backward()
    assert features.grad is None and all(p.grad is None for p in moe.gate.parameters())
    assert any(expert.weight.grad is not None for expert in moe.experts)  # the experts still learn


def test_an_unknown_routing_grad_is_rejected_by_name() -> None:
    message = r"^HeterogeneousMoE: `routing_grad` must be one of \('none', .*\), got 'reinforce'$"
    with pytest.raises(ValueError, match=message):
        HeterogeneousMoE(4, 2, 4, [(1, 2)], 1, 'single', 'reinforce')
    moe = HeterogeneousMoE(4, 2, 4, [(1, 2)], 1, 'single', 'isolated')
    with pytest.raises(ValueError, match=message):
        moe.set_routing_grad('reinforce')
    assert moe.routing_grad is moe.gate.routing_grad is ROUTING_GRAD_MODES['isolated']  # unchanged
