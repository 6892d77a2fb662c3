"""The ``MFGHMoEArch`` configuration that a state_dict describes (this project's, the authors' or HAT's).

Everything that shapes a tensor is read from the tensors (the way spandrel reads HAT's): ``in_chans`` and
``embed_dim`` from ``conv_first``; ``depths`` from the block indices; ``num_heads`` and ``window_size`` from the
relative-position tables and indices; ``overlap_ratio`` from the overlapping-attention index; ``compress_ratio``,
``squeeze_factor`` and ``mlp_ratio`` from the channel-attention and MLP widths; ``qkv_bias``, ``patch_norm``,
``ape`` (and then ``img_size``) and ``resi_connection`` from which tensors exist; ``upscale`` from the
upsampler; ``moe``, ``mfa``, ``routing`` and ``expert_groups`` (sizes from the routers, kernel sizes from the
experts); ``balance: bias`` and ``routing_norm: center`` from their buffers (``balance_rate`` and
``balance_until``, training settings, are not recorded).

What no tensor records -- ``top_k``, ``rgb_mean``, ``img_range`` -- is taken from the ``network_g`` entry that
this project writes into its checkpoints (:data:`CONFIG_ENTRY`), and otherwise defaults to the authors' values
(top-1, no mean, range 1) for MoE networks and to HAT's (its RGB mean) for the exact-HAT configuration.
"""
import math
from collections.abc import Mapping
from typing import Any, Dict, List, Optional

import torch

from ..checkpoints import CONFIG_ENTRY
from ..errors import ConfigError

HAT_RGB_MEAN = (0.4488, 0.4371, 0.4040)
"""HAT's ``rgb_mean`` (DIV2K's mean RGB in [0, 1]): with ``moe: false, mfa: false`` MFGHMoEArch is exactly HAT."""
NOT_IN_TENSORS = ('top_k', 'rgb_mean', 'img_range')
"""Keys no tensor records."""


def _need(state: Mapping, key: str) -> torch.Tensor:
    if key not in state:
        raise ConfigError(f'not an MFGHMoEArch/HAT state_dict: no tensor {key}')
    return state[key]


