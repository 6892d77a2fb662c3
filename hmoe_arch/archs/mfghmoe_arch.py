"""MFGHMoEArch: HAT backbone + multi-level feature aggregation + dual-routing heterogeneous MoE upsampler.

Configurations:

- default (``mfa: true, moe: true``, no RGB mean): the paper's MFG-HMoE with the state_dict layout of the
  authors' released code (registered there as ``MFGHMOE``, an alias here);
- ``mfa: false, moe: false, rgb_mean: [0.4488, 0.4371, 0.4040]``: exactly HAT (same keys, same outputs).

``forward(x)`` returns only the SR image, as HAT's does; the auxiliary load-balancing loss and the routing of
the last forward come from methods (:meth:`MFGHMoEArch.aux_loss`, :meth:`MFGHMoEArch.routing_maps`).
"""
import difflib
import inspect
import math
from collections.abc import Mapping
from types import SimpleNamespace
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from basicsr.archs.arch_util import Upsample
from basicsr.utils import get_root_logger
from basicsr.utils.registry import ARCH_REGISTRY

from ..checkpoints import (
    UNNAMED,
    CheckpointSource,
    LoadReport,
    match_state_dict,
    read_checkpoint,
    source_name,
    state_dict_of,
)
from ..errors import ConfigError
from ..options import is_strict_int, is_strict_number
from .experts import ROUTING_NORMS, MoEUpsampler
from .hat_blocks import (
    PatchEmbed,
    PatchUnEmbed,
    ResidualHybridAttentionGroup,
    image_to_tokens,
    init_trunc_normal,
    relative_position_index_overlap,
    relative_position_index_self,
    shifted_window_mask,
)
from .mfa import MultiLevelFeatureAggregation, routing_projection
from .routing import BALANCES, routing_grad_mode

NUM_FEAT = 64
"""Channels of the reconstruction stage, the MFA branches and the routing features (HAT's ``num_feat``)."""

UPSAMPLERS = ('pixelshuffle',)
RESI_CONNECTIONS = ('1conv', 'identity')
ROUTINGS = ('dual', 'single')
ATTENTIONS = ('sdpa', 'plain')
PAPER_EXPERT_GROUPS = ({'kernel_size': 1, 'num_experts': 8}, {'kernel_size': 3, 'num_experts': 8})


def _fail(key: str, expected: str, got: Any) -> None:
    raise ValueError(f'MFGHMoEArch: `{key}` must be {expected}, got {got!r}')


def _check_int(key: str, value: Any, minimum: int) -> None:
    if not is_strict_int(value, minimum):
        _fail(key, f'an integer >= {minimum}', value)


def _check_rate(key: str, value: Any) -> None:
    if not is_strict_number(value) or not 0.0 <= value < 1.0:
        _fail(key, 'a number in [0, 1)', value)


def parse_expert_groups(expert_groups: Any) -> Tuple[Tuple[int, int], ...]:
    """Validate ``expert_groups`` (a list of ``{kernel_size, num_experts}``) into ``(k, count)`` pairs."""
    if isinstance(expert_groups, (str, Mapping)) or not isinstance(expert_groups, Sequence) or not expert_groups:
        _fail('expert_groups', 'a non-empty list of {kernel_size, num_experts}', expert_groups)
    groups = []
    for i, group in enumerate(expert_groups):
        if not isinstance(group, Mapping) or set(group) != {'kernel_size', 'num_experts'}:
            _fail(f'expert_groups[{i}]', 'a mapping with exactly the keys kernel_size and num_experts', group)
        k, count = group['kernel_size'], group['num_experts']
        _check_int(f'expert_groups[{i}].kernel_size', k, 1)
        if k % 2 == 0:
            _fail(f'expert_groups[{i}].kernel_size', 'odd (the expert keeps the LR grid)', k)
        _check_int(f'expert_groups[{i}].num_experts', count, 1)
        groups.append((k, count))
    return tuple(groups)


