"""Option files as plain data: a safe YAML reader, ``--force_yml``, and the checks that need no network.

Nothing here imports torch or basicsr, so ``basicsr train``/``test`` refuse a bad option file before the seconds
those imports take (:func:`precheck_option_file`). BasicSR's pipeline semantics on top (paths, seeds,
distributed set-up, plugins, the checks that build the network) are :mod:`hmoe_arch.commands.pipeline`.
"""
import os
import re
from typing import Any, Dict, Optional, Sequence, Union

import yaml

from .errors import OptionError

MAX_OPTION_BYTES = 4 * 2**20
"""Largest option file read."""
MAX_OPTION_VALUES = 100_000
"""Most values an option file may hold once its YAML aliases are expanded (real files hold a few hundred)."""
MOE_MODEL_TYPES = ('MFGHMoEModel', 'MFGHMOEModel')
"""``model_type`` values that build :class:`hmoe_arch.models.MFGHMoEModel` (ours and the authors' name)."""


def plain_options(value: Any) -> Any:
    """Options as plain dicts, lists and scalars (for YAML/JSON output and checkpoint metadata)."""
    if isinstance(value, dict):
        return {str(k): plain_options(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain_options(v) for v in value]
    return value


def expanded_size(value: Any, limit: int = MAX_OPTION_VALUES) -> int:
    """How many values ``value`` holds with every shared (aliased) node counted each time it is used; stops
    counting past ``limit``. Linear in the number of distinct nodes."""
    sizes: Dict[int, int] = {}

    def size(node: Any) -> int:
        if not isinstance(node, (dict, list)):
            return 1
        if id(node) not in sizes:
            children = node.values() if isinstance(node, dict) else node
            total = 1
            for child in children:
                total += size(child)
                if total > limit:
                    break
            sizes[id(node)] = total
        return sizes[id(node)]

    return size(value)


def _where(source: str, error: yaml.YAMLError) -> str:
    """``source:line:column`` of a YAML error that has a position, else ``source``."""
    mark = getattr(error, 'problem_mark', None) or getattr(error, 'context_mark', None)
    return f'{source}:{mark.line + 1}:{mark.column + 1}' if mark is not None else source


def load_yaml(text: str, source: str) -> Any:
    """Plain YAML only (``yaml.SafeLoader``: no Python tags, nothing executed; mappings keep their order) whose
    aliases expand to at most :data:`MAX_OPTION_VALUES` values.

    Raises:
        OptionError: one line naming ``source`` and, for a refused tag or a syntax error, the line and column.
    """
    try:
        value = yaml.load(text, Loader=yaml.SafeLoader)
    except yaml.constructor.ConstructorError as error:
        tag = re.search(r"tag '([^']*)'", str(error.problem))
        if tag and 'python' in tag.group(1):
            raise OptionError(f'{_where(source, error)}: the tag {tag.group(1)} is refused: option files are plain '
                              'YAML and nothing in them is executed') from None
        raise OptionError(f'{_where(source, error)}: not plain YAML ({error.problem})') from None
    except yaml.MarkedYAMLError as error:
        problem = ' '.join(str(error.problem or error.context or 'syntax error').split())
        raise OptionError(f'{_where(source, error)}: not valid YAML ({problem})') from None
    except yaml.YAMLError as error:
        raise OptionError(f'{source}: not valid YAML ({" ".join(str(error).split())})') from None
    if expanded_size(value) > MAX_OPTION_VALUES:
        raise OptionError(f'{source}: its YAML aliases expand to more than {MAX_OPTION_VALUES} values (an alias '
                          'bomb?); write the options out without nested aliases')
    return value


def apply_force_yml(opt: Dict[str, Any], entry: str) -> None:
    """Set ``opt[k1][k2]... = yaml(value)`` for ``entry = 'k1:k2=value'``; every key but the last must exist."""
    if '=' not in entry:
        raise OptionError(f'--force_yml {entry!r}: expected key:sub=value')
    path, text = (part.strip() for part in entry.split('=', 1))
    keys = path.split(':')
    value = load_yaml(text, f'--force_yml {entry!r}')
    node = opt
    for depth, key in enumerate(keys[:-1]):
        if not isinstance(node, dict) or key not in node:
            raise OptionError(f'--force_yml {entry!r}: no option {":".join(keys[:depth + 1])}')
        node = node[key]
    if not isinstance(node, dict):
        raise OptionError(f'--force_yml {entry!r}: {":".join(keys[:-1])} is not a mapping')
    node[keys[-1]] = value


def read_option_file(path: Union[str, os.PathLike], force_yml: Sequence[str] = (),
                     required: Sequence[str] = ()) -> Dict[str, Any]:
    """An option file (plain YAML, :func:`load_yaml`) with ``--force_yml`` entries applied.

    Raises:
        OptionError: naming ``path`` when it cannot be read, is not plain YAML (a Python tag names its line), is
            an alias bomb, is not a YAML mapping or lacks a ``required`` top-level key.
    """
    try:
        with open(path, encoding='utf-8') as f:
            text = f.read(MAX_OPTION_BYTES + 1)
    except (OSError, UnicodeDecodeError) as error:
        raise OptionError(f'{path}: cannot read the option file ({getattr(error, "strerror", None) or error})') \
            from error
    if len(text) > MAX_OPTION_BYTES:
        raise OptionError(f'{path}: larger than {MAX_OPTION_BYTES // 2**20} MiB; not an option file')
    opt = load_yaml(text, os.fspath(path))
    if not isinstance(opt, dict):
        raise OptionError(f'{path}: expected a mapping of options')
    for entry in force_yml:
        apply_force_yml(opt, entry)
    missing = [key for key in required if key not in opt]
    if missing:
        raise OptionError(f'{path}: missing the top-level key(s) {", ".join(missing)}')
    return opt


def is_strict_number(value: Any) -> bool:
    """Whether ``value`` is an ``int`` or ``float`` and not a ``bool`` (YAML's ``true`` is no number)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def is_strict_int(value: Any, minimum: Optional[int] = None) -> bool:
    """Whether ``value`` is an ``int`` and not a ``bool`` (YAML's ``true`` is no count), and at least ``minimum``
    when one is given."""
    return isinstance(value, int) and not isinstance(value, bool) and (minimum is None or value >= minimum)


def check_num_threads(value: Any, key: str = 'num_threads') -> Optional[int]:
    """``num_threads``: ``auto`` (or absent) -> None, else an integer >= 1.

    Raises:
        OptionError: naming ``key``.
    """
    if value is None or value == 'auto':
        return None
    if not is_strict_int(value, 1):
        raise OptionError(f'{key}: expected an integer >= 1 or auto, got {value!r}')
    return value


def check_model_options(opt: Dict[str, Any], is_train: Optional[bool] = None) -> None:
    """The value checks of :class:`~hmoe_arch.models.MFGHMoEModel`'s own keys (``tile``, ``use_amp``, ``compile``,
    ``val.pbar``, ``val.save_expert_maps``, ``train.aux_loss_weight``, ``train.routing_lr_scale``,
    ``train.skip_nonfinite``) that need no network.

    ``is_train`` defaults to ``opt['is_train']``; the ``train`` keys are checked only in training.

    Raises:
        OptionError: naming the key and what was expected.
    """
    tile = opt.get('tile')
    if tile is not None:
        if not isinstance(tile, dict) or set(tile) != {'tile_size', 'tile_pad'}:
            raise OptionError(f'MFGHMoEModel: `tile` must be {{tile_size, tile_pad}}, got {tile!r}')
        for key in ('tile_size', 'tile_pad'):
            if not is_strict_int(tile[key], 1 if key == 'tile_size' else 0):
                raise OptionError(f'MFGHMoEModel: `tile.{key}` must be a non-negative integer (tile_size >= 1), '
                                  f'got {tile[key]!r}')
    amp = opt.get('use_amp', False)
    if amp not in (False, None, 'bf16'):
        raise OptionError(f"MFGHMoEModel: `use_amp` must be false or 'bf16', got {amp!r}")
    if not isinstance(opt.get('compile', False), bool):
        raise OptionError(f'MFGHMoEModel: `compile` must be true or false, got {opt["compile"]!r}')
    for key, default in (('pbar', True), ('save_expert_maps', False)):
        value = (opt.get('val') or {}).get(key, default)
        if not isinstance(value, bool):
            raise OptionError(f'MFGHMoEModel: `val.{key}` must be true or false, got {value!r}')
    if not (opt.get('is_train', False) if is_train is None else is_train):
        return
    train = opt.get('train') or {}
    if not isinstance(train, dict):
        raise OptionError(f'train: expected a mapping of training options, got {train!r}')
    weight = train.get('aux_loss_weight', 0.0)
    if not is_strict_number(weight) or not weight >= 0:
        raise OptionError(f'MFGHMoEModel: `train.aux_loss_weight` must be a number >= 0, got {weight!r}')
    scale = train.get('routing_lr_scale', 1.0)
    if not is_strict_number(scale) or not scale > 0:
        raise OptionError(f'MFGHMoEModel: `train.routing_lr_scale` must be a number > 0, got {scale!r}')
    skip = train.get('skip_nonfinite', 0)
    if not is_strict_int(skip, 0):
        raise OptionError(f'MFGHMoEModel: `train.skip_nonfinite` must be an integer >= 0, got {skip!r}')


def precheck_option_file(path: Union[str, os.PathLike], force_yml: Sequence[str] = (), is_train: bool = True) \
        -> Dict[str, Any]:
    """What ``basicsr train``/``test`` can refuse before importing torch and basicsr: the file itself
    (:func:`read_option_file`), the top-level keys BasicSR needs, training's ``logger`` block, ``num_threads`` and,
    for :data:`MOE_MODEL_TYPES`, :func:`check_model_options`. Returns the options read.

    Raises:
        OptionError: naming the file or the key.
    """
    opt = read_option_file(path, force_yml, required=('name', 'datasets', 'path'))
    for key in ('datasets', 'path'):
        if not isinstance(opt[key], dict):
            raise OptionError(f'{path}: `{key}` must be a mapping, got {opt[key]!r}')
    if is_train:
        logger = opt.get('logger')
        missing = [k for k in ('print_freq', 'save_checkpoint_freq') if not isinstance(logger, dict) or k not in logger]
        if missing:
            raise OptionError(f'{path}: training needs a `logger:` block with {" and ".join(missing)} (how often '
                              'to log and to save checkpoints, in iterations)')
    check_num_threads(opt.get('num_threads'))
    if opt.get('model_type') in MOE_MODEL_TYPES:
        check_model_options(opt, is_train=is_train)
    return opt
