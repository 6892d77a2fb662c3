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

Files are data: what a checkpoint or an option file may make this package build is bounded before anything is
built (:func:`check_network`): one of :data:`NETWORK_TYPES` (this project's network and the BasicSR baselines),
no argument that reads a file or downloads, at most :data:`MAX_BLOCKS` blocks and :data:`MAX_EXPERTS` experts, and
an estimated memory (:class:`NetworkSize`: the exact parameter and buffer bytes computed from the arguments, plus
the activations of one 64x64 LR forward in float32) under a limit (:func:`memory_limit_gib`: 8 GiB unless
``--max-memory``, the option key ``max_memory`` or the environment variable ``HMOE_MAX_MEMORY_GIB`` raise it).
The configuration read from tensors is checked the same way before it is returned.
"""
import inspect
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from basicsr.utils.registry import ARCH_REGISTRY

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


def _dim(state: Mapping, key: str, axis: int) -> int:
    """Size ``axis`` of the tensor ``key`` of ``state``.

    Raises:
        ConfigError: naming the tensor when it is missing or has fewer dimensions.
    """
    shape = _need(state, key).shape
    if len(shape) <= axis:
        raise ConfigError(f'{key} has the shape {list(shape)}; expected at least {axis + 1} dimension(s)')
    return int(shape[axis])


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


def config_from_state_dict(state: Mapping[str, torch.Tensor], max_memory: Optional[float] = None,
                           how_to_raise: Optional[str] = None) -> Dict[str, Any]:
    """``MFGHMoEArch`` keyword arguments that rebuild the network of ``state`` (see the module docstring), checked
    against the size bounds (:func:`check_network_size` with ``max_memory`` GiB, ``how_to_raise`` saying how to
    raise the limit; default: the environment variable) before they are returned.

    Raises:
        ConfigError: naming the tensor that is missing or has an impossible shape, or the configuration that is
            too large.
    """
    config = _config_from_tensors(state)
    check_network_size({'type': 'MFGHMoEArch', **config}, max_memory, how_to_raise or RAISE_WITH_VARIABLE)
    return config


def _config_from_tensors(state: Mapping[str, torch.Tensor]) -> Dict[str, Any]:
    """:func:`config_from_state_dict` without the size check (reads shapes only)."""
    first = _need(state, 'conv_first.weight')
    embed_dim, in_chans = _dim(state, 'conv_first.weight', 0), _dim(state, 'conv_first.weight', 1)
    depths, heads = [], []
    while f'layers.{len(depths)}.residual_group.blocks.0.attn.relative_position_bias_table' in state:
        layer = len(depths)
        depth = 0
        while f'layers.{layer}.residual_group.blocks.{depth}.norm1.weight' in state:
            depth += 1
        depths.append(depth)
        heads.append(_dim(state, f'layers.{layer}.residual_group.blocks.0.attn.relative_position_bias_table', 1))
    if not depths:
        raise ConfigError('not an MFGHMoEArch/HAT state_dict: no tensor '
                          'layers.0.residual_group.blocks.0.attn.relative_position_bias_table')
    window = _square_side(_dim(state, 'relative_position_index_SA', 0), 'relative_position_index_SA')
    overlap_window = _square_side(_dim(state, 'relative_position_index_OCA', 1), 'relative_position_index_OCA')
    if window < 1 or embed_dim < 1:
        raise ConfigError(f'conv_first.weight {list(first.shape)} and relative_position_index_SA '
                          f'{list(state["relative_position_index_SA"].shape)}: no channels or an empty window')
    block = 'layers.0.residual_group.blocks.0.'
    config: Dict[str, Any] = {
        'in_chans': in_chans, 'embed_dim': embed_dim, 'depths': depths, 'num_heads': heads, 'window_size': window,
        'overlap_ratio': (overlap_window - window) / window,
        'compress_ratio': _ratio(embed_dim, _dim(state, block + 'conv_block.cab.0.weight', 0), 3),
        'squeeze_factor': _ratio(embed_dim, _dim(state, block + 'conv_block.cab.3.attention.1.weight', 0), 30),
        'mlp_ratio': _dim(state, block + 'mlp.fc1.weight', 0) / embed_dim,
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
        config['img_size'] = _square_side(_dim(state, 'absolute_pos_embed', 1), 'absolute_pos_embed')
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
    the configuration its tensors describe (:func:`config_from_state_dict` without the size check). Options only:
    whoever builds from them checks them first with :func:`check_network` (as
    :func:`hmoe_arch.loading.load_network` does).

    Raises:
        ConfigError: for a stored entry that names a type outside :data:`NETWORK_TYPES` (before anything reads it
            further), and naming the tensor that is missing or has an impossible shape.
    """
    stored: Optional[Mapping] = checkpoint.get(CONFIG_ENTRY) if isinstance(checkpoint, Mapping) else None
    if isinstance(stored, Mapping) and stored.get('type') is not None:
        check_network_type(stored, f'its stored {CONFIG_ENTRY}')
    if isinstance(stored, Mapping) and stored.get('type') not in (None, *OWN_TYPES):
        return dict(stored)  # another architecture this project trained (a baseline): its options as saved
    config = _config_from_tensors(state)
    if isinstance(stored, Mapping):
        config = {**{k: v for k, v in stored.items() if k != 'type'}, **config}
        for key in NOT_IN_TENSORS:
            if key in stored:
                config[key] = stored[key]
    return {'type': 'MFGHMoEArch', **config}


# ----------------------------------------------------------------------------------------------------------
# which networks a file may build, and how much memory they take
NETWORK_TYPES: Dict[str, str] = {
    'MFGHMoEArch': 'this project\'s network (HAT with MFA and the MoE upsampler; HAT itself with moe/mfa false)',
    'MFGHMOE': 'the authors\' name of MFGHMoEArch',
    'EDSR': 'BasicSR\'s EDSR (baseline)',
    'RCAN': 'BasicSR\'s RCAN (baseline)',
    'RRDBNet': 'BasicSR\'s RRDBNet (baseline)',
    'SwinIR': 'BasicSR\'s SwinIR (baseline)',
}
"""``network_g.type`` values that reading weights may build (``infer``, ``export``, ``bench``, spandrel, a
checkpoint's stored options): this project's network and the BasicSR baselines of ``options/baselines``. None of
their constructors reads a file or downloads anything."""
OWN_TYPES = ('MFGHMoEArch', 'MFGHMOE')
"""The :data:`NETWORK_TYPES` that build :class:`~hmoe_arch.MFGHMoEArch`."""
NOT_DATA_ARGUMENTS = ('norm_layer', 'act_layer')
"""Baseline constructor arguments that take Python classes, not values: never accepted from a file."""
FILE_ARGUMENT = re.compile(r'(^|_)(path|paths|dir|file|url)$|pretrain|download')
"""Argument names that make a constructor read a file or download (e.g. ``load_path``, ``pretrained``); refused
for every type, whatever its constructor accepts."""

DEFAULT_MAX_MEMORY_GIB = 8.0
"""Default limit on a network's estimated memory (:class:`NetworkSize`), in GiB: over 20 times what the paper's x4
network needs (0.35 GiB), the same on every machine (a file refused on one is refused on all)."""
MAX_MEMORY_VARIABLE = 'HMOE_MAX_MEMORY_GIB'
"""Environment variable that replaces :data:`DEFAULT_MAX_MEMORY_GIB` (``--max-memory`` and the option key
``max_memory`` win over it); the only way to raise the limit for spandrel."""
ESTIMATE_LR_SIDE = 64
"""Side of the LR input (batch 1, float32, padded to a multiple of the window) whose forward the activation
estimate covers; larger tiles need about ``(tile / 64)**2`` times the activation part."""
MAX_BLOCKS = 1000
"""Most blocks a network may have in all (transformer blocks and OCABs, residual blocks, RRDBs); not raisable:
the paper's network has 42, RCAN 210. Python objects of tiny blocks cost memory and time the parameter count
does not show."""
MAX_EXPERTS = 1024
"""Most MoE experts (the paper uses 16)."""
RAISE_WITH_FLAG = f'raise the limit with --max-memory GIB (or the environment variable {MAX_MEMORY_VARIABLE})'
"""How a refusal of ``infer``, ``export`` and ``bench`` says the limit is raised."""
RAISE_WITH_OPTION = 'raise the limit with the top-level option `max_memory: GIB`'
"""How a refusal of an option file (``train``, ``test``) says the limit is raised."""
RAISE_WITH_VARIABLE = f'raise the limit with the environment variable {MAX_MEMORY_VARIABLE}=GIB'
"""How a refusal of spandrel (no flags) says the limit is raised."""
GIB = 2 ** 30
RECONSTRUCTION_WIDTH = 64
"""Channels of MFGHMoEArch's reconstruction stage, MFA branches and routing features (its ``NUM_FEAT``, HAT's
``num_feat``); this module sits below the network and does not import it."""


@dataclass(frozen=True)
class NetworkSize:
    """What a network configuration takes, computed from its arguments alone (nothing is allocated).

    Attributes:
        parameters: Parameter values (exactly ``sum(p.numel() for p in net.parameters())``).
        buffer_bytes: Bytes of its buffers (exactly, persistent or not: index tables, masks, balancing state).
        activation_values: An upper estimate of the float32 values alive during one inference forward at
            :data:`ESTIMATE_LR_SIDE` x :data:`ESTIMATE_LR_SIDE` LR, batch 1: the inputs and outputs of the widest
            layers of a block, the attention scores of all windows (and their bias and shift mask), the upsampler's
            and the output.
        blocks: Blocks in all (bounded by :data:`MAX_BLOCKS`).
        experts: MoE experts (bounded by :data:`MAX_EXPERTS`).
    """

    parameters: int
    buffer_bytes: int
    activation_values: int
    blocks: int
    experts: int = 0

    @property
    def total_bytes(self) -> int:
        """Parameters (float32) + buffers + activations (float32)."""
        return 4 * self.parameters + self.buffer_bytes + 4 * self.activation_values

    def describe(self) -> str:
        """``about X GiB (P parameters: A GiB, buffers: B GiB, one 64x64 LR forward in float32: C GiB)``."""
        return (f'about {_gib(self.total_bytes)} GiB ({self.parameters:,} parameters: {_gib(4 * self.parameters)} '
                f'GiB, buffers: {_gib(self.buffer_bytes)} GiB, one {ESTIMATE_LR_SIDE}x{ESTIMATE_LR_SIDE} LR forward '
                f'in float32: {_gib(4 * self.activation_values)} GiB)')


def _gib(size: int) -> str:
    """``size`` bytes in GiB, three significant digits (whole GiB with separators from 100 on)."""
    value = size / GIB
    return f'{value:,.0f}' if value >= 100 else f'{value:.3g}'


def _conv(c_in: int, c_out: int, kernel: int) -> int:
    """Parameters of ``Conv2d(c_in, c_out, kernel)`` with a bias."""
    return c_in * c_out * kernel * kernel + c_out


def _linear(c_in: int, c_out: int, bias: bool = True) -> int:
    return c_in * c_out + (c_out if bias else 0)


def _pixelshuffle_upsampler(scale: int, channels: int) -> List[int]:
    """Output channels of the convs of BasicSR's ``Upsample(scale, channels)`` (``4C`` per factor 2, or ``9C``)."""
    if scale == 3:
        return [9 * channels]
    return [4 * channels] * max(scale.bit_length() - 1, 0)


def _lr_pixels(multiple: int) -> int:
    """Pixels of the :data:`ESTIMATE_LR_SIDE` square padded to a multiple of ``multiple``."""
    side = -(-ESTIMATE_LR_SIDE // max(multiple, 1)) * max(multiple, 1)
    return side * side


def mfghmoe_size(options: Mapping[str, Any]) -> NetworkSize:
    """The :class:`NetworkSize` of ``MFGHMoEArch(**options)`` (every keyword present, as
    :func:`complete_arguments` gives them; the values are not validated).

    Activations at N LR pixels (:func:`_lr_pixels`), C = embed_dim, M = int(C * mlp_ratio), h the most heads, w the
    window, o the overlapping window, s the scale, 64 the reconstruction width, K top_k, k the largest expert
    kernel: ``N * (8C + 2C/compress_ratio + 2M + 3h*w^2 + h*o^2 + 4C*o^2/w^2 + w^2)`` for the backbone,
    ``N * (128 + 2C)`` for MFA, ``N * (64 + K*(64k^2 + 2*64s^2) + 64s^2)`` for the MoE head (HAT's upsampler:
    ``N * 2*64s^2``) and ``N * (in_chans + 2*s^2*in_chans)`` for the input and the output. The sum is an upper
    estimate (the backbone's and the head's tensors are not alive at once): the peaks measured on the CPU (small
    configurations, 64x64) were 0.4 to 0.6 times it.
    """
    dim, window = int(options['embed_dim']), int(options['window_size'])
    in_chans, scale = int(options['in_chans']), int(options['upscale'])
    depths, heads = [int(d) for d in options['depths']], [int(h) for h in options['num_heads']]
    compress = dim // max(int(options['compress_ratio']), 1)
    squeeze = dim // max(int(options['squeeze_factor']), 1)
    hidden = int(dim * float(options['mlp_ratio']))
    overlap = int(window * float(options['overlap_ratio'])) + window
    qkv_bias, feat = bool(options['qkv_bias']), RECONSTRUCTION_WIDTH
    hab = (2 * dim + _linear(dim, 3 * dim, qkv_bias) + _linear(dim, dim)
           + _conv(dim, compress, 3) + _conv(compress, dim, 3) + _conv(dim, squeeze, 1) + _conv(squeeze, dim, 1)
           + 2 * dim + _linear(dim, hidden) + _linear(hidden, dim))
    ocab = 2 * dim + _linear(dim, 3 * dim, qkv_bias) + _linear(dim, dim) + 2 * dim + _linear(dim, hidden) \
        + _linear(hidden, dim)
    group_conv = _conv(dim, dim, 3) if options['resi_connection'] == '1conv' else 0
    params = _conv(in_chans, dim, 3) + (2 * dim if options['patch_norm'] else 0) + 2 * dim
    if options['ape']:
        params += (int(options['img_size']) // max(int(options['patch_size']), 1)) ** 2 * dim
    for depth, count in zip(depths, heads):
        params += depth * (hab + (2 * window - 1) ** 2 * count) + ocab + (window + overlap - 1) ** 2 * count \
            + group_conv
    levels = min(len(depths), len(heads))
    if options['mfa']:
        params += levels * (2 * dim + _conv(dim, feat, 3) + _conv(feat, dim, 3)) + _conv(dim, feat, 3)
    params += group_conv + _conv(dim, feat, 3) + _conv(feat, in_chans, 3)
    buffers = 8 * window ** 2 * (window ** 2 + overlap ** 2) + (4 * in_chans if options['rgb_mean'] is not None else 0)
    groups = [(int(g['kernel_size']), int(g['num_experts'])) for g in options['expert_groups']]
    experts = sum(count for _, count in groups)
    pixels, top_k, most_heads = _lr_pixels(window), int(options['top_k']), max(heads, default=1)
    if options['moe']:
        num_groups, largest = len(groups), max((count for _, count in groups), default=0)
        params += sum(count * _conv(feat, scale * scale * feat, k) for k, count in groups)
        if options['routing'] == 'dual':
            params += _linear(feat, num_groups) + sum(_linear(feat, count) for _, count in groups) + num_groups * feat
            buffers += 8 * num_groups + num_groups * largest
            if options['balance'] == 'bias':
                buffers += 4 * (num_groups + num_groups * largest) + 8
        else:
            params += _linear(feat, experts)
            buffers += 8 * experts + (4 * experts + 8 if options['balance'] == 'bias' else 0)
        if options['routing_norm'] == 'center':
            buffers += 4 * feat + 8
        kernel = max((k for k, _ in groups), default=1)
        head = feat + top_k * (feat * kernel * kernel + 2 * feat * scale * scale) + feat * scale * scale
    else:
        params += sum(_conv(feat, out, 3) for out in _pixelshuffle_upsampler(scale, feat))
        head = 2 * feat * scale * scale
    backbone = (8 * dim + 2 * compress + 2 * hidden + 3 * most_heads * window ** 2 + most_heads * overlap ** 2
                + 4 * dim * overlap ** 2 // max(window ** 2, 1) + window ** 2)
    mfa = 2 * feat + 2 * dim if options['mfa'] else 0
    activations = pixels * (in_chans + backbone + mfa + head + 2 * scale * scale * in_chans)
    return NetworkSize(parameters=params, buffer_bytes=buffers, activation_values=activations,
                       blocks=sum(depths) + levels, experts=experts if options['moe'] else 0)


def edsr_size(options: Mapping[str, Any]) -> NetworkSize:
    """BasicSR's ``EDSR``: activations ``N * (6F + 2*F*s^2 + 2*out*s^2)`` (F = num_feat)."""
    feat, blocks, scale = int(options['num_feat']), int(options['num_block']), int(options['upscale'])
    out = int(options['num_out_ch'])
    ups = _pixelshuffle_upsampler(scale, feat)
    params = (_conv(int(options['num_in_ch']), feat, 3) + blocks * 2 * _conv(feat, feat, 3) + _conv(feat, feat, 3)
              + sum(_conv(feat, c, 3) for c in ups) + _conv(feat, out, 3))
    pixels = _lr_pixels(1)
    return NetworkSize(parameters=params, buffer_bytes=0, blocks=blocks,
                       activation_values=pixels * (6 * feat + 2 * feat * scale * scale + 2 * out * scale * scale))


def rcan_size(options: Mapping[str, Any]) -> NetworkSize:
    """BasicSR's ``RCAN``: activations ``N * (6F + 2*F*s^2 + 2*out*s^2)``."""
    feat, groups, blocks = int(options['num_feat']), int(options['num_group']), int(options['num_block'])
    scale, out = int(options['upscale']), int(options['num_out_ch'])
    squeezed = feat // max(int(options['squeeze_factor']), 1)
    rcab = 2 * _conv(feat, feat, 3) + _conv(feat, squeezed, 1) + _conv(squeezed, feat, 1)
    params = (_conv(int(options['num_in_ch']), feat, 3) + groups * (blocks * rcab + _conv(feat, feat, 3))
              + _conv(feat, feat, 3) + sum(_conv(feat, c, 3) for c in _pixelshuffle_upsampler(scale, feat))
              + _conv(feat, out, 3))
    pixels = _lr_pixels(1)
    return NetworkSize(parameters=params, buffer_bytes=0, blocks=groups * (blocks + 1),
                       activation_values=pixels * (6 * feat + 2 * feat * scale * scale + 2 * out * scale * scale))


def rrdbnet_size(options: Mapping[str, Any]) -> NetworkSize:
    """BasicSR's ``RRDBNet`` (x4 by two nearest x2 steps; x2 and x1 unshuffle the input first): activations
    ``B * 3(F + 4G) + 4B * 2F + 16B * (3F + out)`` for B body pixels (G = num_grow_ch)."""
    feat, grow, blocks = int(options['num_feat']), int(options['num_grow_ch']), int(options['num_block'])
    scale, out = int(options['scale']), int(options['num_out_ch'])
    in_chans = int(options['num_in_ch']) * {2: 4, 1: 16}.get(scale, 1)
    rdb = sum(_conv(feat + i * grow, grow, 3) for i in range(4)) + _conv(feat + 4 * grow, feat, 3)
    params = _conv(in_chans, feat, 3) + blocks * 3 * rdb + 4 * _conv(feat, feat, 3) + _conv(feat, out, 3)
    body = _lr_pixels(1) * {2: 4, 1: 1}.get(scale, 16) // 16
    return NetworkSize(parameters=params, buffer_bytes=0, blocks=blocks,
                       activation_values=body * (3 * (feat + 4 * grow) + 8 * feat + 16 * (3 * feat + out)))


def swinir_size(options: Mapping[str, Any]) -> NetworkSize:
    """BasicSR's ``SwinIR``: its shifted blocks keep a float mask of ``R^2 * w^2`` values for the nominal
    resolution R = img_size // patch_size; activations ``N * (8C + 2M + 3h*w^2)`` plus the upsampler's."""
    dim, in_chans, scale = int(options['embed_dim']), int(options['in_chans']), int(options['upscale'])
    resolution = int(options['img_size']) // max(int(options['patch_size']), 1)
    window = min(int(options['window_size']), resolution) if resolution > 0 else int(options['window_size'])
    shifted = resolution > int(options['window_size'])
    depths, heads = [int(d) for d in options['depths']], [int(h) for h in options['num_heads']]
    hidden, qkv_bias = int(dim * float(options['mlp_ratio'])), bool(options['qkv_bias'])
    feat = 64  # SwinIR's fixed reconstruction width
    block = 4 * dim + _linear(dim, 3 * dim, qkv_bias) + _linear(dim, dim) + _linear(dim, hidden) + \
        _linear(hidden, dim)
    quarter = dim // 4
    residual = {'1conv': _conv(dim, dim, 3),
                '3conv': _conv(dim, quarter, 3) + _conv(quarter, quarter, 1) + _conv(quarter, dim, 3)}.get(
        options['resi_connection'], 0)
    params = _conv(in_chans, dim, 3) + (2 * dim if options['patch_norm'] else 0) + 2 * dim + residual
    if options['ape']:
        params += resolution * resolution * dim
    buffers = 0
    for depth, count in zip(depths, heads):
        params += depth * (block + (2 * window - 1) ** 2 * count) + residual
        buffers += depth * 8 * window ** 4 + (depth // 2 if shifted else 0) * 4 * resolution ** 2 * window ** 2
    upsampler = options['upsampler']
    if upsampler == 'pixelshuffle':
        params += _conv(dim, feat, 3) + sum(_conv(feat, c, 3) for c in _pixelshuffle_upsampler(scale, feat)) + \
            _conv(feat, in_chans, 3)
        head = 2 * feat * scale * scale
    elif upsampler == 'pixelshuffledirect':
        params += _conv(dim, scale * scale * in_chans, 3)
        head = scale * scale * in_chans
    elif upsampler == 'nearest+conv':
        params += _conv(dim, feat, 3) + 3 * _conv(feat, feat, 3) + _conv(feat, in_chans, 3)
        head = 2 * feat * scale * scale
    else:
        params += _conv(dim, in_chans, 3)
        head = 0
    pixels = _lr_pixels(int(options['window_size']))
    attention = 3 * max(heads, default=1) * window ** 2
    return NetworkSize(parameters=params, buffer_bytes=buffers, blocks=sum(depths),
                       activation_values=pixels * (in_chans + 8 * dim + 2 * hidden + attention + head
                                                   + 2 * scale * scale * in_chans))


SIZES: Dict[str, Callable[[Mapping[str, Any]], NetworkSize]] = {
    'MFGHMoEArch': mfghmoe_size, 'MFGHMOE': mfghmoe_size, 'EDSR': edsr_size, 'RCAN': rcan_size,
    'RRDBNet': rrdbnet_size, 'SwinIR': swinir_size}
"""The size function of every :data:`NETWORK_TYPES` entry."""
COUNT_ARGUMENTS: Dict[str, Tuple[str, ...]] = {
    'EDSR': ('num_in_ch', 'num_out_ch', 'num_feat', 'num_block', 'upscale'),
    'RCAN': ('num_in_ch', 'num_out_ch', 'num_feat', 'num_group', 'num_block', 'squeeze_factor', 'upscale'),
    'RRDBNet': ('num_in_ch', 'num_out_ch', 'scale', 'num_feat', 'num_block', 'num_grow_ch'),
    'SwinIR': ('img_size', 'patch_size', 'in_chans', 'embed_dim', 'window_size', 'upscale'),
}
"""The integer arguments of each baseline (checked to be integers >= 1, ``num_block`` >= 0, before the estimate)."""


def _constructor(type_name: str) -> Any:
    """The class ``type_name`` names in BasicSR's registry (BasicSR's architectures; this project's are imported by
    the lookup itself, :mod:`hmoe_arch.registration`)."""
    import basicsr.archs  # noqa: F401  (registers BasicSR's architectures, the baselines among them)
    return ARCH_REGISTRY.get(type_name)


def complete_arguments(network: Mapping[str, Any]) -> Dict[str, Any]:
    """``network`` (a ``network_g`` of a :data:`NETWORK_TYPES` type) without ``type`` and with every constructor
    keyword that has a default filled in (the values are not validated).

    Raises:
        ConfigError: for an argument that takes a Python class or names a file (:data:`FILE_ARGUMENT`), and for a
            baseline's argument its constructor does not have.
    """
    type_name = network.get('type')
    signature = inspect.signature(_constructor(type_name).__init__)
    accepted = {name: p.default for name, p in signature.parameters.items()
                if name != 'self' and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
    given = {k: v for k, v in network.items() if k != 'type'}
    for key in given:
        if FILE_ARGUMENT.search(str(key)) or key in NOT_DATA_ARGUMENTS:
            raise ConfigError(f'{type_name}: the argument `{key}` is refused: a network read from a file is built '
                              'from plain values, and never reads other files or downloads')
    if type_name not in OWN_TYPES:  # MFGHMoEArch names unknown keys itself, with a did-you-mean
        unknown = sorted(str(k) for k in given if k not in accepted)
        if unknown:
            raise ConfigError(f'{type_name}: unknown argument(s) {unknown}; valid: {", ".join(sorted(accepted))}')
    defaults = {k: v for k, v in accepted.items() if v is not inspect.Parameter.empty}
    return {**defaults, **given}


def _check_baseline_values(type_name: str, arguments: Mapping[str, Any]) -> None:
    """The integer arguments of a baseline (:data:`COUNT_ARGUMENTS`, and SwinIR's lists) that the estimate reads."""
    for key in COUNT_ARGUMENTS[type_name]:
        value, least = arguments.get(key), 0 if key == 'num_block' else 1
        if not isinstance(value, int) or isinstance(value, bool) or value < least:
            raise ConfigError(f'{type_name}: `{key}` must be an integer >= {least}, got {value!r}')
    if type_name == 'SwinIR':
        for key in ('depths', 'num_heads'):
            value = arguments.get(key)
            if not isinstance(value, (list, tuple)) or not all(
                    isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in value):
                raise ConfigError(f'SwinIR: `{key}` must be a list of integers >= 1, got {value!r}')
        ratio = arguments.get('mlp_ratio')
        if not isinstance(ratio, (int, float)) or isinstance(ratio, bool) or not 0 < ratio < math.inf:
            raise ConfigError(f'SwinIR: `mlp_ratio` must be a positive number, got {ratio!r}')


def check_network_type(network: Any, where: str = 'network_g') -> str:
    """The ``type`` of ``network`` when it is one of :data:`NETWORK_TYPES`.

    Raises:
        ConfigError: naming ``where`` (when not empty) for a ``network`` that is no mapping, has no ``type`` or
            another one.
    """
    if not isinstance(network, Mapping):
        raise ConfigError(f'{where}: expected a mapping of network options, got {type(network).__name__}')
    type_name = network.get('type')
    if not isinstance(type_name, str) or type_name not in NETWORK_TYPES:
        raise ConfigError(f'{where}: the type {type_name!r} is not one this project builds from a file; expected '
                          f'one of {", ".join(NETWORK_TYPES)}'.lstrip(': '))
    return type_name


def memory_limit_gib(max_memory: Optional[float] = None) -> float:
    """The limit on a network's estimated memory in GiB: ``max_memory`` when given, else the environment variable
    :data:`MAX_MEMORY_VARIABLE`, else :data:`DEFAULT_MAX_MEMORY_GIB`.

    Raises:
        ConfigError: for a limit (or a variable) that is not a number > 0.
    """
    where = 'max_memory'
    if max_memory is None:
        text = os.environ.get(MAX_MEMORY_VARIABLE)
        if text is None or not text.strip():
            return DEFAULT_MAX_MEMORY_GIB
        where = MAX_MEMORY_VARIABLE
        try:
            max_memory = float(text)
        except ValueError:
            raise ConfigError(f'{MAX_MEMORY_VARIABLE}={text!r}: expected a number of GiB > 0') from None
    if isinstance(max_memory, bool) or not isinstance(max_memory, (int, float)) or not 0 < max_memory < math.inf:
        raise ConfigError(f'{where}: expected a number of GiB > 0, got {max_memory!r}')
    return float(max_memory)


def _size_or_none(size_of: Callable[[Mapping[str, Any]], NetworkSize], arguments: Mapping[str, Any]
                  ) -> Optional[NetworkSize]:
    try:
        return size_of(arguments)
    except (ArithmeticError, ValueError, TypeError, KeyError):
        return None


def _main_cause(type_name: str, arguments: Mapping[str, Any], measure: Callable[[NetworkSize], int],
                bound: float) -> str:
    """`` with <key>: <value>`` for the argument whose default alone would shrink ``measure`` (of the
    :class:`NetworkSize`) most, when that brings it within ``bound`` or at least halves it; '' otherwise."""
    defaults = complete_arguments({'type': type_name})
    current = _size_or_none(SIZES[type_name], arguments)
    best, least = '', measure(current) if current is not None else math.inf
    for key, value in arguments.items():
        if key not in defaults or value == defaults[key]:
            continue
        trial = {**arguments, key: defaults[key]}
        for first, second in (('depths', 'num_heads'), ('num_heads', 'depths')):
            if key == first and len(defaults[first]) != len(arguments.get(second, ())):
                trial[second] = defaults[second]
        size = _size_or_none(SIZES[type_name], trial)
        if size is not None and measure(size) < least:
            best, least = f' with {key}: {_shown(value)}', measure(size)
    if current is not None and least > bound and 2 * least > measure(current):
        return ''
    return best


def _shown(value: Any) -> str:
    """``value`` for a message: a list of more than six entries as its length and first three."""
    if isinstance(value, (list, tuple)) and len(value) > 6:
        return f'[{", ".join(str(v) for v in value[:3])}, ... ({len(value)} entries)]'
    return str(value)


def check_network_size(network: Mapping[str, Any], max_memory: Optional[float] = None,
                       how_to_raise: str = RAISE_WITH_FLAG) -> Optional[NetworkSize]:
    """The :class:`NetworkSize` of ``network`` (a ``network_g`` of a :data:`NETWORK_TYPES` type), refused above
    :data:`MAX_BLOCKS` blocks, :data:`MAX_EXPERTS` experts or the memory limit (:func:`memory_limit_gib` of
    ``max_memory``, in GiB). None for values the size cannot be computed from (a list of strings where counts
    belong, say): values MFGHMoEArch's constructor refuses before it builds anything.

    Raises:
        ConfigError: one line with the type, the argument that makes it large, the estimate and ``how_to_raise``
            (the memory limit; the block and expert bounds are fixed).
    """
    type_name = network['type']
    arguments = complete_arguments(network)
    limit = memory_limit_gib(max_memory)
    size = _size_or_none(SIZES[type_name], arguments)
    if size is None:
        return None
    if size.blocks > MAX_BLOCKS:
        cause = _main_cause(type_name, arguments, lambda s: s.blocks, MAX_BLOCKS)
        raise ConfigError(f'{type_name}{cause} has {size.blocks} blocks in all, '
                          f'more than {MAX_BLOCKS} (a fixed bound; the paper\'s network has 42)')
    if size.experts > MAX_EXPERTS:
        raise ConfigError(f'{type_name}: {size.experts} experts in all, more than {MAX_EXPERTS} (a fixed bound; the '
                          'paper uses 16)')
    if size.total_bytes > limit * GIB:
        cause = _main_cause(type_name, arguments, lambda s: s.total_bytes, limit * GIB)
        raise ConfigError(f'{type_name}{cause} needs '
                          f'{size.describe()}, more than the limit of {limit:g} GiB; {how_to_raise}')
    return size


def check_network(network: Any, max_memory: Optional[float] = None, how_to_raise: str = RAISE_WITH_FLAG,
                  where: str = 'network_g') -> Optional[NetworkSize]:
    """Everything that is refused before a network read from a file is built: a type outside
    :data:`NETWORK_TYPES`, an argument that names a file or takes a class, a baseline's integer argument that is
    not one, and a size above the bounds (:func:`check_network_size`). Allocates nothing. MFGHMoEArch's own value
    checks stay with its constructor, which runs them before building anything.

    Raises:
        ConfigError: one line naming the type or ``where``, the argument and what was expected.
    """
    type_name = check_network_type(network, where)
    arguments = complete_arguments(network)
    if type_name not in OWN_TYPES:
        _check_baseline_values(type_name, arguments)
    return check_network_size(network, max_memory, how_to_raise)