def check_arguments(a: SimpleNamespace, unknown: Mapping[str, Any]) -> Tuple[Tuple[int, int], ...]:
    """Validate the constructor arguments of :class:`MFGHMoEArch` (``a``: every keyword, as attributes; ``unknown``:
    keywords it does not have); returns the parsed ``expert_groups``.

    Raises:
        ValueError: naming the key and what was expected (unknown keys with a did-you-mean).
    """
    if unknown:
        valid = [name for name in inspect.signature(MFGHMoEArch.__init__).parameters if name not in
                 ('self', 'unknown')]
        hints = [f'{key} -> {match[0]}?' for key in sorted(unknown)
                 if (match := difflib.get_close_matches(key, valid, n=1))]
        hint = f' (did you mean: {", ".join(hints)})' if hints else ''
        raise ValueError(f'MFGHMoEArch: unknown keyword(s) {sorted(unknown)}{hint}; valid keys: '
                         f'{", ".join(valid)}')
    _check_backbone(a)
    return _check_reconstruction(a)


def _check_backbone(a: SimpleNamespace) -> None:
    """HAT's keys: sizes, rates, flags, the RHAG lists, ratios, attention and normalisation."""
    for key, value, minimum in (('img_size', a.img_size, 1), ('patch_size', a.patch_size, 1),
                                ('in_chans', a.in_chans, 1), ('embed_dim', a.embed_dim, 1),
                                ('window_size', a.window_size, 1), ('compress_ratio', a.compress_ratio, 1),
                                ('squeeze_factor', a.squeeze_factor, 1), ('upscale', a.upscale, 1)):
        _check_int(key, value, minimum)
    for key, value in (('drop_rate', a.drop_rate), ('attn_drop_rate', a.attn_drop_rate),
                       ('drop_path_rate', a.drop_path_rate)):
        _check_rate(key, value)
    for key, value in (('qkv_bias', a.qkv_bias), ('ape', a.ape), ('patch_norm', a.patch_norm),
                       ('use_checkpoint', a.use_checkpoint)):
        if not isinstance(value, bool):
            _fail(key, 'true or false', value)
    if isinstance(a.depths, (str, Mapping)) or not isinstance(a.depths, Sequence) or not a.depths:
        _fail('depths', 'a non-empty list of integers', a.depths)
    if isinstance(a.num_heads, (str, Mapping)) or not isinstance(a.num_heads, Sequence):
        _fail('num_heads', 'a list of integers', a.num_heads)
    if len(a.depths) != len(a.num_heads):
        raise ValueError(f'MFGHMoEArch: `depths` and `num_heads` must have the same length (one entry per '
                         f'RHAG), got {len(a.depths)} and {len(a.num_heads)}')
    for i, (depth, heads) in enumerate(zip(a.depths, a.num_heads)):
        _check_int(f'depths[{i}]', depth, 1)
        _check_int(f'num_heads[{i}]', heads, 1)
        if a.embed_dim % heads:
            raise ValueError(f'MFGHMoEArch: `embed_dim` ({a.embed_dim}) must be divisible by every head count; '
                             f'num_heads[{i}] = {heads}')
    if a.embed_dim // a.compress_ratio < 1:
        _fail('compress_ratio', f'at most embed_dim ({a.embed_dim})', a.compress_ratio)
    if a.embed_dim // a.squeeze_factor < 1:
        _fail('squeeze_factor', f'at most embed_dim ({a.embed_dim})', a.squeeze_factor)
    for key, value in (('conv_scale', a.conv_scale), ('img_range', a.img_range), ('mlp_ratio', a.mlp_ratio),
                       ('overlap_ratio', a.overlap_ratio)):
        if not is_strict_number(value) or not math.isfinite(value):
            _fail(key, 'a number', value)
    if a.img_range <= 0:
        _fail('img_range', 'positive', a.img_range)
    if a.mlp_ratio <= 0 or int(a.embed_dim * a.mlp_ratio) < 1:
        _fail('mlp_ratio', 'positive', a.mlp_ratio)
    if a.overlap_ratio < 0 or int(a.window_size * a.overlap_ratio) % 2:
        _fail('overlap_ratio', f'>= 0 with int(window_size * overlap_ratio) even, so the overlapping window '
              f'extends window_size ({a.window_size}) equally on both sides', a.overlap_ratio)
    if a.qk_scale is not None and (not is_strict_number(a.qk_scale) or a.qk_scale <= 0):
        _fail('qk_scale', 'null or a positive number', a.qk_scale)
    if a.upsampler not in UPSAMPLERS:
        _fail('upsampler', f'one of {UPSAMPLERS} (the only reconstruction HAT implements)', a.upsampler)
    if a.resi_connection not in RESI_CONNECTIONS:
        _fail('resi_connection', f'one of {RESI_CONNECTIONS}', a.resi_connection)
    if a.attention not in ATTENTIONS:
        _fail('attention', f'one of {ATTENTIONS}', a.attention)
    if a.rgb_mean is not None and (isinstance(a.rgb_mean, (str, Mapping)) or not isinstance(a.rgb_mean, Sequence)
                                 or len(a.rgb_mean) != a.in_chans):
        _fail('rgb_mean', f'null or a list of in_chans ({a.in_chans}) numbers', a.rgb_mean)
    if a.img_size // a.patch_size < a.window_size:
        _fail('img_size', f'at least window_size * patch_size ({a.window_size * a.patch_size})', a.img_size)


