"""Routers: selection rule (eq. 5-7), straight-through weights, gradients, load-balancing loss."""
import pytest
import torch

from hmoe_arch.archs.routing import DualRouter, SingleRouter, balance_loss, selection_weight


def test_dual_routing_selects_top_group_then_top_expert_of_that_group() -> None:
    router = DualRouter(6, [3, 2, 4], top_k=1)
    x = torch.randn(50, 6)
    routing = router(x)
    group_probs = router.w_group_gate(x).softmax(-1)
    assert torch.equal(routing.group, group_probs.argmax(-1))
    offsets = [0, 3, 5]
    for n in range(50):
        g = int(routing.group[n])
        probs = router.w_expert_gates[g](x[n] + router.group_embedding.weight[g]).softmax(-1)
        assert int(routing.expert[n, 0]) == offsets[g] + int(probs.argmax())
        torch.testing.assert_close(routing.expert_probs[n, :len(probs)], probs)
        assert torch.all(routing.expert_probs[n, len(probs):] == 0)


def test_straight_through_weight_is_exactly_one_with_the_gradient_of_log_p() -> None:
    p = torch.tensor([[0.3], [0.9]], requires_grad=True)
    w = selection_weight(p)
    assert torch.equal(w, torch.ones(2, 1))
    w.sum().backward()
    torch.testing.assert_close(p.grad, 1 / p.detach())


def test_centered_weight_is_one_with_the_mean_of_the_upstream_gradient_removed() -> None:
    p = torch.tensor([[0.25], [0.5], [0.8]], requires_grad=True)
    w = selection_weight(p, centered=True)
    assert torch.equal(w, torch.ones(3, 1))
    upstream = torch.tensor([[3.0], [-1.0], [1.0]])
    (w * upstream).sum().backward()
    torch.testing.assert_close(p.grad, (upstream - 1.0) / p.detach())


def test_top_k_weights_are_renormalised_probabilities() -> None:
    router = DualRouter(4, [4, 4], top_k=2)
    routing = router(torch.randn(10, 4))
    top = routing.expert_probs.gather(1, routing.choice)
    torch.testing.assert_close(routing.weight, top / top.sum(-1, keepdim=True))


def test_group_embedding_changes_expert_choice_and_gets_gradient() -> None:
    router = DualRouter(4, [3, 3], top_k=1)
    x = torch.randn(200, 4)
    routing = router(x)
    (routing.weight.sum() + router.aux_loss(routing)).backward()
    for name, param in router.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name


def test_single_router_is_one_flat_softmax() -> None:
    router = SingleRouter(5, [2, 3], top_k=2)
    x = torch.randn(20, 5)
    routing = router(x)
    probs = router.w_gate(x).softmax(-1)
    assert torch.equal(routing.expert, probs.topk(2, dim=-1).indices)
    assert torch.equal(routing.group, (routing.expert[:, 0] >= 2).long())
    torch.testing.assert_close(routing.group_probs, torch.stack([probs[:, :2].sum(-1), probs[:, 2:].sum(-1)], -1))


def test_balance_loss_is_one_when_uniform_and_larger_when_collapsed() -> None:
    uniform = torch.full((8, 4), 0.25)
    assert balance_loss(uniform, torch.arange(8).remainder(4).unsqueeze(1)).item() == pytest.approx(1.0)
    collapsed = torch.tensor([[0.97, 0.01, 0.01, 0.01]]).repeat(8, 1)
    assert balance_loss(collapsed, torch.zeros(8, 1, dtype=torch.long)).item() == pytest.approx(4 * 0.97)


def test_dual_aux_loss_weights_each_group_by_its_share() -> None:
    router = DualRouter(3, [2, 2], top_k=1)
    routing = router(torch.randn(64, 3))
    expected = balance_loss(routing.group_probs, routing.group.unsqueeze(1))
    for g in range(2):
        members = routing.group == g
        if members.any():
            expected = expected + members.float().mean() * balance_loss(routing.expert_probs[members, :2],
                                                                        routing.choice[members])
    torch.testing.assert_close(router.aux_loss(routing), expected)
