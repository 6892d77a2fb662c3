"""Why a model's ``network_g`` does not fit its checkpoint, in one line that says how to fix it.

For an MFGHMoEArch or HAT checkpoint the network options its tensors hold
(:func:`hmoe_arch.archs.config.config_from_state_dict`) are compared with those ``network_g`` gives (its values,
else the architecture's defaults), key by key; for any other architecture (a baseline such as EDSR) the first
tensor that does not fit is named with both shapes, and the options saved in the checkpoint (this project saves
them under ``network_g``) are compared where present.
"""
import inspect
import shlex
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch
import yaml
from basicsr.utils.registry import ARCH_REGISTRY

from ...archs.config import NOT_IN_TENSORS, config_from_state_dict
from ...checkpoints import CONFIG_ENTRY
from ...errors import ConfigError, OptionError
from ...loading import local_weights, read_weights
from ...options import plain_options
from .rows import BenchModel

WIDTH_RATIOS = {'compress_ratio': 'embed_dim', 'squeeze_factor': 'embed_dim', 'mlp_ratio': 'embed_dim',
                'overlap_ratio': 'window_size'}
"""Ratios that reach a tensor only through a width (``int`` of the width times or divided by the ratio): two
values that give the same width build the same network."""
MOE_KEYS = ('expert_groups', 'routing')
"""Keys that shape tensors only in a network with the MoE upsampler."""


def flow(value: Any) -> str:
    """``value`` as one line of YAML (how an option file or ``--force_yml`` writes it)."""
    text = yaml.safe_dump(plain_options(value), default_flow_style=True, width=10 ** 6).strip()
    return text[:-len('...')].strip() if text.endswith('...') else text


def _width(key: str, ratio: Any, basis: int) -> int:
    """The tensor width ``ratio`` gives for ``key`` on a network of ``basis`` channels (or window size)."""
    if key in ('compress_ratio', 'squeeze_factor'):
        return basis // ratio
    return int(basis * ratio)


def _parameters(net: torch.nn.Module) -> Dict[str, inspect.Parameter]:
    """The named keyword parameters of the class ``net`` was built from (not its ``**kwargs``)."""
    return {name: p for name, p in inspect.signature(type(net).__init__).parameters.items()
            if p.kind not in (inspect.Parameter.VAR_KEYWORD, inspect.Parameter.VAR_POSITIONAL) and name != 'self'}


def _defaults(net: torch.nn.Module) -> Dict[str, Any]:
    """The keyword defaults of the class ``net`` was built from."""
    return {name: p.default for name, p in _parameters(net).items() if p.default is not inspect.Parameter.empty}


def _registered(name: Any) -> Optional[type]:
    """The architecture class BasicSR's registry holds under ``name``, or None."""
    try:
        return ARCH_REGISTRY.get(name)
    except KeyError:
        return None


def option_differences(options: Mapping[str, Any], net: torch.nn.Module, held: Mapping[str, Any],
                       built: Mapping[str, Any]) -> List[Tuple[str, Any, Any, bool]]:
    """``(key, value given, value the checkpoint holds, given explicitly)`` for every network option whose value
    makes a tensor differ: ``held`` is what the checkpoint's tensors hold, ``built`` what those of the network
    ``options`` build hold (both :func:`config_from_state_dict`)."""
    defaults = _defaults(net)
    differences = []
    for key, value in held.items():
        if key in NOT_IN_TENSORS or key not in built:
            continue
        if key in MOE_KEYS and not (held['moe'] and built['moe']):
            continue
        given_explicitly = key in options
        if key in WIDTH_RATIOS and (given_explicitly or key in defaults):
            given = options[key] if given_explicitly else defaults[key]
            basis = held[WIDTH_RATIOS[key]]
            if _width(key, given, basis) != _width(key, value, basis):
                differences.append((key, given, value, given_explicitly))
        elif key not in WIDTH_RATIOS and plain_options(built[key]) != plain_options(value):
            given = options[key] if given_explicitly and key != 'expert_groups' else built[key]
            differences.append((key, given, value, given_explicitly))
    return differences


