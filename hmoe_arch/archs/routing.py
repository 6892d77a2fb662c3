"""Routers of the DR-HMoE upsampler: which expert computes each LR pixel, and with what weight.

Dual routing (eq. 5-7 of the paper): a group router ``softmax(W_g x)`` picks the top-1 group ``g`` of each
pixel; that group's expert router ``softmax(W_e^g (x + E[g]))``, with ``E`` a learned group position
embedding, picks the top-K experts inside the group. Single routing (the Table III ablation) is one flat
``softmax(W x)`` over all experts.

Combination weights and gradients. The authors' implementation uses the selected expert at weight exactly 1
and builds that one-hot by index assignment, so no gradient reaches the routers. Here every selection
probability ``p`` enters the weight as the straight-through factor ``p / stop_grad(p)``: its value is
exactly 1 (IEEE division of a number by itself), so with top-1 the output equals the authors' bit for bit,
and its gradient is ``grad(p) / p = grad(log p)``, scaled by how much the selected expert's output helps the
loss. With top-K > 1 the K selected experts of a pixel are combined with their probabilities renormalised
to sum to 1 (times the group factor, value 1).

Which parts the routing gradient reaches is the network key ``routing_grad``, one :class:`RoutingGrad` record per
value in :data:`ROUTING_GRAD_MODES` (looked up by :func:`routing_grad_mode`):
``none`` is the authors' training (the routers run without autograd, so the routers, the group embedding and
the MFA branches keep their initialisation), ``straight_through`` lets the factor above train them and, through
the MFA branches' inputs, the backbone too, ``isolated`` trains the routers, the embedding and the MFA
branches but stops the routing gradient at the backbone (the MFA branches and the normalisation of their sum
read detached backbone features), and ``centered`` is ``isolated`` with the batch mean of the upstream gradient
as the baseline of the straight-through factor. The forward value is the same in every mode. The network, the
expert bank and the routers read only the record's fields; adding a mode is one more record in
:data:`ROUTING_GRAD_MODES` (with a new :attr:`RoutingGrad.top1_weight` function if its estimator is new) and its
tests.

Load balancing (Switch Transformer style): ``n * sum_i f_i * P_i`` with ``f_i`` the fraction of routed
slots that went to choice ``i`` and ``P_i`` its mean probability; it is 1 when the load is uniform. The dual
router adds the group term and the within-group expert terms (weighted by each group's share of pixels).

Balance without a loss (``balance: bias``; Wang et al. 2024, "Auxiliary-Loss-Free Load Balancing Strategy for
Mixture-of-Experts", arXiv 2408.15664): a per-choice bias ``b_i`` (one per group for the group router, one per
expert for each expert router) is added to the probabilities for the selection only; the combination weights
come from the unbiased probabilities. After every training forward, ``b_i += rate * (1/n - load_i)`` with
``load_i`` the fraction of the routed slots that chose ``i`` (the proportional update the paper needed for a
softmax gate), summed over ranks in distributed training. The biases are persistent buffers (they decide the
routing at inference) updated only in training mode, like BatchNorm's statistics; loading a checkpoint without
them (the authors', or one trained without) starts them at zero, which changes no decision. With
``balance_until: n`` the biases adapt during the first ``n`` training forwards and are frozen after (StableMoE's
two stages: balance while the assignment forms, then keep it fixed); the buffer ``balance_updates`` counts the
updates made, so a resumed run freezes at the same point.
"""
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

import torch
import torch.distributed as dist
import torch.nn as nn

BALANCES = ('none', 'bias')
"""Values of the ``balance`` network key: ``none`` (the authors' selection) or ``bias`` (see the module
docstring)."""