def _ratio(dim: int, width: int, preferred: int) -> int:
    """The divisor ``r`` with ``dim // r == width``: ``preferred`` when it fits, else ``dim // width`` (any fitting
    value builds the same network)."""
    for ratio in (preferred, dim // max(width, 1)):
        if ratio >= 1 and dim // ratio == width:
            return ratio
    raise ConfigError(f'no integer ratio maps {dim} channels to {width}')


def _square_side(count: int, what: str) -> int:
    side = math.isqrt(count)
    if side * side != count:
        raise ConfigError(f'{what} has {count} entries, not a square number')
    return side


def upscale_of(state: Mapping) -> int:
    """The upscaling factor from the MoE experts (``scale**2 * C`` outputs) or HAT's pixel-shuffle convs."""
    experts = state.get('upsample.0.experts.0.weight')
    if experts is not None:
        out_channels, in_channels = experts.shape[:2] if experts.dim() == 4 else (0, 0)
        scale = math.isqrt(out_channels // in_channels) if in_channels and out_channels % in_channels == 0 else 0
        if scale < 1 or scale * scale * in_channels != out_channels:
            raise ConfigError(f'upsample.0.experts.0.weight has the shape {list(experts.shape)}; an expert is a conv '
                              '(scale^2 * C, C, k, k)')
        return scale
    names = [k for k in state if k.startswith('upsample.') and k.endswith('.weight') and state[k].dim() == 4
             and k.split('.')[1].isdigit() and min(state[k].shape[:2]) > 0]
    convs = [state[k] for k in sorted(names, key=lambda k: int(k.split('.')[1]))]
    if convs and all(c.shape[0] == 4 * c.shape[1] for c in convs):
        return 2 ** len(convs)
    if len(convs) == 1 and convs[0].shape[0] == 9 * convs[0].shape[1]:
        return 3
    raise ConfigError('cannot tell the upscaling factor: no upsample.* convs of a pixel-shuffle upsampler')


def _expert_groups(state: Mapping) -> List[Dict[str, int]]:
    kernels = []
    index = 0
    while f'upsample.0.experts.{index}.weight' in state:
        kernels.append(int(state[f'upsample.0.experts.{index}.weight'].shape[-1]))
        index += 1
    if 'upsample.0.gate.w_group_gate.weight' in state:
        sizes, group = [], 0
        while f'upsample.0.gate.w_expert_gates.{group}.weight' in state:
            sizes.append(int(state[f'upsample.0.gate.w_expert_gates.{group}.weight'].shape[0]))
            group += 1
    else:  # single routing: consecutive experts of one kernel size form a group
        sizes = []
        for position, k in enumerate(kernels):
            if position and k == kernels[position - 1]:
                sizes[-1] += 1
            else:
                sizes.append(1)
    if sum(sizes) != len(kernels):
        raise ConfigError(f'the routers choose among {sum(sizes)} experts but there are {len(kernels)}')
    groups, start = [], 0
    for size in sizes:
        group_kernels = set(kernels[start:start + size])
        if len(group_kernels) != 1:
            raise ConfigError(f'experts {start}..{start + size - 1} of one group have kernel sizes {group_kernels}')
        groups.append({'kernel_size': group_kernels.pop(), 'num_experts': size})
        start += size
    return groups


def config_from_state_dict(state: Mapping[str, torch.Tensor]) -> Dict[str, Any]:
    """``MFGHMoEArch`` keyword arguments that rebuild the network of ``state`` (see the module docstring).

    Raises:
        ConfigError: naming the tensor that is missing or has an impossible shape.
    """
    first = _need(state, 'conv_first.weight')
    embed_dim, in_chans = int(first.shape[0]), int(first.shape[1])
    depths, heads = [], []
    while f'layers.{len(depths)}.residual_group.blocks.0.attn.relative_position_bias_table' in state:
        layer = len(depths)
        depth = 0
        while f'layers.{layer}.residual_group.blocks.{depth}.norm1.weight' in state:
            depth += 1
        depths.append(depth)
        heads.append(int(state[f'layers.{layer}.residual_group.blocks.0.attn.relative_position_bias_table'].shape[1]))
    if not depths:
        raise ConfigError('not an MFGHMoEArch/HAT state_dict: no tensor '
                          'layers.0.residual_group.blocks.0.attn.relative_position_bias_table')
    window = _square_side(int(_need(state, 'relative_position_index_SA').shape[0]), 'relative_position_index_SA')
    overlap_window = _square_side(int(_need(state, 'relative_position_index_OCA').shape[1]),
                                  'relative_position_index_OCA')
    block = 'layers.0.residual_group.blocks.0.'
    config: Dict[str, Any] = {
        'in_chans': in_chans, 'embed_dim': embed_dim, 'depths': depths, 'num_heads': heads, 'window_size': window,
        'overlap_ratio': (overlap_window - window) / window,
        'compress_ratio': _ratio(embed_dim, int(_need(state, block + 'conv_block.cab.0.weight').shape[0]), 3),
        'squeeze_factor': _ratio(embed_dim, int(_need(state, block + 'conv_block.cab.3.attention.1.weight').shape[0]),
                                 30),
        'mlp_ratio': int(_need(state, block + 'mlp.fc1.weight').shape[0]) / embed_dim,
        'qkv_bias': block + 'attn.qkv.bias' in state,
        'patch_norm': 'patch_embed.norm.weight' in state,
        'ape': 'absolute_pos_embed' in state,
        'resi_connection': '1conv' if 'conv_after_body.weight' in state else 'identity',
        'upscale': upscale_of(state),
        'moe': 'upsample.0.experts.0.weight' in state,
        'mfa': 'mfg.0.weight' in state,
    }
    if config['mlp_ratio'] == int(config['mlp_ratio']):
        config['mlp_ratio'] = float(int(config['mlp_ratio']))
    if config['ape']:
        config['img_size'] = _square_side(int(state['absolute_pos_embed'].shape[1]), 'absolute_pos_embed')
    if config['moe']:
        config['expert_groups'] = _expert_groups(state)
        config['routing'] = 'dual' if 'upsample.0.gate.w_group_gate.weight' in state else 'single'
        if 'upsample.0.gate.expert_bias' in state:
            config['balance'] = 'bias'
        if 'upsample.0.feature_mean' in state:
            config['routing_norm'] = 'center'
        config.update(top_k=1, rgb_mean=None, img_range=1.0)  # the authors' values
    else:
        config.update(rgb_mean=list(HAT_RGB_MEAN) if in_chans == 3 else None, img_range=1.0)  # HAT's
    return config


def network_config(checkpoint: Mapping, state: Mapping[str, torch.Tensor]) -> Dict[str, Any]:
    """The network options of a loaded checkpoint: the ``network_g`` entry this project writes (tensor shapes
    still read from ``state`` win; for a baseline architecture the entry as saved) or, for foreign checkpoints,
    :func:`config_from_state_dict` alone."""
    stored: Optional[Mapping] = checkpoint.get(CONFIG_ENTRY) if isinstance(checkpoint, Mapping) else None
    if isinstance(stored, Mapping) and stored.get('type') not in (None, 'MFGHMoEArch', 'MFGHMOE'):
        return dict(stored)  # another architecture this project trained (a baseline): its options as saved
    config = config_from_state_dict(state)
    if isinstance(stored, Mapping):
        config = {**{k: v for k, v in stored.items() if k != 'type'}, **config}
        for key in NOT_IN_TENSORS:
            if key in stored:
                config[key] = stored[key]
    return {'type': 'MFGHMoEArch', **config}