def first_tensor_difference(network: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor],
                            strict: bool) -> Optional[str]:
    """The first tensor (in the network's order) whose shape differs, else with ``strict`` the first one only the
    network or only the checkpoint has; None when the checkpoint fits."""
    for key, tensor in network.items():
        if key in state and state[key].shape != tensor.shape:
            return (f'{key} is {list(state[key].shape)} in the checkpoint but {list(tensor.shape)} in the network '
                    'network_g builds')
    if not strict:
        return None
    for key, tensor in network.items():
        if key not in state:
            return f'the network network_g builds has {key} {list(tensor.shape)}, which the checkpoint lacks'
    for key, tensor in state.items():
        if key not in network:
            return f'the checkpoint has {key} {list(tensor.shape)}, which the network network_g builds lacks'
    return None


def mismatch_message(model: BenchModel) -> Optional[str]:
    """One line naming ``model``'s option file and checkpoint, what differs and how to fix it; None when the
    checkpoint cannot be read, ``network_g`` does not build, or the checkpoint fits it (the failure was another)."""
    options = dict(model.network or {})
    try:
        checkpoint, state = read_weights(local_weights(model.weights, 'path.pretrain_network_g'), model.param_key,
                                         'path.pretrain_network_g')
        arguments = dict(options)
        architecture = _registered(arguments.pop('type', None))
        if architecture is None:
            return None
        net = architecture(**arguments)  # as basicsr's build_network, without logging a second "is created"
    except (OptionError, ValueError, TypeError, KeyError):
        return None
    own = net.state_dict()
    try:
        held: Optional[Dict[str, Any]] = config_from_state_dict(state)
    except ConfigError:
        held = None
    try:
        built: Optional[Dict[str, Any]] = config_from_state_dict(own)
    except ConfigError:
        built = None
    option_file = model.option_file or model.source
    from_option_file = option_file == model.source
    where = f'the checkpoint {model.weights}' + (' (path.pretrain_network_g)' if from_option_file else '')
    elsewhere = (', or point path.pretrain_network_g at weights trained with this network_g' if from_option_file
                 else '')
    head = f'{option_file}: network_g does not fit {where}: '
    if held is not None and built is not None:
        differences = option_differences(options, net, held, built)
        if differences:
            if any(key not in _parameters(net) for key, *_ in differences):  # e.g. moe for HAT's own class
                differences.insert(0, ('type', options.get('type'), 'MFGHMoEArch', True))
            said = '; '.join(f'network_g.{key} is {flow(given)}{"" if explicit else " (the default)"} but the '
                             f'checkpoint holds {flow(value)}' for key, given, value, explicit in differences)
            force = ' '.join(shlex.quote(f'network_g:{key}={flow(value)}') for key, _, value, _ in differences)
            return (f'{head}{said}; to fix, give network_g these values in {option_file} (or add --force_yml '
                    f'{force}){elsewhere}')
    clause = first_tensor_difference(own, state, model.strict)
    if clause is None:
        return None
    stored = checkpoint.get(CONFIG_ENTRY) if isinstance(checkpoint, Mapping) else None
    if held is not None and built is None:
        clause = (f'network_g.type is {options.get("type")} but the checkpoint holds an MFGHMoEArch/HAT network '
                  f'(embed_dim {held["embed_dim"]}, depths {flow(held["depths"])}); first difference: {clause}')
    elif isinstance(stored, Mapping) and 'type' in stored:
        if _registered(stored['type']) is not type(net):
            clause += f'; the checkpoint was saved with network_g.type {stored["type"]}'
        else:
            defaults = _defaults(net)
            saved = [f'network_g.{key}: {flow(value)}' for key, value in stored.items()
                     if key != 'type' and plain_options(options.get(key, defaults.get(key))) != plain_options(value)]
            if saved:
                clause += f'; the checkpoint was saved with {", ".join(saved)}'
    return (f'{head}{clause}; to fix, give network_g the options the checkpoint was trained with{elsewhere}')
