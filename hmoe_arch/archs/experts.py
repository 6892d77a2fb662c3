"""Heterogeneous expert bank with sparse dispatch, and the DR-HMoE upsampler built on it.

Every expert is a ``Conv2d(C, scale**2 * C, k, padding=k // 2)``; experts of a group share ``k``. The
authors evaluate all experts densely on every pixel and mask the results. Here each LR pixel is computed
only by its selected experts:

1. the routed (pixel, expert, weight) slots are sorted by expert (global expert indices are contiguous per
   group, so this also sorts by group);
2. per group, the ``k x k`` neighbourhoods of that group's pixels are gathered from the zero-padded
   feature map as rows ``(C*k*k)``, the order of the flattened conv weight (backward: the rows' gradient added
   at their pixels and folded onto the map, one col2im);
3. one matmul per expert on its contiguous slice of rows, written into one buffer and scaled by the slot
   weights (a custom autograd function, so backward is one matmul per expert too);
4. one ``index_select`` puts the rows back in pixel order (the K slots of a pixel are then summed; backward
   is the gather by the sorting order, a permutation's inverse), and PixelShuffle reads them as ``(B, O, H, W)``
   (in training its backward writes the HR gradient straight into that row layout).

Memory is ``O(N * K * (k*k*C + O))`` for N pixels, independent of the number of experts; the dense
``(experts, B, O, H, W)`` tensor never exists.
"""
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from torch.autograd.function import once_differentiable

from .routing import (
    BALANCES,
    DualRouter,
    Routing,
    SingleRouter,
    routing_grad_mode,
    summed_over_ranks,
    zeros_where_missing,
)

ExpertGroup = Tuple[int, int]
"""``(kernel_size, num_experts)`` of one expert group."""
ROUTING_NORMS = ('none', 'center')
"""Values of the ``routing_norm`` network key: ``none`` (the routers read the routing features as they are) or
``center`` (a running mean of the features is subtracted first, see :class:`HeterogeneousMoE`)."""
CENTER_MOMENTUM = 0.1
"""Weight of a training batch's mean in the running mean of ``routing_norm: center`` (BatchNorm's default)."""


