"""A network with its weights from a checkpoint: a ``.pth`` or ``.safetensors`` file, or an ``https://`` URL of one
(:mod:`hmoe_arch.checkpoints`), built from an option file's ``network_g``, from ``key=value`` overrides, or from
the checkpoint alone (:func:`hmoe_arch.archs.config.network_config`). ``basicsr infer``, ``export`` and ``bench``
load their networks here.

Every error is an :class:`~hmoe_arch.errors.OptionError` that names the flag or option key which gave the file
(``label``, e.g. ``--weights`` or ``path.pretrain_network_g``) and the file.
"""
import math
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Sequence, Set, Tuple, Union

import torch
from basicsr.archs import build_network
from basicsr.utils import get_root_logger

from .archs import MFGHMoEArch
from .archs.config import RAISE_WITH_FLAG, check_network, network_config, upscale_of
from .checkpoints import (
    check_tensor_values,
    file_digest,
    is_url,
    local_checkpoint,
    nonfinite_keys,
    read_checkpoint_file,
    state_dict_of,
)
from .errors import CheckpointError, ConfigError, OptionError
from .options import apply_force_yml, read_option_file

DEFAULT_NETWORK = {'type': 'MFGHMoEArch'}
"""The ``network_g`` without an option file: MFGHMoEArch with its defaults (the paper's configuration)."""


def with_overrides(network: Mapping[str, Any], overrides: Sequence[str]) -> Dict[str, Any]:
    """A copy of ``network`` (a ``network_g``) with each ``key=value`` of ``overrides`` applied as
    ``--force_yml network_g:key=value`` applies it (the value parsed as YAML;
    :func:`hmoe_arch.options.apply_force_yml`).

    Raises:
        OptionError: naming the entry that is not ``key=value`` or whose value is not YAML.
    """
    holder = {'network_g': dict(network)}
    for entry in overrides:
        apply_force_yml(holder, f'network_g:{entry}')
    return holder['network_g']


def network_and_scale(opt_path: Optional[Path], arch_args: Sequence[str]) -> Tuple[Dict[str, Any], Optional[int]]:
    """``network_g`` of the option file at ``opt_path`` (without one: :data:`DEFAULT_NETWORK`) with the
    ``key=value`` entries of ``arch_args`` applied (:func:`with_overrides`), and the option file's top-level
    ``scale`` (None without an option file or that key).

    Raises:
        OptionError: for an option file that cannot be read or has no ``network_g``, and for a bad entry.
    """
    if opt_path is None:
        return with_overrides(DEFAULT_NETWORK, arch_args), None
    opt = read_option_file(opt_path, required=('network_g',))
    return with_overrides(opt['network_g'], arch_args), opt.get('scale')


def network_options(opt_path: Optional[Path], arch_args: Sequence[str]) -> Dict[str, Any]:
    """``network_g`` of an option file (default: MFGHMoEArch's defaults) with ``key=value`` overrides (YAML)."""
    return network_and_scale(opt_path, arch_args)[0]


UNPINNED_WARNED: Set[str] = set()
"""The URLs without ``#sha256=`` that :func:`local_weights` has warned about in this process."""


def local_weights(weights: Union[str, Path], label: str = '--weights') -> Path:
    """``weights`` itself, or for an ``https://`` URL its cached download
    (:func:`hmoe_arch.checkpoints.local_checkpoint`). A URL without ``#sha256=<hex>`` gets one WARNING line on
    BasicSR's root logger, the first time in the process: it names ``label``, the URL and the SHA-256 of the
    downloaded file, to append to the URL so that later downloads are checked against it.

    Raises:
        OptionError: naming ``label`` and the URL when it cannot be downloaded or fails its hash check.
    """
    try:
        path = local_checkpoint(weights)
    except CheckpointError as error:
        raise OptionError(f'{label} {error}') from None
    url = str(weights)
    if is_url(url) and '#' not in url and url not in UNPINNED_WARNED:
        UNPINNED_WARNED.add(url)
        digest = file_digest(path, 'sha256')
        get_root_logger().warning(f'{label} {url} is not pinned to its content: append #sha256={digest} to the URL '
                                  'to check the download on every use')
    return path


def read_weights(weights: Path, param_key: str, label: str) -> Tuple[Mapping[str, Any], Dict[str, torch.Tensor]]:
    """The checkpoint in a file (``.pth`` or ``.safetensors``) and the state_dict in it
    (:func:`hmoe_arch.checkpoints.state_dict_of`: the ``param_key`` entry, else ``params``, else ``params_ema``,
    else the file itself; no tensor may show more values than the file stores); every floating-point tensor must
    be finite (checked in chunks, :func:`hmoe_arch.checkpoints.nonfinite_keys`).

    Raises:
        OptionError: naming ``label`` and the file: not a readable checkpoint (without PyTorch's advice to
            unpickle it unsafely), no state_dict inside, a tensor that is no plain tensor or a view larger than
            what it stores, or NaN/Inf values.
    """
    try:
        checkpoint = read_checkpoint_file(weights)
        state = state_dict_of(checkpoint, param_key, str(weights))
    except CheckpointError as error:
        raise OptionError(f'{label} {error}') from None
    broken = nonfinite_keys(state)
    if broken:
        raise OptionError(f'{label} {weights}: {len(broken)} tensor(s) hold NaN or Inf values, e.g. {broken[:3]}; the '
                          'network would write black images (was training stopped by a diverged loss?)')
    return checkpoint, state


