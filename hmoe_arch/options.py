"""Option files as plain data: a safe YAML reader, ``--force_yml``, and the checks that need no network.

Nothing here imports torch or basicsr, so ``basicsr train``/``test`` refuse a bad option file before the seconds
those imports take (:func:`precheck_option_file`). BasicSR's pipeline semantics on top (paths, seeds,
distributed set-up, plugins, the checks that build the network) are :mod:`hmoe_arch.commands.pipeline`.
"""
import ntpath
import os
import re
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import yaml

from .errors import OptionError

MAX_OPTION_BYTES = 4 * 2**20
"""Largest option file read."""
MAX_OPTION_VALUES = 100_000
"""Most values (scalars, sequences and mappings, mapping keys included) an option file may hold, written out and
once its YAML aliases are expanded (real files hold a few hundred)."""
MAX_OPTION_DEPTH = 32
"""Most sequences/mappings an option file may nest, its YAML aliases expanded (real files nest four or five)."""
MOE_MODEL_TYPES = ('MFGHMoEModel', 'MFGHMOEModel')
"""``model_type`` values that build :class:`hmoe_arch.models.MFGHMoEModel` (ours and the authors' name)."""


def plain_options(value: Any) -> Any:
    """Options as plain dicts, lists and scalars (for YAML/JSON output and checkpoint metadata)."""
    if isinstance(value, dict):
        return {str(k): plain_options(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain_options(v) for v in value]
    return value


class _LimitExceeded(Exception):
    """An option file past :data:`MAX_OPTION_VALUES` or :data:`MAX_OPTION_DEPTH`, or with a recursive alias, found
    while it is parsed; ``mark`` (a PyYAML mark, or None for the file as a whole) is where, ``message`` what."""

    def __init__(self, mark: Any, message: str) -> None:
        super().__init__(message)
        self.mark, self.message = mark, message


def _check_limits(loader: Any) -> None:
    """Walk the parse events of ``loader`` (a PyYAML loader on the text; nothing is composed or constructed) and
    refuse, at the first event past them, the limits of an option file: more than :data:`MAX_OPTION_VALUES` values
    written out, more once its aliases are expanded, more than :data:`MAX_OPTION_DEPTH` nested sequences/mappings
    (aliases expanded), or an alias inside the node it names (a structure that contains itself). Disposes of
    ``loader``.

    Every scalar, sequence and mapping is a value, mapping keys included (a mapping of N keys holds 2N + 1). The
    expanded size and depth of each anchored node are measured once, when its end is parsed, so the walk is linear
    in the text's length however far its aliases would expand; once it passes, composing, constructing and whatever
    walks the options later recurse at most :data:`MAX_OPTION_DEPTH` levels.

    Raises:
        _LimitExceeded: what and where.
        yaml.YAMLError: a syntax error, from the parser.
    """
    written = 0
    open_collections: List[List[Any]] = []  # [expanded size, depth, anchor] of each collection being parsed
    measured: Dict[str, Tuple[int, int]] = {}  # anchor -> (expanded size, depth) of the node it names
    try:
        while True:
            event = loader.get_event()
            if isinstance(event, yaml.StreamEndEvent):
                return
            if isinstance(event, (yaml.SequenceEndEvent, yaml.MappingEndEvent)):
                size, depth, anchor = open_collections.pop()
                if size > MAX_OPTION_VALUES:  # at most that many values are written out: aliases made it larger
                    raise _LimitExceeded(None, f'its YAML aliases expand to more than {MAX_OPTION_VALUES} values (an '
                                               'alias bomb?); write the options out without nested aliases')
            elif isinstance(event, yaml.AliasEvent):
                if any(open_anchor == event.anchor for _, _, open_anchor in open_collections):
                    raise _LimitExceeded(event.start_mark, f'the alias *{event.anchor} is inside the node it names '
                                                           '(a structure that contains itself); option files are '
                                                           'trees')
                size, depth = measured.get(event.anchor, (1, 0))  # undefined: PyYAML's composer says so
                anchor = None
                if len(open_collections) + depth > MAX_OPTION_DEPTH:
                    raise _LimitExceeded(event.start_mark, f'more than {MAX_OPTION_DEPTH} nested sequences or '
                                                           'mappings once its aliases are expanded, the most an '
                                                           'option file may have')
            elif isinstance(event, yaml.NodeEvent):  # a scalar, or the start of a sequence or mapping
                written += 1
                if written > MAX_OPTION_VALUES:
                    raise _LimitExceeded(None, f'more than {MAX_OPTION_VALUES} values, the most an option file may '
                                               'hold (real ones hold a few hundred)')
                if isinstance(event, yaml.CollectionStartEvent):
                    if len(open_collections) == MAX_OPTION_DEPTH:
                        raise _LimitExceeded(event.start_mark, f'more than {MAX_OPTION_DEPTH} nested sequences or '
                                                               'mappings, the most an option file may have')
                    open_collections.append([1, 1, event.anchor])
                    continue
                size, depth, anchor = 1, 0, event.anchor
            else:  # the start or end of the stream or of a document
                continue
            if anchor is not None:
                measured[anchor] = (size, depth)
            if open_collections:
                outer = open_collections[-1]
                outer[0] += size
                outer[1] = max(outer[1], depth + 1)
    finally:
        loader.dispose()


def _bounded_load(text: str) -> Any:
    """The value of the YAML ``text`` once :func:`_check_limits` passes it, read by PyYAML's safe loader.

    Where PyYAML was built with libyaml and the text holds neither a character PyYAML's reader refuses nor a tab
    (libyaml accepts tabs in places PyYAML does not), libyaml parses it: about ten times faster, so a file at the
    limits is refused or read in about a second. A text libyaml cannot parse is parsed again by PyYAML's own
    parser, whose messages and positions (the ones this package has always reported) are the ones reported.
    """
    if hasattr(yaml, 'CSafeLoader') and '\t' not in text and not yaml.reader.Reader.NON_PRINTABLE.search(text):
        try:
            _check_limits(yaml.CSafeLoader(text))
        except (yaml.reader.ReaderError, yaml.scanner.ScannerError, yaml.parser.ParserError, UnicodeError):
            pass
        else:
            return yaml.load(text, Loader=yaml.CSafeLoader)
    _check_limits(yaml.SafeLoader(text))
    return yaml.load(text, Loader=yaml.SafeLoader)


def _where(source: str, error: yaml.YAMLError) -> str:
    """``source:line:column`` of a YAML error that has a position, else ``source``."""
    mark = getattr(error, 'problem_mark', None) or getattr(error, 'context_mark', None)
    return f'{source}:{mark.line + 1}:{mark.column + 1}' if mark is not None else source


def load_yaml(text: str, source: str) -> Any:
    """Plain YAML only (PyYAML's safe loading: no Python tags, nothing executed; mappings keep their order) within
    the limits of an option file: at most :data:`MAX_OPTION_VALUES` values (aliases expanded), at most
    :data:`MAX_OPTION_DEPTH` nested sequences or mappings, no alias inside the node it names, checked on the parse
    events before anything is composed (:func:`_check_limits`). Linear in the length of ``text``; libyaml parses it
    where PyYAML was built with it (:func:`_bounded_load`).

    Raises:
        OptionError: one line naming ``source`` and, for a refused tag, a syntax error, too deep a nesting or a
            recursive alias, the line and column.
    """
    try:
        return _bounded_load(text)
    except _LimitExceeded as error:
        where = source if error.mark is None else f'{source}:{error.mark.line + 1}:{error.mark.column + 1}'
        raise OptionError(f'{where}: {error.message}') from None
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


def check_folder_name(value: Any, key: str, source: Union[str, os.PathLike]) -> str:
    """``value``, when it can name one folder: BasicSR and this package make ``experiments/<name>``,
    ``results/<name>``, ``tb_logger/<name>`` and ``.../<dataset name>/`` of the option file's ``name`` and its
    datasets' ``name``, so it must be a non-empty string without ``/``, ``\\``, a NUL character or a drive (``C:``),
    and not ``.`` or ``..`` (anything else would reach folders outside those).

    Raises:
        OptionError: naming ``source`` and ``key``.
    """
    if (not isinstance(value, str) or value in ('', '.', '..') or any(c in value for c in '/\\\0')
            or ntpath.splitdrive(value)[0]):
        shown = repr(value)
        raise OptionError(f'{source}: `{key}` must be one folder name (a string without / or \\, not . or ..), '
                          f'got {shown if len(shown) <= 80 else shown[:77] + "..."}')
    return value


def read_option_file(path: Union[str, os.PathLike], force_yml: Sequence[str] = (),
                     required: Sequence[str] = ()) -> Dict[str, Any]:
    """An option file (plain YAML, :func:`load_yaml`) with ``--force_yml`` entries applied.

    Raises:
        OptionError: naming ``path`` when it cannot be read, is not plain YAML (a Python tag names its line), is
            past the limits of :func:`load_yaml` (an alias bomb among them), is not a YAML mapping, lacks a
            ``required`` top-level key, or has a ``name`` or ``datasets.<phase>.name`` that is not one folder name
            (:func:`check_folder_name`).
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
    if 'name' in opt:
        check_folder_name(opt['name'], 'name', path)
    if isinstance(opt.get('datasets'), dict):
        for phase, dataset in opt['datasets'].items():
            if isinstance(dataset, dict) and 'name' in dataset:
                check_folder_name(dataset['name'], f'datasets.{phase}.name', path)
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


def check_max_memory(value: Any, key: str = 'max_memory') -> Optional[float]:
    """``max_memory`` (``--max-memory``): the limit in GiB on a network's estimated memory
    (:func:`hmoe_arch.archs.config.check_network_size`); absent -> None (the default), else a number > 0.

    Raises:
        OptionError: naming ``key``.
    """
    if value is None:
        return None
    if not is_strict_number(value) or not 0 < value < float('inf'):
        raise OptionError(f'{key}: expected a number of GiB > 0 (the limit on a network\'s estimated memory), '
                          f'got {value!r}')
    return float(value)


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
    (:func:`read_option_file`, which also checks that ``name`` is one folder name), the top-level keys BasicSR
    needs (``datasets``, a mapping of dataset mappings, and ``path``, a mapping), training's ``logger`` block,
    ``num_threads``, ``max_memory`` and, for :data:`MOE_MODEL_TYPES`, :func:`check_model_options`. Returns the
    options read.

    Raises:
        OptionError: naming the file or the key.
    """
    opt = read_option_file(path, force_yml, required=('name', 'datasets', 'path'))
    for key in ('datasets', 'path'):
        if not isinstance(opt[key], dict):
            raise OptionError(f'{path}: `{key}` must be a mapping, got {opt[key]!r}')
    for phase, dataset in opt['datasets'].items():
        if not isinstance(dataset, dict):
            raise OptionError(f'{path}: `datasets.{phase}` must be a mapping of dataset options, got {dataset!r}')
    if is_train:
        logger = opt.get('logger')
        missing = [k for k in ('print_freq', 'save_checkpoint_freq') if not isinstance(logger, dict) or k not in logger]
        if missing:
            raise OptionError(f'{path}: training needs a `logger:` block with {" and ".join(missing)} (how often '
                              'to log and to save checkpoints, in iterations)')
    check_num_threads(opt.get('num_threads'))
    check_max_memory(opt.get('max_memory'))
    if opt.get('model_type') in MOE_MODEL_TYPES:
        check_model_options(opt, is_train=is_train)
    return opt