@dataclass
class Routing:
    """Routing decision for N LR pixels (rows ordered ``(b, h, w)``).

    Attributes:
        group: ``(N,)`` long, selected group per pixel.
        expert: ``(N, K)`` long, selected experts as global indices (groups are contiguous ranges).
        weight: ``(N, K)`` combination weights; carry the gradient to the routers.
        group_probs: ``(N, G)`` group probabilities (in single routing: the summed probability of each
            group's experts).
        expert_probs: ``(N, M)`` probabilities over the experts the pixel chose among (its group's experts,
            zero-padded to the largest group, in dual routing; all experts in single routing).
        choice: ``(N, K)`` long, the selected columns of ``expert_probs``.
    """

    group: torch.Tensor
    expert: torch.Tensor
    weight: torch.Tensor
    group_probs: torch.Tensor
    expert_probs: torch.Tensor
    choice: torch.Tensor

    def detach(self) -> 'Routing':
        """A copy holding no autograd graph, for logging and expert maps."""
        return Routing(*(t.detach() for t in (self.group, self.expert, self.weight, self.group_probs,
                                               self.expert_probs, self.choice)))


class _CenteredStraightThrough(torch.autograd.Function):
    """Value 1; the gradient of ``p`` is ``(s - mean(s)) / p`` for the upstream gradient ``s`` of the weight, the
    straight-through gradient with the batch mean of ``s`` as baseline."""

    @staticmethod
    def forward(ctx, probs: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(probs)
        return torch.ones_like(probs)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        probs, = ctx.saved_tensors
        return (grad - grad.mean()) / probs


def straight_through(top_probs: torch.Tensor) -> torch.Tensor:
    """``p / stop_grad(p)`` of the ``(N, 1)`` selected probabilities: value exactly 1, gradient ``grad(log p)``."""
    return top_probs / top_probs.detach()


def centered_straight_through(top_probs: torch.Tensor) -> torch.Tensor:
    """Value exactly 1 for the ``(N, 1)`` selected probabilities; the gradient of ``p`` is ``(s - mean(s)) / p``
    for the upstream gradient ``s`` of the weight (:func:`straight_through` with the batch mean as baseline)."""
    return _CenteredStraightThrough.apply(top_probs)


@dataclass(frozen=True)
class RoutingGrad:
    """One value of the ``routing_grad`` network key: where the routing gradient goes (see the module docstring).

    Attributes:
        name: The key's value.
        learns: The routers and the MFA branches run with autograd (else no gradient reaches the routers, the
            group embedding, the MFA branches or the routing projection).
        stops_at_backbone: The MFA branches, the normalisation of their sum and the routing features of
            ``mfa: false`` read detached backbone features, so the routing gradient stops there.
        top1_weight: The weight of a top-1 selection from its ``(N, 1)`` probabilities (value exactly 1; its
            gradient is the mode's estimator): :func:`straight_through` or :func:`centered_straight_through`.
    """

    name: str
    learns: bool
    stops_at_backbone: bool
    top1_weight: Callable[[torch.Tensor], torch.Tensor]


ROUTING_GRAD_MODES: Dict[str, RoutingGrad] = {mode.name: mode for mode in (
    RoutingGrad('none', learns=False, stops_at_backbone=False, top1_weight=straight_through),
    RoutingGrad('straight_through', learns=True, stops_at_backbone=False, top1_weight=straight_through),
    RoutingGrad('isolated', learns=True, stops_at_backbone=True, top1_weight=straight_through),
    RoutingGrad('centered', learns=True, stops_at_backbone=True, top1_weight=centered_straight_through),
)}
"""The records of the ``routing_grad`` values, by name."""
ROUTING_GRADS = tuple(ROUTING_GRAD_MODES)
"""Values of the ``routing_grad`` network key (see the module docstring)."""


def routing_grad_mode(name: Any, owner: str = 'routing_grad_mode') -> RoutingGrad:
    """The record of the ``routing_grad`` value ``name``; a one-line ``ValueError`` starting with ``owner`` (who
    read the value) for anything else."""
    if not isinstance(name, str) or name not in ROUTING_GRAD_MODES:
        raise ValueError(f'{owner}: `routing_grad` must be one of {ROUTING_GRADS}, got {name!r}')
    return ROUTING_GRAD_MODES[name]


def selection_weight(top_probs: torch.Tensor, top1_weight: Callable[[torch.Tensor], torch.Tensor] = straight_through
                     ) -> torch.Tensor:
    """Weights of the selected experts from their probabilities ``(N, K)``: ``top1_weight(p)`` for K = 1 (a
    :attr:`RoutingGrad.top1_weight`, value 1), the renormalised probabilities for K > 1."""
    if top_probs.shape[-1] == 1:
        return top1_weight(top_probs)
    return top_probs / top_probs.sum(dim=-1, keepdim=True)


def balance_loss(probs: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
    """``n * sum_i f_i * P_i`` for probabilities ``(N, n)`` and selections ``(N, K)`` of N routed pixels."""
    num_choices = probs.shape[-1]
    counts = torch.zeros_like(probs).scatter_add_(-1, chosen, torch.ones_like(chosen, dtype=probs.dtype))
    fraction = counts.sum(0) / chosen.numel()
    return num_choices * (fraction * probs.mean(0)).sum()


def summed_over_ranks(counts: torch.Tensor) -> torch.Tensor:
    """``counts`` summed over the ranks of a distributed run (unchanged otherwise)."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(counts)
    return counts


def update_bias(bias: torch.Tensor, counts: torch.Tensor, rate: Union[float, torch.Tensor]) -> None:
    """``bias += rate * (1/n - load)`` in place for the ``(n,)`` slot counts of one router (no update without
    slots)."""
    total = counts.sum()
    if total > 0:
        bias += rate * (1.0 / counts.numel() - counts / total)


def step_rate(updates: torch.Tensor, rate: float, until: Optional[int]) -> torch.Tensor:
    """The bias update rate of one training forward: ``rate`` while fewer than ``until`` updates were made
    (always when ``until`` is None), else 0; counts the update in ``updates`` (a scalar long buffer) in place.
    Stays on the device: no host synchronisation per step."""
    active = torch.ones_like(updates, dtype=torch.bool) if until is None else updates < until
    updates += active.long()
    return active.float() * rate


def zeros_where_missing(names: Sequence[str], shapes: Dict[str, Any]):
    """A ``load_state_dict`` pre-hook that gives a checkpoint without the buffers ``names`` (the balancing state)
    zeros of ``shapes[name]``: the authors' checkpoints load strictly, and zeros route as before."""

    def hook(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs) -> None:
        for name in names:
            if prefix + name not in state_dict:
                state_dict[prefix + name] = torch.zeros(shapes[name])

    return hook


class DualRouter(nn.Module):
    """Group router + one expert router per group + group position embedding.

    Parameter names are the authors' (``w_group_gate``, ``w_expert_gates.{g}``, ``group_embedding``).

    Args:
        dim: Channels of the routing features.
        group_sizes: Number of experts in each group.
        top_k: Experts selected per pixel inside its group.
        balance: ``'bias'``: loss-free balancing biases (see the module docstring).
        balance_rate: Their update rate.
        balance_until: Training forwards during which they adapt (frozen after); ``None``: all of training.
        routing_grad: The ``routing_grad`` mode, whose :attr:`~RoutingGrad.top1_weight` gives the weights of
            top-1 selections (whether the routers run with autograd is the caller's autograd state).
    """

    def __init__(self, dim: int, group_sizes: Sequence[int], top_k: int, balance: str = 'none',
                 balance_rate: float = 1e-3, balance_until: Optional[int] = None,
                 routing_grad: RoutingGrad = ROUTING_GRAD_MODES['straight_through']) -> None:
        super().__init__()
        self.group_sizes = tuple(group_sizes)
        self.top_k = top_k
        self.routing_grad = routing_grad
        """The ``routing_grad`` mode; the routers read its :attr:`~RoutingGrad.top1_weight` (the expert bank
        hands its own record over)."""
        self.balance, self.balance_rate, self.balance_until = balance, balance_rate, balance_until
        self.w_group_gate = nn.Linear(dim, len(group_sizes))
        self.w_expert_gates = nn.ModuleList([nn.Linear(dim, size) for size in group_sizes])
        self.group_embedding = nn.Embedding(len(group_sizes), dim)
        offsets = torch.tensor((0,) + tuple(group_sizes[:-1])).cumsum(0)
        self.register_buffer('group_offsets', offsets, persistent=False)
        largest = max(group_sizes)
        padding = torch.arange(largest) >= torch.tensor(group_sizes).unsqueeze(1)
        self.register_buffer('padding', padding, persistent=False)
        """``(G, largest)`` bool: the columns past each group's experts."""
        if balance == 'bias':
            shapes = {'group_bias': (len(group_sizes),), 'expert_bias': (len(group_sizes), largest)}
            for name, shape in shapes.items():
                self.register_buffer(name, torch.zeros(shape))
            self.register_buffer('balance_updates', torch.zeros((), dtype=torch.long))
            self._register_load_state_dict_pre_hook(zeros_where_missing(
                [*shapes, 'balance_updates'], {**shapes, 'balance_updates': ()}))

    def forward(self, x: torch.Tensor) -> Routing:
        """Route ``(N, dim)`` routing features."""
        num_groups, largest = len(self.group_sizes), max(self.group_sizes)
        group_probs = self.w_group_gate(x).softmax(dim=-1)
        if self.balance == 'bias':
            group = (group_probs + self.group_bias).argmax(dim=-1)
            group_top = group_probs.gather(1, group.unsqueeze(1)).squeeze(1)
        else:
            group_top, group = group_probs.max(dim=-1)
        logits = x.new_full((x.shape[0], num_groups, largest), float('-inf'))
        for g, gate in enumerate(self.w_expert_gates):
            logits[:, g, :self.group_sizes[g]] = gate(x + self.group_embedding.weight[g])
        picked = logits.gather(1, group.view(-1, 1, 1).expand(-1, 1, largest)).squeeze(1)
        expert_probs = picked.softmax(dim=-1)
        if self.balance == 'bias':
            scores = (expert_probs + self.expert_bias[group]).masked_fill(self.padding[group], float('-inf'))
            local = scores.topk(self.top_k, dim=-1).indices
            top_probs = expert_probs.gather(1, local)
            if self.training:
                self._update_biases(group, local)
        else:
            top_probs, local = expert_probs.topk(self.top_k, dim=-1)
        top1_weight = self.routing_grad.top1_weight
        weight = selection_weight(top_probs, top1_weight) * selection_weight(group_top.unsqueeze(-1), top1_weight)
        return Routing(group=group, expert=local + self.group_offsets[group].unsqueeze(-1), weight=weight,
                       group_probs=group_probs, expert_probs=expert_probs, choice=local)

    @torch.no_grad()
    def _update_biases(self, group: torch.Tensor, local: torch.Tensor) -> None:
        """One step of the bias update from this forward's selections (group ``(N,)``, local experts ``(N, K)``)."""
        num_groups, largest = len(self.group_sizes), max(self.group_sizes)
        counts = torch.zeros(num_groups * (largest + 1), device=group.device)
        counts[:num_groups] = torch.bincount(group, minlength=num_groups)
        slots = (group.unsqueeze(1) * largest + local).reshape(-1)
        counts[num_groups:] = torch.bincount(slots, minlength=num_groups * largest)
        counts = summed_over_ranks(counts)
        rate = step_rate(self.balance_updates, self.balance_rate, self.balance_until)
        update_bias(self.group_bias, counts[:num_groups], rate)
        expert_counts = counts[num_groups:].view(num_groups, largest)
        for g, size in enumerate(self.group_sizes):
            update_bias(self.expert_bias[g, :size], expert_counts[g, :size], rate)

    def balance_state_names(self) -> List[str]:
        """Buffers :attr:`balance` keeps (empty without it)."""
        return ['group_bias', 'expert_bias', 'balance_updates'] if self.balance == 'bias' else []

    def aux_loss(self, routing: Routing) -> torch.Tensor:
        """Group balance plus each group's expert balance over its own pixels, weighted by its share."""
        loss = balance_loss(routing.group_probs, routing.group.unsqueeze(-1))
        for g, size in enumerate(self.group_sizes):
            members = routing.group == g
            share = members.float().mean()
            if share > 0:
                loss = loss + share * balance_loss(routing.expert_probs[members, :size], routing.choice[members])
        return loss


class SingleRouter(nn.Module):
    """One flat router over all experts: ``softmax(W x)``, top-K (parameter ``w_gate``).

    Args:
        dim: Channels of the routing features.
        group_sizes: Number of experts in each group (to report each selection's group).
        top_k: Experts selected per pixel.
        balance, balance_rate, balance_until, routing_grad: As for :class:`DualRouter`.
    """

    def __init__(self, dim: int, group_sizes: Sequence[int], top_k: int, balance: str = 'none',
                 balance_rate: float = 1e-3, balance_until: Optional[int] = None,
                 routing_grad: RoutingGrad = ROUTING_GRAD_MODES['straight_through']) -> None:
        super().__init__()
        self.top_k = top_k
        self.routing_grad = routing_grad
        """The ``routing_grad`` mode; the routers read its :attr:`~RoutingGrad.top1_weight` (the expert bank
        hands its own record over)."""
        self.balance, self.balance_rate, self.balance_until = balance, balance_rate, balance_until
        self.w_gate = nn.Linear(dim, sum(group_sizes))
        group_of_expert = torch.tensor([group for group, size in enumerate(group_sizes) for _ in range(size)])
        self.register_buffer('group_of_expert', group_of_expert, persistent=False)
        if balance == 'bias':
            self.register_buffer('expert_bias', torch.zeros(sum(group_sizes)))
            self.register_buffer('balance_updates', torch.zeros((), dtype=torch.long))
            self._register_load_state_dict_pre_hook(zeros_where_missing(
                ['expert_bias', 'balance_updates'], {'expert_bias': (sum(group_sizes),), 'balance_updates': ()}))

    def forward(self, x: torch.Tensor) -> Routing:
        """Route ``(N, dim)`` routing features."""
        probs = self.w_gate(x).softmax(dim=-1)
        if self.balance == 'bias':
            expert = (probs + self.expert_bias).topk(self.top_k, dim=-1).indices
            top_probs = probs.gather(1, expert)
            if self.training:
                with torch.no_grad():
                    counts = torch.bincount(expert.reshape(-1), minlength=probs.shape[-1]).to(probs.dtype)
                    rate = step_rate(self.balance_updates, self.balance_rate, self.balance_until)
                    update_bias(self.expert_bias, summed_over_ranks(counts), rate)
        else:
            top_probs, expert = probs.topk(self.top_k, dim=-1)
        group = self.group_of_expert[expert[:, 0]]
        num_groups = int(self.group_of_expert[-1]) + 1
        group_probs = torch.zeros(x.shape[0], num_groups, dtype=probs.dtype, device=x.device)
        group_probs = group_probs.index_add(1, self.group_of_expert, probs)
        return Routing(group=group, expert=expert, weight=selection_weight(top_probs, self.routing_grad.top1_weight),
                       group_probs=group_probs,
                       expert_probs=probs, choice=expert)

    def aux_loss(self, routing: Routing) -> torch.Tensor:
        """Balance over all experts."""
        return balance_loss(routing.expert_probs, routing.choice)

    def balance_state_names(self) -> List[str]:
        """Buffers :attr:`balance` keeps (empty without it)."""
        return ['expert_bias', 'balance_updates'] if self.balance == 'bias' else []