def checkpoint_scale(state: Mapping[str, torch.Tensor]) -> Optional[int]:
    """The upscaling factor a state_dict was trained for, read from its upsampler's shapes
    (:func:`hmoe_arch.archs.config.upscale_of`); None when it has no upsampler that tells.

    Raises:
        OptionError: for MoE experts of an impossible shape.
    """
    try:
        return upscale_of(state)
    except ConfigError as error:
        if 'upsample.0.experts.0.weight' in state:
            raise OptionError(str(error)) from None
        return None


def measured_scale(net: torch.nn.Module, declared: Dict[str, Optional[int]], device: torch.device, window: int,
                   in_chans: int = 3) -> int:
    """The network's real upscaling factor, from its output on a small probe input ``(1, in_chans, s, s)`` (``s``
    the smallest multiple of ``window`` that is at least 8), checked against every declared factor (``declared``:
    where it is declared -> the factor, None where it is not).

    Raises:
        OptionError: when the output is not an integer multiple of the input or disagrees with a declaration.
    """
    side = window * max(1, math.ceil(8 / window))
    with torch.no_grad():
        out = net(torch.zeros(1, in_chans, side, side, device=device))
    if out.shape[2] % side or out.shape[3] % side or out.shape[2] != out.shape[3]:
        raise OptionError(f'the network maps a {side}x{side} input to {out.shape[2]}x{out.shape[3]}: not an integer '
                          'upscaling factor')
    scale = out.shape[2] // side
    wrong = {source: value for source, value in declared.items() if value is not None and value != scale}
    if wrong:
        raise OptionError(f'the network upscales x{scale}, but ' + ', '.join(f'{k} says x{v}' for k, v in wrong.items())
                          + '; the weights or the options are for another scale')
    return scale


def load_network(weights: Union[str, Path], network: Optional[Mapping[str, Any]], device: torch.device, *,
                 param_key: str = 'params_ema', strict: bool = True, label: str = '--weights',
                 overrides: Sequence[str] = (), max_memory: Optional[float] = None,
                 how_to_raise: str = RAISE_WITH_FLAG) -> torch.nn.Module:
    """The network with ``weights`` (a file or URL) loaded, in eval mode on ``device``; its options are kept as
    ``net.network_options``.

    The weights are the ``param_key`` entry, else ``params``, else ``params_ema``, else the file itself as a
    state_dict (:func:`read_weights`; ``weights_only``). With ``network`` None its options come from the checkpoint
    (:func:`hmoe_arch.archs.config.network_config`); ``overrides`` (``key=value``) apply on top. Before anything
    is built the options are checked (:func:`hmoe_arch.archs.config.check_network`): one of the types this project
    builds, no argument that reads a file, and an estimated memory under ``max_memory`` GiB (None: the environment
    variable ``HMOE_MAX_MEMORY_GIB``, else 8; ``how_to_raise`` says how to raise it). A checkpoint trained for
    another scale, and tensors with another kind of values than the network's or buffers fixed by the window
    sizes that differ from the network's (:func:`hmoe_arch.checkpoints.check_tensor_values`), are refused before
    loading.

    Raises:
        OptionError: naming ``label`` (the flag or option key that gave the path) and the file; for options that
            do not build a network or are refused before building, naming ``network_g`` (or, for options read
            from the checkpoint, the file).
    """
    path = local_weights(weights, label)
    named = f'{label} {path}'
    if not path.is_file():
        raise OptionError(f'{named}: no such file')
    checkpoint, state = read_weights(path, param_key, label)
    source = 'network_g'
    if network is None:
        source = f'{named}: the network it holds'
        stored = checkpoint.get('network_g') if isinstance(checkpoint, Mapping) else None
        try:
            if isinstance(stored, Mapping) and stored.get('type') is not None:
                check_network(stored, max_memory, how_to_raise, where='')
        except ConfigError as error:
            raise OptionError(f'{named}: its stored network_g: {error}') from None
        try:
            network = network_config(checkpoint, state)
        except ConfigError as error:
            raise OptionError(f'{named}: cannot tell the network from the file ({error}); give its option file '
                              'with -opt') from None
    options = with_overrides(network, overrides)
    try:
        check_network(options, max_memory, how_to_raise, where='')
    except ConfigError as error:
        raise OptionError(f'{source}: {error}') from None
    try:
        net = build_network(options)
    except (ValueError, TypeError, KeyError) as error:
        raise OptionError(f'network_g: {error}') from error
    _check_trained_scale(net, state, named, label)
    try:
        check_tensor_values(net.state_dict(), state, named)
    except CheckpointError as error:
        raise OptionError(str(error)) from None
    try:
        if isinstance(net, MFGHMoEArch):
            net.load_pretrained(state, strict=strict)
        else:
            net.load_state_dict(state, strict=strict)
    except (ValueError, RuntimeError) as error:
        raise OptionError(f'{named}: does not fit the network: {error}') from error
    net.network_options = options
    return net.to(device).eval()


def _check_trained_scale(net: torch.nn.Module, state: Mapping[str, torch.Tensor], named: str, label: str) -> None:
    """Refuse ``state`` when its upsampler was trained for another factor than ``net.upscale`` (``named``: the
    label and file the message starts with; the fix it suggests depends on whether ``label`` is ``--weights``)."""
    try:
        trained = checkpoint_scale(state)
    except OptionError as error:
        raise OptionError(f'{named}: {error}') from None
    scale = getattr(net, 'upscale', None)
    if scale is not None and trained is not None and scale != trained:
        fix = f'use --arch-args upscale={trained}' if label == '--weights' else f'set network_g.upscale: {trained}'
        raise OptionError(f'{named}: trained for x{trained}, but the network is x{scale} ({fix})')