def _check_reconstruction(a: SimpleNamespace) -> Tuple[Tuple[int, int], ...]:
    """The upsampler's keys (``moe``, ``mfa``, the experts, the routing and its balancing) and how they fit
    together; returns the parsed ``expert_groups``."""
    for key, value in (('mfa', a.mfa), ('moe', a.moe)):
        if not isinstance(value, bool):
            _fail(key, 'true or false', value)
    _check_int('top_k', a.top_k, 1)
    if a.routing not in ROUTINGS:
        _fail('routing', f'one of {ROUTINGS}', a.routing)
    routing_grad_mode(a.routing_grad, 'MFGHMoEArch')
    if a.balance not in BALANCES:
        _fail('balance', f'one of {BALANCES}', a.balance)
    if not is_strict_number(a.balance_rate) or not 0 < a.balance_rate <= 1:
        _fail('balance_rate', 'a number in (0, 1]', a.balance_rate)
    if a.balance_until is not None and not is_strict_int(a.balance_until, 1):
        _fail('balance_until', 'null or a positive number of training iterations', a.balance_until)
    if a.balance_until is not None and a.balance != 'bias':
        _fail('balance_until', f'null unless balance is bias (there are no biases to freeze with balance: '
              f'{a.balance})', a.balance_until)
    if a.routing_norm not in ROUTING_NORMS:
        _fail('routing_norm', f'one of {ROUTING_NORMS}', a.routing_norm)
    groups = parse_expert_groups(a.expert_groups)
    if a.moe:
        smallest = min(count for _, count in groups) if a.routing == 'dual' else sum(c for _, c in groups)
        if a.top_k > smallest:
            _fail('top_k', f'at most {smallest} (experts available to a pixel with routing {a.routing})', a.top_k)
    elif a.upscale != 3 and a.upscale & (a.upscale - 1):
        _fail('upscale', 'a power of 2 or 3 with moe: false (HAT\'s pixel-shuffle upsampler)', a.upscale)
    if a.mfa and not a.moe:
        _fail('mfa', 'false when moe is false (MFA only produces routing features)', a.mfa)
    for key, value in (('balance', a.balance), ('routing_norm', a.routing_norm)):
        if value != 'none' and not a.moe:
            _fail(key, 'none when moe is false (there are no routers)', value)
    return groups


