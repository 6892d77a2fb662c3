"""Routers: selection rule (eq. 5-7), straight-through weights, gradients, routing_grad records, load-balancing
loss."""
import pytest
import torch

from hmoe_arch.archs.routing import (
    ROUTING_GRAD_MODES,
    ROUTING_GRADS,
    DualRouter,
    RoutingGrad,
    SingleRouter,
    balance_loss,
    centered_straight_through,
    routing_grad_mode,
    selection_weight,
    straight_through,
)


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
    w = selection_weight(p, centered_straight_through)
    assert torch.equal(w, torch.ones(3, 1))
    upstream = torch.tensor([[3.0], [-1.0], [1.0]])
    (w * upstream).sum().backward()
    torch.testing.assert_close(p.grad, (upstream - 1.0) / p.detach())


# ------------------------------------------------------------------------------------------------------
# routing_grad records
def test_every_routing_grad_value_has_its_record() -> None:
    fields = {name: (mode.name, mode.learns, mode.stops_at_backbone, mode.top1_weight)
              for name, mode in ROUTING_GRAD_MODES.items()}
    assert fields == {
        'none': ('none', False, False, straight_through),
        'straight_through': ('straight_through', True, False, straight_through),
        'isolated': ('isolated', True, True, straight_through),
        'centered': ('centered', True, True, centered_straight_through),
    }
    assert ROUTING_GRADS == ('none', 'straight_through', 'isolated', 'centered')  # the order error messages list


def test_routing_grad_mode_returns_the_record_and_rejects_anything_else() -> None:
    assert all(routing_grad_mode(name) is ROUTING_GRAD_MODES[name] for name in ROUTING_GRADS)
    with pytest.raises(ValueError, match=r"^DualRouter: `routing_grad` must be one of \('none', 'straight_through', "
                                         r"'isolated', 'centered'\), got 'reinforce'$"):
        routing_grad_mode('reinforce', 'DualRouter')
    with pytest.raises(ValueError, match=r"^routing_grad_mode: `routing_grad` must be one of .*, got \['none'\]$"):
        routing_grad_mode(['none'])
    with pytest.raises(AttributeError):
        ROUTING_GRAD_MODES['none'].learns = True  # frozen: a record cannot drift from its name


@pytest.mark.parametrize('router_type', [DualRouter, SingleRouter])
def test_routers_weight_top1_selections_with_the_function_of_their_record(router_type) -> None:
    assert router_type(4, [2, 3], 1).routing_grad is ROUTING_GRAD_MODES['straight_through']
    torch.manual_seed(0)
    plain = router_type(4, [2, 3], 1)
    centered = router_type(4, [2, 3], 1, routing_grad=ROUTING_GRAD_MODES['centered'])
    centered.load_state_dict(plain.state_dict())
    x = torch.randn(40, 4)
    upstream = torch.randn(40, 1)
    routings = [plain(x), centered(x)]
    assert all(torch.equal(routing.weight, torch.ones(40, 1)) for routing in routings)
    # centered: the straight-through gradient of the upstream gradient minus its batch mean (each factor is 1)
    (routings[0].weight * (upstream - upstream.mean())).sum().backward()
    (routings[1].weight * upstream).sum().backward()
    for (name, expected), (_, got) in zip(plain.named_parameters(), centered.named_parameters()):
        torch.testing.assert_close(got.grad, expected.grad, msg=name)
    assert not all(torch.equal(p.grad, torch.zeros_like(p)) for p in centered.parameters())


def test_a_new_record_changes_the_routers_without_touching_them() -> None:
    doubled = RoutingGrad('doubled', learns=True, stops_at_backbone=True, top1_weight=lambda p: 2 * p / p.detach())
    router = SingleRouter(3, [2, 2], 1, routing_grad=doubled)
    assert torch.equal(router(torch.randn(5, 3)).weight, torch.full((5, 1), 2.0))


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


# ------------------------------------------------------------------------------------------------------
# balance: bias (loss-free balancing)
def test_bias_changes_the_selection_but_not_the_combination_weights() -> None:
    torch.manual_seed(3)
    plain = DualRouter(6, [3, 4], top_k=2)
    biased = DualRouter(6, [3, 4], top_k=2, balance='bias').eval()
    biased.load_state_dict(plain.state_dict())  # zero biases filled in: the same decisions
    x = torch.randn(200, 6)
    before = plain(x)
    same = biased(x)
    assert torch.equal(same.group, before.group) and torch.equal(same.expert, before.expert)
    biased.group_bias.copy_(torch.tensor([0.0, 2.0]))  # every pixel to group 1
    biased.expert_bias[1].copy_(torch.tensor([0.0, 0.0, 5.0, 4.0]))  # and to its experts 2 and 3
    routing = biased(x)
    assert torch.all(routing.group == 1) and torch.equal(routing.expert, torch.tensor([[5, 6]]).expand(200, 2))
    probs = routing.expert_probs[:, [2, 3]]  # unbiased probabilities of the selected experts, renormalised
    group_probs = routing.group_probs[:, 1:2]
    torch.testing.assert_close(routing.weight, probs / probs.sum(-1, keepdim=True) * (group_probs / group_probs))
    assert torch.all(routing.expert_probs[:, 4:] == 0)  # the padding column of group 1 is never chosen