def gather_neighbourhoods(x: torch.Tensor, pixels: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """The zero-padded ``k x k`` neighbourhoods of selected pixels, in the order of a flattened conv weight.

    The neighbourhoods are a view of the padded map (``Tensor.unfold``), so the only copy is the gather of
    the selected pixels. For ``k > 1`` the gradient is the rows' gradient added at their pixels and folded
    back onto the map (:class:`_Neighbourhoods`).

    Args:
        x: Features ``(B, C, H, W)``.
        pixels: ``(n,)`` flat pixel indices into ``(B, H, W)``.
        kernel_size: Odd k.

    Returns:
        ``(n, C*k*k)``, ordered ``(c, dy, dx)`` like ``Conv2d.weight.view(O, -1)``.
    """
    if kernel_size == 1:
        return _neighbourhood_rows(x, pixels, 1)
    return _Neighbourhoods.apply(x, pixels, kernel_size)


def _neighbourhood_rows(x: torch.Tensor, pixels: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """:func:`gather_neighbourhoods` as indexing of a view (autograd's own backward)."""
    batch, channels, height, width = x.shape
    b, rest = pixels.div(height * width, rounding_mode='floor'), pixels.remainder(height * width)
    y, col = rest.div(width, rounding_mode='floor'), rest.remainder(width)
    if kernel_size == 1:
        return x.permute(0, 2, 3, 1)[b, y, col]
    pad = kernel_size // 2
    windows = F.pad(x, (pad, pad, pad, pad)).unfold(2, kernel_size, 1).unfold(3, kernel_size, 1)
    return windows.permute(0, 2, 3, 1, 4, 5)[b, y, col].reshape(len(pixels), -1)


class _Neighbourhoods(torch.autograd.Function):
    """``(n, C*k*k)`` neighbourhood rows of ``n`` pixels of ``(B, C, H, W)`` features. Backward adds the rows'
    gradient into ``(B*H*W, C*k*k)`` columns at their pixels and folds them onto the map (``F.fold``, one
    col2im); autograd's own backward of the indexed double-unfolded view zero-fills and accumulates the
    ``(B, H, W, C, k, k)`` view twice over. Not twice differentiable."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, pixels: torch.Tensor, kernel_size: int) -> torch.Tensor:
        ctx.save_for_backward(pixels)
        ctx.grid, ctx.kernel_size = x.shape, kernel_size
        return _neighbourhood_rows(x, pixels, kernel_size)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_rows: torch.Tensor):
        (pixels,) = ctx.saved_tensors
        batch, channels, height, width = ctx.grid
        k = ctx.kernel_size
        columns = grad_rows.new_zeros(batch * height * width, grad_rows.shape[1])
        columns.index_add_(0, pixels, grad_rows)
        columns = columns.view(batch, height * width, -1).transpose(1, 2)
        return F.fold(columns, (height, width), k, padding=k // 2), None, None


class _GroupedExpertLinear(torch.autograd.Function):
    """``out[s] = w[s] * (rows[s] @ W_e.T + b_e)`` for consecutive slices of slots, one expert per slice.

    ``rows`` come per group (a group's experts share the row width ``C*k*k``); all slices are written into
    one ``(S, O)`` buffer in slot order. All inputs share one dtype (the caller casts expert parameters and
    weights to the features' dtype under autocast). With ``unit`` (top-1 routing, whose straight-through
    weights have value exactly 1) the scaling is skipped in forward. Backward is one matmul per
    expert for each of the gradients of ``rows``, the expert weight and bias, plus a row-wise dot product for
    ``w``.
    """

    @staticmethod
    def forward(ctx, slot_weight: torch.Tensor, unit: bool, counts: List[List[int]], *tensors: torch.Tensor
                ) -> torch.Tensor:
        num_groups = len(counts)
        group_rows, params = tensors[:num_groups], tensors[num_groups:]
        out = group_rows[0].new_empty(slot_weight.shape[0], params[0].shape[0])
        start, param = 0, 0
        for rows, group_counts in zip(group_rows, counts):
            row = 0
            for count in group_counts:
                torch.addmm(params[param + 1], rows[row:row + count], params[param].t(),
                            out=out[start:start + count])
                start, row, param = start + count, row + count, param + 2
        ctx.counts, ctx.unit = counts, unit
        ctx.save_for_backward(slot_weight, out if ctx.needs_input_grad[0] else None, *tensors)
        return out if ctx.unit else out * slot_weight.unsqueeze(1)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        slot_weight, expert_out, *tensors = ctx.saved_tensors
        num_groups = len(ctx.counts)
        group_rows, params = tensors[:num_groups], tensors[num_groups:]
        grad_weight = (grad_out * expert_out).sum(1) if ctx.needs_input_grad[0] else None
        grad = grad_out if ctx.unit else grad_out * slot_weight.unsqueeze(1)
        grad_rows, grad_params = [], []
        start, param = 0, 0
        for g, (rows, group_counts) in enumerate(zip(group_rows, ctx.counts)):
            needs_rows = ctx.needs_input_grad[3 + g]
            grad_group = rows.new_empty(rows.shape) if needs_rows else None
            row = 0
            for count in group_counts:
                part = grad[start:start + count]
                if needs_rows:
                    torch.mm(part, params[param], out=grad_group[row:row + count])
                grad_params += [part.t() @ rows[row:row + count], part.sum(0)]
                start, row, param = start + count, row + count, param + 2
            grad_rows.append(grad_group)
        return (grad_weight, None, None, *grad_rows, *grad_params)


class _PermuteRows(torch.autograd.Function):
    """``rows[inverse]`` for a permutation ``order`` of the rows and its inverse ``inverse``; backward gathers the
    gradient with ``order`` (``index_select``'s own backward zero-fills a buffer and scatters into it)."""

    @staticmethod
    def forward(ctx, rows: torch.Tensor, inverse: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(order)
        return rows.index_select(0, inverse)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (order,) = ctx.saved_tensors
        return grad.index_select(0, order), None, None


class _PixelShuffle(torch.autograd.Function):
    """``F.pixel_shuffle`` whose backward reads the HR gradient once, into the layout of the experts' rows:
    ``(B, O, H, W)`` with channels-last strides, which the rows' ``(B*H*W, O)`` view then takes without a copy
    (``pixel_unshuffle``, PixelShuffle's own backward, gives NCHW, which the rows' layout copies a second time).
    Not twice differentiable."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: int) -> torch.Tensor:
        ctx.scale = scale
        return F.pixel_shuffle(x, scale)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        s = ctx.scale
        batch, channels, height, width = grad.shape[0], grad.shape[1], grad.shape[2] // s, grad.shape[3] // s
        rows = grad.reshape(batch, channels, height, s, width, s).permute(0, 2, 4, 1, 3, 5)
        return rows.reshape(batch, height, width, channels * s * s).permute(0, 3, 1, 2), None


class HeterogeneousMoE(nn.Module):
    """Routed bank of conv experts: ``(B, C, H, W)`` features -> ``(B, scale**2 * C, H, W)``.

    Every expert is ``Conv2d(C, scale**2 * C, k, padding=k // 2)``. Parameter names are the authors'
    (``experts.{i}``, ``gate.*``); experts are numbered group after group. The output is a channels-last
    buffer seen as ``(B, O, H, W)``, the layout ``PixelShuffle`` reads fastest.

    Args:
        channels: Feature channels C.
        scale: Upscaling factor (the experts' output has ``scale**2 * C`` channels).
        routing_dim: Channels of the routing features.
        expert_groups: ``(kernel_size, num_experts)`` per group.
        top_k: Experts per pixel (within its group for dual routing).
        routing: ``'dual'`` or ``'single'``.
        routing_grad: A name of :data:`~hmoe_arch.archs.routing.ROUTING_GRADS`, kept as its record
            (:class:`~hmoe_arch.archs.routing.RoutingGrad`, handed to the routers as well). The routers run with
            autograd when its ``learns`` is set (else, as in the authors' training, the routers, the group
            embedding and whatever computed the routing features get no gradient); the routers weight top-1
            selections with its ``top1_weight``. :meth:`set_routing_grad` switches it.
        balance: ``'bias'``: loss-free balancing biases in the routers (see :mod:`~hmoe_arch.archs.routing`).
        balance_rate: Their update rate.
        balance_until: Training forwards during which they adapt (frozen after); ``None``: all of training.
        routing_norm: ``'center'``: the routers read the routing features minus their running mean (buffer
            ``feature_mean``, updated from each training batch with :data:`CENTER_MOMENTUM`, the first batch
            taken as it is; frozen in eval mode like BatchNorm's statistics; zero, which changes nothing, when
            a checkpoint without it is loaded). The features are LeakyReLU outputs with a large component common
            to all pixels, which alone decides the arg-max of near-tied routers.
    """

    def __init__(self, channels: int, scale: int, routing_dim: int, expert_groups: Sequence[ExpertGroup],
                 top_k: int, routing: str, routing_grad: str = 'none', balance: str = 'none',
                 balance_rate: float = 1e-3, routing_norm: str = 'none', balance_until: Optional[int] = None) -> None:
        super().__init__()
        mode = routing_grad_mode(routing_grad, 'HeterogeneousMoE')
        if balance not in BALANCES:
            raise ValueError(f'HeterogeneousMoE: balance must be one of {BALANCES}, got {balance!r}')
        if routing_norm not in ROUTING_NORMS:
            raise ValueError(f'HeterogeneousMoE: routing_norm must be one of {ROUTING_NORMS}, got {routing_norm!r}')
        self.routing_grad = mode
        """The ``routing_grad`` record (the same object as the routers' :attr:`routing_grad`)."""
        self.routing_norm = routing_norm
        if routing_norm == 'center':
            self.register_buffer('feature_mean', torch.zeros(routing_dim))
            self.register_buffer('feature_batches', torch.zeros((), dtype=torch.long))
            self._register_load_state_dict_pre_hook(zeros_where_missing(
                ['feature_mean', 'feature_batches'], {'feature_mean': (routing_dim,), 'feature_batches': ()}))
        self.expert_groups = tuple(expert_groups)
        self.channels = channels
        self.scale = scale
        self.out_channels = scale * scale * channels
        self.experts = nn.ModuleList([
            nn.Conv2d(channels, self.out_channels, k, 1, k // 2) for k, count in expert_groups for _ in range(count)
        ])
        router = DualRouter if routing == 'dual' else SingleRouter
        self.gate = router(routing_dim, [count for _, count in expert_groups], top_k, balance=balance,
                           balance_rate=balance_rate, balance_until=balance_until, routing_grad=mode)
        self.dense = False
        """Evaluate every expert on every pixel and mask (:meth:`dense_dispatch`, the authors' computation): shapes
        that do not depend on the routing, for ONNX export and as the reference of tests and benchmarks."""
        self.last_routing: Optional[Routing] = None
        self._routing_with_graph: Optional[Routing] = None
        self.last_grid: Tuple[int, int, int] = (0, 0, 0)

    def set_routing_grad(self, name: str) -> None:
        """Switch to the ``routing_grad`` mode ``name`` here and in the routers (the weights stay as they are)."""
        self.routing_grad = self.gate.routing_grad = routing_grad_mode(name, 'HeterogeneousMoE')

    def group_ranges(self) -> List[Tuple[int, int, int]]:
        """``(kernel_size, first_expert, end_expert)`` for each group."""
        ranges, start = [], 0
        for k, count in self.expert_groups:
            ranges.append((k, start, start + count))
            start += count
        return ranges

    def forward(self, x: torch.Tensor, routing_features: torch.Tensor) -> torch.Tensor:
        """
        Args:
            x: Features ``(B, C, H, W)``.
            routing_features: ``(B, routing_dim, H, W)``.

        Returns:
            ``(B, scale**2 * C, H, W)``. The decision is kept in :attr:`last_routing` (detached);
            :meth:`aux_loss` computes its load-balancing loss on demand.
        """
        batch, _, height, width = x.shape
        routing = self.route(rearrange(routing_features, 'b c h w -> (b h w) c'))
        self.last_routing = routing.detach()
        self._routing_with_graph = routing
        self.last_grid = (batch, height, width)
        rows = self.dense_dispatch(x, routing) if self.dense else self.dispatch(x, routing)
        return rearrange(rows, '(b h w) o -> b o h w', b=batch, h=height, w=width)

    def route(self, rows: torch.Tensor) -> Routing:
        """The routers on ``(N, routing_dim)`` rows, in float32 or wider whatever the precision of the rest
        (autocast, or a network cast to bfloat16/float16): arg-max decisions are not taken in 8 mantissa bits.
        They run with autograd only when the :attr:`routing_grad` mode learns."""
        gate_dtype = next(self.gate.parameters()).dtype
        dtype = torch.promote_types(gate_dtype, torch.float32)
        with torch.autocast(device_type=rows.device.type, enabled=False), \
                torch.set_grad_enabled(torch.is_grad_enabled() and self.routing_grad.learns):
            rows = self.centered_rows(rows.to(dtype))
            if gate_dtype == dtype:
                return self.gate(rows)
            widened = {name: p.to(dtype) for name, p in self.gate.named_parameters()}
            return torch.func.functional_call(self.gate, widened, (rows,))

    def centered_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """``(N, routing_dim)`` rows minus the running mean with ``routing_norm: center`` (in training mode the
        mean first takes in this batch, summed over ranks); the rows as they are otherwise."""
        if self.routing_norm != 'center':
            return rows
        if self.training:
            with torch.no_grad():
                total = summed_over_ranks(torch.cat([rows.sum(0), rows.new_tensor([rows.shape[0]])]))
                batch_mean = (total[:-1] / total[-1].clamp(min=1)).to(self.feature_mean.dtype)
                momentum = 1.0 if int(self.feature_batches) == 0 else CENTER_MOMENTUM
                self.feature_mean.lerp_(batch_mean, momentum)
                self.feature_batches += 1
        return rows - self.feature_mean.to(rows.dtype)

    def balance_state_names(self) -> List[str]:
        """Buffers the balancing options keep, relative to this module (empty without them)."""
        names = [f'gate.{name}' for name in self.gate.balance_state_names()]
        return names + (['feature_mean', 'feature_batches'] if self.routing_norm == 'center' else [])

    def aux_loss(self) -> torch.Tensor:
        """Load-balancing loss of the last forward's routing (differentiable in training)."""
        if self._routing_with_graph is None:
            raise RuntimeError('HeterogeneousMoE.aux_loss: no forward has run yet')
        return self.gate.aux_loss(self._routing_with_graph)

    def routing_maps(self) -> Dict[str, torch.Tensor]:
        """Last routing on the LR grid: ``group`` ``(B, H, W)``, ``expert`` ``(B, H, W, K)``, ``weight``
        ``(B, H, W, K)``."""
        if self.last_routing is None:
            raise RuntimeError('HeterogeneousMoE.routing_maps: no forward has run yet')
        batch, height, width = self.last_grid
        routing = self.last_routing
        return {
            'group': routing.group.view(batch, height, width),
            'expert': routing.expert.view(batch, height, width, -1),
            'weight': routing.weight.view(batch, height, width, -1),
        }

    def dispatch(self, x: torch.Tensor, routing: Routing) -> torch.Tensor:
        """Sparse evaluation: ``(N, scale**2 * C)`` rows, each the weighted sum of its selected experts."""
        num_pixels, top_k = routing.expert.shape
        slots_expert = routing.expert.reshape(-1)
        order = torch.argsort(slots_expert, stable=True)
        slots_pixel = order.div(top_k, rounding_mode='floor')
        slots_weight = routing.weight.reshape(-1)[order]
        counts = torch.bincount(slots_expert, minlength=len(self.experts)).tolist()
        group_rows, group_counts, params = [], [], []
        cursor = 0
        for kernel_size, first, end in self.group_ranges():
            used = [index for index in range(first, end) if counts[index] > 0]
            if not used:
                continue
            size = sum(counts[index] for index in used)
            group_rows.append(gather_neighbourhoods(x, slots_pixel[cursor:cursor + size], kernel_size))
            group_counts.append([counts[index] for index in used])
            for index in used:
                expert = self.experts[index]
                params += [expert.weight.view(self.out_channels, -1).to(x.dtype), expert.bias.to(x.dtype)]
            cursor += size
        values = _GroupedExpertLinear.apply(slots_weight.to(x.dtype), top_k == 1, group_counts, *group_rows, *params)
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.numel(), device=order.device)
        values = _PermuteRows.apply(values, inverse, order)
        return values if top_k == 1 else values.view(num_pixels, top_k, -1).sum(1)

    def dense_dispatch(self, x: torch.Tensor, routing: Routing) -> torch.Tensor:
        """The authors' evaluation: every expert on every pixel (plain ``Conv2d``), masked by the routing
        weights; the same ``(N, scale**2 * C)`` rows as :meth:`dispatch` at ``experts`` times the compute and
        memory. The forward uses it only with :attr:`dense` set (ONNX export, benchmarks, tests)."""
        mask = x.new_zeros(routing.expert.shape[0], len(self.experts))
        mask = mask.scatter_add(1, routing.expert, routing.weight.to(x.dtype))
        outputs = torch.stack([expert(x) for expert in self.experts])
        return (rearrange(outputs, 'e b o h w -> (b h w) e o') * mask.unsqueeze(-1)).sum(1)


class MoEUpsampler(nn.Sequential):
    """DR-HMoE upsampler: ``[0]`` the routed expert bank (``C -> scale**2 * C``), ``[1]`` PixelShuffle; the
    state_dict keys are the authors' ``upsample.0.*``.

    ``(B, C, H, W)`` features and ``(B, routing_dim, H, W)`` routing features -> ``(B, C, s*H, s*W)``.
    """

    def __init__(self, scale: int, num_feat: int, routing_dim: int, expert_groups: Sequence[ExpertGroup],
                 top_k: int, routing: str, routing_grad: str = 'none', balance: str = 'none',
                 balance_rate: float = 1e-3, routing_norm: str = 'none', balance_until: Optional[int] = None) -> None:
        super().__init__(HeterogeneousMoE(num_feat, scale, routing_dim, expert_groups, top_k, routing, routing_grad,
                                          balance, balance_rate, routing_norm, balance_until),
                         nn.PixelShuffle(scale))

    @property
    def moe(self) -> HeterogeneousMoE:
        return self[0]

    def forward(self, x: torch.Tensor, routing_features: torch.Tensor) -> torch.Tensor:
        experts = self.moe(x, routing_features)
        if experts.requires_grad:  # training: the same values, a cheaper backward (:class:`_PixelShuffle`)
            return _PixelShuffle.apply(experts, self.moe.scale)
        return self[1](experts)