@ARCH_REGISTRY.register()
class MFGHMoEArch(nn.Module):
    """MFG-HMoE super-resolution network (Chen et al., IEEE GRSL 2025) on HAT's backbone.

    All arguments are keyword-only; they are the ``network_g`` keys of a BasicSR option file. The HAT keys
    mean what they mean in HAT; see docs/training.md for the MoE keys.

    Input ``(B, in_chans, H, W)`` with H and W multiples of ``window_size``; output
    ``(B, in_chans, H * upscale, W * upscale)``.
    """

    def __init__(self, *, img_size: int = 64, patch_size: int = 1, in_chans: int = 3, embed_dim: int = 180,
                 depths: Sequence[int] = (6, 6, 6, 6, 6, 6), num_heads: Sequence[int] = (6, 6, 6, 6, 6, 6),
                 window_size: int = 16, compress_ratio: int = 3, squeeze_factor: int = 30, conv_scale: float = 0.01,
                 overlap_ratio: float = 0.5, mlp_ratio: float = 2.0, qkv_bias: bool = True,
                 qk_scale: Optional[float] = None, drop_rate: float = 0.0, attn_drop_rate: float = 0.0,
                 drop_path_rate: float = 0.1, ape: bool = False, patch_norm: bool = True,
                 use_checkpoint: bool = False, upscale: int = 4, img_range: float = 1.0,
                 upsampler: str = 'pixelshuffle', resi_connection: str = '1conv',
                 rgb_mean: Optional[Sequence[float]] = None, mfa: bool = True, moe: bool = True,
                 expert_groups: Sequence[Mapping] = PAPER_EXPERT_GROUPS, top_k: int = 1, routing: str = 'dual',
                 routing_grad: str = 'none', balance: str = 'none', balance_rate: float = 1e-3,
                 balance_until: Optional[int] = None, routing_norm: str = 'none', attention: str = 'sdpa',
                 **unknown: Any) -> None:
        super().__init__()
        arguments = {k: v for k, v in locals().items() if k not in ('self', 'unknown', '__class__')}
        groups = check_arguments(SimpleNamespace(**arguments), unknown)
        resolution = img_size // patch_size

        self.window_size = window_size
        # HAT disables shifted windows when the nominal input is no larger than one window.
        self.shift_size = 0 if resolution <= window_size else window_size // 2
        self.upscale = upscale
        self.img_range = float(img_range)
        self.ape = ape
        self.mfa = mfa
        self.moe = moe
        self.routing_grad = routing_grad_mode(routing_grad, 'MFGHMoEArch')
        """The ``routing_grad`` record (:class:`~hmoe_arch.archs.routing.RoutingGrad`); :meth:`set_routing_grad`
        switches it here and in the expert bank."""
        self.num_pixels = resolution * resolution
        self.register_buffer('mean', None if rgb_mean is None else torch.tensor(rgb_mean, dtype=torch.float32).view(
            1, in_chans, 1, 1), persistent=False)
        overlap_win_size = int(window_size * overlap_ratio) + window_size
        self.register_buffer('relative_position_index_SA', relative_position_index_self(window_size))
        self.register_buffer('relative_position_index_OCA',
                             relative_position_index_overlap(window_size, overlap_win_size))

        # shallow feature extraction
        self.conv_first = nn.Conv2d(in_chans, embed_dim, 3, 1, 1)
        # deep feature extraction
        self.patch_embed = PatchEmbed(embed_dim, norm=patch_norm)
        self.patch_unembed = PatchUnEmbed()
        if ape:
            self.absolute_pos_embed = nn.Parameter(torch.zeros(1, self.num_pixels, embed_dim))
            init_trunc_normal(self.absolute_pos_embed)
        self.pos_drop = nn.Dropout(drop_rate)
        drop_path = torch.linspace(0, drop_path_rate, sum(depths), device='cpu').tolist()
        self.layers = nn.ModuleList()
        for i, (depth, heads) in enumerate(zip(depths, num_heads)):
            start = sum(depths[:i])
            self.layers.append(ResidualHybridAttentionGroup(
                dim=embed_dim, depth=depth, num_heads=heads, window_size=window_size, shift_size=self.shift_size,
                compress_ratio=compress_ratio, squeeze_factor=squeeze_factor, conv_scale=conv_scale,
                overlap_ratio=overlap_ratio, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, qk_scale=qk_scale,
                drop=drop_rate, attn_drop=attn_drop_rate, drop_path=tuple(drop_path[start:start + depth]),
                use_checkpoint=use_checkpoint, resi_connection=resi_connection, fused_attention=attention == 'sdpa'))
        self.norm = nn.LayerNorm(embed_dim)
        if mfa:
            self.mfg = MultiLevelFeatureAggregation(len(depths), embed_dim, NUM_FEAT)
            self.aggr_conv = routing_projection(embed_dim, NUM_FEAT)
        self.conv_after_body = nn.Conv2d(embed_dim, embed_dim, 3, 1, 1) if resi_connection == '1conv' else \
            nn.Identity()
        # reconstruction
        self.conv_before_upsample = nn.Sequential(nn.Conv2d(embed_dim, NUM_FEAT, 3, 1, 1), nn.LeakyReLU(inplace=True))
        if moe:
            self.upsample = MoEUpsampler(upscale, NUM_FEAT, NUM_FEAT, groups, top_k, routing, routing_grad,
                                         balance, balance_rate, routing_norm, balance_until)
        else:
            self.upsample = Upsample(upscale, NUM_FEAT)
        self.conv_last = nn.Conv2d(NUM_FEAT, in_chans, 3, 1, 1)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            init_trunc_normal(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    def set_routing_grad(self, name: str) -> None:
        """Switch to the ``routing_grad`` mode ``name`` (a value of the network key) in the network, its expert
        bank and its routers; the weights and the forward value stay as they are."""
        self.routing_grad = routing_grad_mode(name, 'MFGHMoEArch')
        if self.moe:
            self.upsample.moe.set_routing_grad(name)

    # ----------------------------------------------------------------------------------------------------
    # stages
    def forward_features(self, x: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Deep feature extraction.

        Args:
            x: Shallow features ``(B, C, H, W)``.

        Returns:
            Deep features ``(B, C, H, W)`` (before ``conv_after_body``) and, with MFA, the aggregated routing
            features ``(B, 64, H, W)`` (else ``None``).
        """
        x_size = (x.shape[2], x.shape[3])
        attn_mask = None
        if self.shift_size > 0:
            attn_mask = shifted_window_mask(*x_size, self.window_size, self.shift_size).to(x)
        x = self.patch_embed(x)
        if self.ape:
            if x.shape[1] != self.num_pixels:
                raise ValueError(f'MFGHMoEArch: with `ape: true` the input must be img_size x img_size '
                                 f'({self.num_pixels} pixels), got {x_size}')
            x = x + self.absolute_pos_embed
        x = self.pos_drop(x)
        branch_sum = None
        # a routing_grad that does not learn routes no gradient back into the MFA branches: they run without autograd
        branch_grad = torch.is_grad_enabled() and self.routing_grad.learns
        for i, layer in enumerate(self.layers):
            x = layer(x, x_size, self.relative_position_index_SA, self.relative_position_index_OCA, attn_mask)
            if self.mfa:
                x = self.mfg.level_norm(i)(x)
                level = x.detach() if self.routing_grad.stops_at_backbone else x
                with torch.set_grad_enabled(branch_grad):
                    branch = self.mfg.branch(i)(self.patch_unembed(level, x_size))
                    branch_sum = branch if branch_sum is None else branch_sum + branch
        features = self.patch_unembed(self.norm(x), x_size)
        if branch_sum is None:
            return features, None
        with torch.set_grad_enabled(branch_grad):
            tokens = image_to_tokens(branch_sum)
            if self.routing_grad.stops_at_backbone:  # the shared final norm stays off the routing path
                tokens = F.layer_norm(tokens, self.norm.normalized_shape, self.norm.weight.detach(),
                                      self.norm.bias.detach(), self.norm.eps)
            else:
                tokens = self.norm(tokens)
            return features, self.aggr_conv(self.patch_unembed(tokens, x_size))

    def forward_reconstruction(self, x: torch.Tensor, routing_features: Optional[torch.Tensor]) -> torch.Tensor:
        """``(B, C, H, W)`` features -> ``(B, in_chans, s*H, s*W)`` (before the mean and range are undone)."""
        x = self.conv_before_upsample(x)
        if self.moe:
            if routing_features is None:  # mfa: false, the routers read these features
                routing_features = x.detach() if self.routing_grad.stops_at_backbone else x
            x = self.upsample(x, routing_features)
        else:
            x = self.upsample(x)
        return self.conv_last(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, in_chans, H, W)`` LR -> ``(B, in_chans, H * upscale, W * upscale)`` SR."""
        if x.dim() != 4 or x.shape[2] % self.window_size or x.shape[3] % self.window_size:
            raise ValueError(f'MFGHMoEArch: input must be (B, C, H, W) with H and W multiples of window_size '
                             f'({self.window_size}), got {tuple(x.shape)}; pad it (MFGHMoEModel does)')
        if self.mean is not None:
            x = x - self.mean
        x = x * self.img_range
        x = self.conv_first(x)
        features, routing_features = self.forward_features(x)
        x = self.conv_after_body(features) + x
        x = self.forward_reconstruction(x, routing_features) / self.img_range
        return x if self.mean is None else x + self.mean

    # ----------------------------------------------------------------------------------------------------
    # what the model may read after a forward
    def aux_loss(self) -> Optional[torch.Tensor]:
        """Computes the load-balancing loss of the last forward's routing (1.0 for a perfectly balanced routing);
        ``None`` without MoE. In training it joins the forward's graph: call it before ``backward``."""
        return self.upsample.moe.aux_loss() if self.moe else None

    def routing_parameter_names(self) -> List[str]:
        """Parameters that only the routing gradient reaches: the routers, the group embedding, the MFA branches
        and the routing projection (``aggr_conv``); empty without MoE."""
        return [name for name, _ in self.named_parameters()
                if name.startswith(('upsample.0.gate.', 'aggr_conv.'))
                or (name.startswith('mfg.') and int(name.split('.')[1]) % 2 == 1)]

    def balance_state_names(self) -> List[str]:
        """The state_dict names of the buffers that ``balance`` and ``routing_norm`` keep (updated in training
        mode; an EMA copy of the network must follow them too); empty without MoE or those options."""
        if not self.moe:
            return []
        return [f'upsample.0.{name}' for name in self.upsample.moe.balance_state_names()]

    def routing_maps(self) -> Optional[Dict[str, torch.Tensor]]:
        """Routing of the last forward on the LR grid: ``group`` ``(B, H, W)`` and ``expert`` ``(B, H, W, K)``
        (global expert indices), detached; ``None`` without MoE or before the first forward."""
        if not self.moe or self.upsample.moe.last_routing is None:
            return None
        return self.upsample.moe.routing_maps()

    # ----------------------------------------------------------------------------------------------------
    # foreign weights
    def load_pretrained(self, checkpoint: CheckpointSource, *, param_key: str = 'params',
                        strict: bool = False) -> LoadReport:
        """Load a HAT, authors' MFG-HMoE or hmoe_arch checkpoint (BasicSR ``.pth``, ``.safetensors`` or plain
        state_dict).

        Tensors whose name and shape match this network are loaded; with ``strict=False`` the rest of the
        network keeps its initialisation and one log block lists those modules and the checkpoint tensors
        that were not used (e.g. HAT's ``upsample.*`` when loading HAT into the MoE configuration).

        Args:
            checkpoint: A path or ``https://`` URL (:func:`hmoe_arch.checkpoints.read_checkpoint`: ``torch.load(...,
                weights_only=True)``, URLs downloaded once) or a loaded dict.
            param_key: Entry holding the weights in a BasicSR checkpoint (``params`` or ``params_ema``);
                falls back to ``params``, then ``params_ema``, then to the dict itself when it maps names to tensors.
            strict: Raise ``ValueError`` unless every network tensor is filled and every checkpoint tensor used.

        Returns:
            The :class:`~hmoe_arch.checkpoints.LoadReport`.

        Raises:
            FileNotFoundError: for a path that does not exist.
            ValueError: naming the checkpoint when it cannot be read, holds no state_dict, or (``strict``) does not
                fit exactly.
        """
        source = source_name(checkpoint)
        state = checkpoint_filter_fn(read_checkpoint(checkpoint), param_key, source)
        own = self.state_dict()
        accepted, report = match_state_dict(own, state)
        if strict and (report.unused or report.kept_init):
            raise ConfigError(f'{source}: does not match MFGHMoEArch exactly (strict=True):\n{report.summary()}')
        self.load_state_dict(accepted, strict=False)
        get_root_logger().info(f'Loaded {source} into MFGHMoEArch: {len(report.loaded)}/{len(own)} tensors.\n'
                               f'{report.summary()}')
        return report


ARCH_REGISTRY._do_register('MFGHMOE', MFGHMoEArch)
"""The authors' registry name, so their option files (``network_g.type: MFGHMOE``) build this network."""


def checkpoint_filter_fn(checkpoint: Mapping, param_key: str = 'params', source: str = UNNAMED
                         ) -> Dict[str, torch.Tensor]:
    """A BasicSR, HAT or authors' checkpoint as a state_dict in this network's names (timm's hook for foreign
    weights): :func:`hmoe_arch.checkpoints.state_dict_of` (the ``param_key`` entry, DataParallel/DDP ``module.``
    prefixes removed); the three share this network's names, so no key is renamed.

    Raises:
        CheckpointError: naming ``source`` when no entry holds a state_dict (a ``ValueError``).
    """
    return state_dict_of(checkpoint, param_key, source)