def test_bias_learns_in_training_mode_only_and_balances_a_collapsed_router() -> None:
    torch.manual_seed(0)
    router = DualRouter(4, [2, 3], top_k=1, balance='bias', balance_rate=0.05)
    with torch.no_grad():  # a common component decides every pixel: group 0, its expert 1
        router.w_group_gate.bias.copy_(torch.tensor([3.0, 0.0]))
        router.w_expert_gates[0].bias.copy_(torch.tensor([0.0, 3.0]))
    x = torch.randn(600, 4)
    router.eval()
    assert torch.all(router(x).expert[:, 0] == 1)
    assert torch.equal(router.group_bias, torch.zeros(2))  # frozen in eval mode
    router.train()
    first = router(x)
    load = torch.bincount(first.group, minlength=2).float() / 600
    torch.testing.assert_close(router.group_bias, 0.05 * (0.5 - load))  # b += rate * (1/n - load)
    for _ in range(400):
        router(x)
    router.eval()
    routing = router(x)
    groups = torch.bincount(routing.group, minlength=2).float() / 600
    experts = torch.bincount(routing.expert[:, 0], minlength=5).float() / 600
    assert groups.min() > 0.3 and (experts > 0.05).all(), (groups, experts)


def test_single_router_bias_balances_its_experts() -> None:
    torch.manual_seed(1)
    router = SingleRouter(4, [2, 2], top_k=1, balance='bias', balance_rate=0.01)
    with torch.no_grad():
        router.w_gate.bias.copy_(torch.tensor([4.0, 0.0, 0.0, 0.0]))
    x = torch.randn(400, 4)
    router.eval()
    assert (router(x).expert[:, 0] == 0).float().mean() > 0.9  # collapsed on expert 0
    router.train()
    for _ in range(600):
        router(x)
    router.eval()
    routing = router(x)
    assert (torch.bincount(routing.expert[:, 0], minlength=4) >= 90).all()
    torch.testing.assert_close(routing.weight, torch.ones(400, 1))


@pytest.mark.parametrize('router_type', [DualRouter, SingleRouter])
def test_bias_adapts_for_balance_until_forwards_then_stays_frozen(router_type) -> None:
    torch.manual_seed(2)
    router = router_type(4, [2, 2], top_k=1, balance='bias', balance_rate=0.02, balance_until=3).train()
    x = torch.randn(300, 4)
    history = []
    for _ in range(6):
        router(x)
        history.append({name: router.state_dict()[name].clone() for name in router.balance_state_names()})
    assert [int(state['balance_updates']) for state in history] == [1, 2, 3, 3, 3, 3]
    for name in ('expert_bias',) + (('group_bias',) if router_type is DualRouter else ()):
        assert not torch.equal(history[1][name], history[2][name])  # the third forward still updates
        for later in history[3:]:
            assert torch.equal(later[name], history[2][name]), name  # frozen from the fourth on
    resumed = router_type(4, [2, 2], top_k=1, balance='bias', balance_rate=0.02, balance_until=3).train()
    resumed.load_state_dict(router.state_dict(), strict=True)
    resumed(x)
    assert torch.equal(resumed.expert_bias, router.expert_bias)  # a resumed run stays frozen


def test_bias_without_balance_until_keeps_counting_and_updating() -> None:
    router = DualRouter(4, [2, 2], top_k=1, balance='bias', balance_rate=0.02).train()
    with torch.no_grad():
        router.w_group_gate.bias.copy_(torch.tensor([2.0, 0.0]))
    x = torch.randn(300, 4)
    biases = []
    for _ in range(5):
        router(x)
        biases.append(router.group_bias.clone())
    assert int(router.balance_updates) == 5
    assert all(not torch.equal(a, b) for a, b in zip(biases, biases[1:]))


def test_checkpoint_without_the_update_count_loads_and_counts_from_zero() -> None:
    trained = DualRouter(4, [2, 2], top_k=1, balance='bias')
    state = {k: v for k, v in trained.state_dict().items() if k != 'balance_updates'}
    router = DualRouter(4, [2, 2], top_k=1, balance='bias', balance_until=10)
    router.load_state_dict(state, strict=True)
    assert router.balance_updates.dtype == torch.long and int(router.balance_updates) == 0


def test_balance_state_is_persistent_only_when_on() -> None:
    assert set(DualRouter(4, [2, 2], 1).state_dict()) == {
        'w_group_gate.weight', 'w_group_gate.bias', 'w_expert_gates.0.weight', 'w_expert_gates.0.bias',
        'w_expert_gates.1.weight', 'w_expert_gates.1.bias', 'group_embedding.weight'}
    biased = DualRouter(4, [2, 2], 1, balance='bias')
    assert {'group_bias', 'expert_bias', 'balance_updates'} <= set(biased.state_dict())
    assert 'expert_bias' in SingleRouter(4, [2, 2], 1, balance='bias').state_dict()
