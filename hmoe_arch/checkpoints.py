"""Reading and writing checkpoint files: BasicSR ``.pth`` (``torch.load(weights_only=True)``), ``.safetensors``
(the network options in its metadata) and weights given as an ``https://`` URL (:func:`fetch_weights`: downloaded
once per URL into torch's hub cache, with a timeout and a size cap, checked against ``#sha256=<hex>`` when the URL
ends with it); the state_dict inside a checkpoint (:func:`state_dict_of`, which refuses tensors that show more
values than the file stores), the checks of its values (:func:`nonfinite_keys`, :func:`check_tensor_values`) and
which of its tensors fit a network (:func:`match_state_dict`).

``safetensors`` is the optional extra ``pip install -e .[export]``; it is imported only for such files.
"""
import hashlib
import json
import math
import os
import re
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

import torch

from .atomic import (
    atomic_path,
    plain_file_mode,  # noqa: F401 (re-exported)
)
from .errors import CheckpointError

CONFIG_ENTRY = 'network_g'
"""Checkpoint entry (``.pth``) or safetensors metadata key (JSON) holding the network options."""
SAFETENSORS_PARAM_KEY = 'params_ema'
"""The entry a ``.safetensors`` file stands for when read as a BasicSR checkpoint."""
FALLBACK_PARAM_KEYS = ('params', 'params_ema')
"""Entries tried, in this order, when a checkpoint has no state_dict under the requested ``param_key``."""
UNNAMED = '<state_dict>'
"""How messages name a checkpoint that was given as a loaded mapping rather than a file or URL."""

CheckpointSource = Union[str, os.PathLike, Mapping]
"""A checkpoint file's path, an ``https://`` URL of one, or a checkpoint already loaded."""


def _safetensors():
    try:
        import safetensors.torch
    except ImportError:
        raise CheckpointError('.safetensors files need the safetensors package: pip install -e .[export]') from None
    return safetensors


def read_checkpoint_file(path: Union[str, os.PathLike]) -> Mapping[str, Any]:
    """The checkpoint in ``path``: a ``.pth`` as ``torch.load(weights_only=True)`` returns it, a ``.safetensors``
    as ``{'params_ema': tensors, 'network_g': options}``.

    Raises:
        CheckpointError: naming the file when it is missing or not a checkpoint of tensors (never with advice to
            unpickle it unsafely).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f'{path}: no such file')
    if path.suffix.lower() == '.safetensors':
        safetensors = _safetensors()
        try:
            with safetensors.safe_open(str(path), framework='pt') as f:
                metadata = f.metadata() or {}
            state = safetensors.torch.load_file(str(path))
        except Exception as error:
            raise CheckpointError(f'{path}: not a readable safetensors file ({error})') from None
        checkpoint: Dict[str, Any] = {SAFETENSORS_PARAM_KEY: state}
        if CONFIG_ENTRY in metadata:
            try:
                checkpoint[CONFIG_ENTRY] = json.loads(metadata[CONFIG_ENTRY])
            except json.JSONDecodeError as error:
                raise CheckpointError(f'{path}: its {CONFIG_ENTRY} metadata is not JSON ({error})') from None
        return checkpoint
    try:
        return torch.load(path, map_location='cpu', weights_only=True)
    except Exception:
        raise CheckpointError(f'{path}: not a PyTorch checkpoint of tensors (torch.load with weights_only=True '
                              'cannot read it; files that need arbitrary unpickling are refused)') from None


def write_safetensors(state: Mapping[str, torch.Tensor], path: Union[str, os.PathLike],
                      network: Optional[Mapping[str, Any]] = None) -> None:
    """Write ``state`` (contiguous CPU copies) to ``path``, with ``network`` as JSON metadata."""
    safetensors = _safetensors()
    metadata = {CONFIG_ENTRY: json.dumps(network)} if network is not None else None
    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    safetensors.torch.save_file(tensors, str(path), metadata=metadata)


def is_url(text: Union[str, os.PathLike]) -> bool:
    """Whether ``text`` is an ``https://`` (or ``http://``) address rather than a path."""
    return str(text).startswith(('https://', 'http://'))


DOWNLOAD_TIMEOUT_VARIABLE = 'HMOE_DOWNLOAD_TIMEOUT'
"""Environment variable: seconds :func:`fetch_weights` waits for a connection or for the next bytes of a download."""
DOWNLOAD_TIMEOUT = 30.0
"""Seconds waited when :data:`DOWNLOAD_TIMEOUT_VARIABLE` is not set."""
DOWNLOAD_MAX_BYTES_VARIABLE = 'HMOE_DOWNLOAD_MAX_BYTES'
"""Environment variable: the most bytes :func:`fetch_weights` downloads for one file."""
DOWNLOAD_MAX_BYTES = 2 << 30
"""The most bytes downloaded (2 GiB) when :data:`DOWNLOAD_MAX_BYTES_VARIABLE` is not set."""
DOWNLOAD_CHUNK = 1 << 20
"""Bytes read from the connection at a time (1 MiB)."""


def fetch_weights(url: str, cache_dir: Optional[Union[str, os.PathLike]] = None) -> Path:
    """The local copy of the weights at ``url`` (``...#sha256=<64 hex>`` to check them), downloaded into
    ``cache_dir`` (default ``<torch hub dir>/checkpoints``) on first use; a cached copy of a pinned URL is checked
    against its hash again on every use.

    The cached file is ``<16 hex>-<file name>``, or ``<16 hex>-<first 12 hex of the pin>-<file name>`` for a
    pinned URL: the hex digits begin the SHA-256 of the URL without its ``#`` part, so each URL (query included)
    has its own copy, and the URL's file name (its last 120 characters, those other than letters, digits, ``.``,
    ``_`` and ``-`` replaced by ``_``; ``weights.pth`` when the URL has none) keeps it recognisable. The download
    waits at most :data:`DOWNLOAD_TIMEOUT` seconds for the connection and for each read, and stops past
    :data:`DOWNLOAD_MAX_BYTES` bytes (the environment variables :data:`DOWNLOAD_TIMEOUT_VARIABLE` and
    :data:`DOWNLOAD_MAX_BYTES_VARIABLE` change them). It is written under a hidden temporary name
    (:func:`hmoe_arch.atomic.partial_path`) that is renamed when complete and removed on any failure, Ctrl-C
    included; temporary files of this name left by runs that were killed (their process is gone) are removed
    first.

    Raises:
        CheckpointError: one line naming ``url``: a fragment other than ``#sha256=<64 hex>``, a bad value of
            either environment variable, an unreachable URL, a failed or incomplete download, no answer within
            the timeout, a download larger than the cap, or a hash that does not match (the download is then not
            kept; a cached copy that no longer matches is refused and left for the user to remove).
    """
    address, _, fragment = url.partition('#')
    expected = None
    if fragment:
        match = re.fullmatch(r'sha256=([0-9a-fA-F]{64})', fragment)
        if match is None:
            raise CheckpointError(f'{url}: the part after # must be sha256=<64 hex digits>')
        expected = match.group(1).lower()
    timeout, cap = _download_limits(url)
    name = re.sub(r'[^A-Za-z0-9._-]', '_', urllib.parse.unquote(Path(urllib.parse.urlparse(address).path).name))
    key = hashlib.sha256(address.encode()).hexdigest()[:16]
    folder = Path(cache_dir) if cache_dir is not None else Path(torch.hub.get_dir()) / 'checkpoints'
    folder.mkdir(parents=True, exist_ok=True)
    prefix = [key, expected[:12]] if expected else [key]
    target = folder / '-'.join([*prefix, name[-120:] or 'weights.pth'])
    if not target.is_file():
        with atomic_path(target) as partial:  # removes the partial downloads of killed runs first
            _download(url, address, partial, timeout, cap)
            found = file_digest(partial, 'sha256') if expected is not None else None
            if found != expected:
                raise CheckpointError(f'{url}: the downloaded file has SHA-256 {found}, not {expected}; '
                                      'it was not kept')
    elif expected is not None and (found := file_digest(target, 'sha256')) != expected:
        raise CheckpointError(f'{url}: the cached copy {target} has SHA-256 {found}, not {expected}; '
                              'remove it to download again')
    return target


def _download_limits(url: str) -> Tuple[float, int]:
    """The timeout in seconds (> 0) and the size cap in bytes (> 0) of a download: the environment variables
    :data:`DOWNLOAD_TIMEOUT_VARIABLE` and :data:`DOWNLOAD_MAX_BYTES_VARIABLE`, else their defaults.

    Raises:
        CheckpointError: naming ``url`` and the variable whose value is not a positive number (of bytes: whole).
    """
    timeout_text = os.environ.get(DOWNLOAD_TIMEOUT_VARIABLE, '').strip()
    cap_text = os.environ.get(DOWNLOAD_MAX_BYTES_VARIABLE, '').strip()
    try:
        timeout = float(timeout_text) if timeout_text else DOWNLOAD_TIMEOUT
    except ValueError:
        timeout = math.nan
    if not 0 < timeout < math.inf:
        raise CheckpointError(f'{url}: the environment variable {DOWNLOAD_TIMEOUT_VARIABLE} must be a number of '
                              f'seconds > 0, got {timeout_text!r}')
    if not cap_text:
        cap = DOWNLOAD_MAX_BYTES
    else:
        cap = int(cap_text) if re.fullmatch(r'[0-9]+', cap_text) else 0
    if cap <= 0:
        raise CheckpointError(f'{url}: the environment variable {DOWNLOAD_MAX_BYTES_VARIABLE} must be a whole '
                              f'number of bytes > 0, got {cap_text!r}')
    return timeout, cap


def _download(url: str, address: str, partial: Path, timeout: float, cap: int) -> None:
    """Write the body of ``address`` into the new file ``partial``, waiting at most ``timeout`` seconds for the
    connection and for each read and stopping past ``cap`` bytes (``url``: how messages name it).

    Raises:
        CheckpointError: naming ``url``: no answer in time, more than ``cap`` bytes announced or sent, fewer bytes
            than announced, or any other failure of the connection (HTTP status, unknown host, ...).
    """
    request = urllib.request.Request(address, headers={'User-Agent': 'hmoe_arch'})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response, open(partial, 'wb') as out:
            announced = response.headers.get('Content-Length')
            announced = int(announced) if announced and announced.isdigit() else None
            if announced is not None and announced > cap:
                raise CheckpointError(f'{url}: the server announces {announced} bytes, more than the {cap} '
                                      f'{DOWNLOAD_MAX_BYTES_VARIABLE} allows; it was not downloaded')
            received = 0
            while chunk := response.read(min(DOWNLOAD_CHUNK, cap + 1 - received)):
                received += len(chunk)
                if received > cap:
                    raise CheckpointError(f'{url}: the download passed {cap} bytes, the limit '
                                          f'{DOWNLOAD_MAX_BYTES_VARIABLE} sets; it was stopped and not kept')
                out.write(chunk)
            if announced is not None and received != announced:
                raise CheckpointError(f'{url}: the download ended after {received} of the {announced} bytes the '
                                      'server announced; it was not kept')
            out.flush()
            os.fsync(out.fileno())
    except CheckpointError:
        raise
    except Exception as error:
        reason = error.reason if isinstance(error, urllib.error.URLError) else error
        if isinstance(reason, TimeoutError):
            raise CheckpointError(f'{url}: cannot download it (no answer within {timeout:g} s; '
                                  f'{DOWNLOAD_TIMEOUT_VARIABLE} sets the limit)') from None
        raise CheckpointError(f'{url}: cannot download it ({error})') from None


def file_digest(path: Path, algorithm: str) -> str:
    """Hex digest of a file read in 1 MiB chunks (``hashlib.file_digest`` needs Python 3.11)."""
    digest = hashlib.new(algorithm)
    with open(path, 'rb') as f:
        for chunk in iter(lambda: f.read(1 << 20), b''):
            digest.update(chunk)
    return digest.hexdigest()


def source_name(source: CheckpointSource) -> str:
    """How messages name ``source``: its path or URL, :data:`UNNAMED` for a checkpoint already loaded."""
    return os.fspath(source) if isinstance(source, (str, os.PathLike)) else UNNAMED


def local_checkpoint(source: Union[str, os.PathLike]) -> Path:
    """The file ``source`` names: the path itself, or for an ``https://`` URL its copy in torch's hub cache,
    downloaded if missing (:func:`fetch_weights`: one copy per URL); whether a path exists is not checked.

    Raises:
        CheckpointError: for a URL that cannot be downloaded (no answer in time, over the size cap, ...) or whose
            file fails its hash check.
    """
    return fetch_weights(str(source)) if is_url(source) else Path(source)


def read_checkpoint(source: CheckpointSource) -> Mapping[str, Any]:
    """The checkpoint ``source`` stands for: a loaded one as it is, else its file (:func:`local_checkpoint`) as
    :func:`read_checkpoint_file` reads it.

    Raises:
        FileNotFoundError: naming the path when there is no such file.
        CheckpointError: naming the file or URL when it cannot be fetched or is not a checkpoint of tensors.
    """
    if isinstance(source, Mapping):
        return source
    path = local_checkpoint(source)
    if not path.is_file():
        raise FileNotFoundError(f'checkpoint not found: {path}')
    return read_checkpoint_file(path)


def state_dict_of(checkpoint: Any, param_key: str = 'params', source: str = UNNAMED) -> Dict[str, torch.Tensor]:
    """The name -> tensor mapping inside ``checkpoint`` (BasicSR's, HAT's, the authors' or a bare state_dict): its
    ``param_key`` entry, else the first of :data:`FALLBACK_PARAM_KEYS` that holds a mapping, else the checkpoint
    itself; DataParallel/DDP ``module.`` prefixes are removed.

    Every tensor must hold the values it shows (:func:`check_stored_values`): a file cannot declare more values
    than it stores.

    Raises:
        CheckpointError: naming ``source`` when that is not a non-empty mapping of names to tensors, or naming the
            tensor that is not a plain dense tensor or shows more values than it stores.
    """
    if not isinstance(checkpoint, Mapping):
        raise CheckpointError(f'{source}: expected a state_dict or a dict with a `{param_key}` (or `params`, '
                              f'`params_ema`) state_dict, found a {type(checkpoint).__name__}')
    for key in dict.fromkeys((param_key, *FALLBACK_PARAM_KEYS)):
        if isinstance(checkpoint.get(key), Mapping):
            checkpoint = checkpoint[key]
            break
    names = [str(k) for k in checkpoint][:10]
    if not checkpoint or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in checkpoint.items()):
        raise CheckpointError(f'{source}: expected a state_dict (parameter names -> tensors) or a dict with a '
                              f'`{param_key}` (or `params`, `params_ema`) state_dict, found the entries {names}')
    check_stored_values(checkpoint, source)
    return {(k[len('module.'):] if k.startswith('module.') else k): v for k, v in checkpoint.items()}


MAX_VIEW_RATIO = 4
"""The values all tensors of a state_dict show may be at most this many times the values their storages hold
(tied weights show one storage under two names, slices part of one again): bounds the work of reading them to a
few times the file."""
CHECK_CHUNK = 1 << 22
"""Values :func:`nonfinite_keys` checks at once: its only temporary is this many booleans."""
FIXED_BUFFER = re.compile(r'(^|\.)(relative_position_index(_[A-Za-z]+)?|attn_mask)$')
"""Names of the buffers that follow from the window sizes (the relative-position indices
``relative_position_index_SA``/``_OCA``, SwinIR's ``relative_position_index`` and shifted-window ``attn_mask``):
a checkpoint's copy must equal the network's."""


def check_stored_values(state: Mapping[str, torch.Tensor], source: str = UNNAMED) -> None:
    """Refuse tensors that are not plain dense tensors (sparse, quantized, nested, meta, subclasses) and tensors
    that show more values than their storage holds -- a stride-0 (broadcast) or overlapping view: how a few hundred
    bytes of a file declare hundreds of millions of values -- and a state_dict whose tensors together show more
    than :data:`MAX_VIEW_RATIO` times the bytes of their distinct storages. Reads shapes only.

    Raises:
        CheckpointError: one line naming ``source`` and the tensor.
    """
    shown, storages = 0, {}
    for key, tensor in state.items():
        plain = type(tensor) in (torch.Tensor, torch.nn.Parameter) and tensor.layout == torch.strided
        if not plain or tensor.is_quantized or tensor.is_nested or tensor.is_meta:
            kind = 'meta' if plain and tensor.is_meta else 'quantized' if plain and tensor.is_quantized else \
                'nested' if plain and tensor.is_nested else f'{type(tensor).__name__} ({tensor.layout})'
            raise CheckpointError(f'{source}: {key} is a {kind} tensor; expected a plain dense tensor of values')
        size = tensor.numel() * tensor.element_size()
        stored = tensor.untyped_storage().nbytes()
        if size > stored:
            raise CheckpointError(f'{source}: {key} shows {tensor.numel():,} values {list(tensor.shape)} but stores '
                                  f'{stored // max(tensor.element_size(), 1):,} (a broadcast or overlapping view); '
                                  'refused before its values are used')
        shown += size
        storages[(tensor.device, tensor.untyped_storage().data_ptr())] = stored
    if shown > MAX_VIEW_RATIO * sum(storages.values()):
        raise CheckpointError(f'{source}: its tensors show {shown:,} bytes of values but store '
                              f'{sum(storages.values()):,} (views of shared storages); refused before they are used')


def _all_finite(tensor: torch.Tensor, chunk: int) -> bool:
    """Whether every value of ``tensor`` is finite, checked ``chunk`` values at a time (slices of the first
    dimension, recursively)."""
    if tensor.dim() == 0 or tensor.numel() <= chunk:
        return bool(torch.isfinite(tensor).all())
    if tensor.shape[0] == 1:
        return _all_finite(tensor[0], chunk)
    rows = max(1, chunk // max(tensor[0].numel(), 1))
    return all(_all_finite(tensor[start:start + rows], chunk) for start in range(0, tensor.shape[0], rows))


def nonfinite_keys(state: Mapping[str, torch.Tensor], chunk: int = CHECK_CHUNK) -> List[str]:
    """The floating-point (and complex) tensors of ``state`` that hold NaN or Inf, checked ``chunk`` values at a
    time (no full-size temporary; the state_dict is expected to have passed :func:`check_stored_values`)."""
    return [key for key, tensor in state.items()
            if (tensor.is_floating_point() or tensor.is_complex()) and not _all_finite(tensor, chunk)]


def _kind(tensor: torch.Tensor) -> str:
    """``floating point``, ``complex``, ``boolean`` or ``integer``."""
    if tensor.is_floating_point():
        return 'floating point'
    if tensor.is_complex():
        return 'complex'
    return 'boolean' if tensor.dtype == torch.bool else 'integer'


def _unfit_reason(key: str, own: torch.Tensor, tensor: torch.Tensor) -> Optional[str]:
    """Why ``tensor`` cannot fill the network's ``own`` tensor of the same name and shape (another kind of value; a
    :data:`FIXED_BUFFER` that differs from the network's), or None when it can."""
    if _kind(tensor) != _kind(own):
        return (f'a {tensor.dtype} tensor ({_kind(tensor)} values) where the network expects {_kind(own)} values '
                f'({own.dtype})')
    if FIXED_BUFFER.search(key):
        copy = tensor.to(device=own.device, dtype=own.dtype)
        if not torch.equal(copy, own):
            first = int((copy != own).flatten().to(torch.uint8).argmax())
            where = tuple(int(i) for i in torch.unravel_index(torch.tensor(first), own.shape))
            found, expected = copy[where].item(), own[where].item()
            what = 'a negative index' if found < 0 <= expected else 'a value out of range' if not \
                own.min().item() <= found <= own.max().item() else 'another value'
            return (f'holds {found} at {list(where)}, {what} (the network has {expected}); this buffer follows from '
                    'the window sizes and is never learned')
    return None


def check_tensor_values(own: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor],
                        source: str = UNNAMED) -> None:
    """Refuse a tensor of ``state`` that would fill a tensor of the network (``own``: its state_dict; same name and
    shape) with another kind of value -- booleans, integers or complex numbers for floating-point weights, or
    floats for an index buffer -- or a buffer fixed by the window sizes (:data:`FIXED_BUFFER`) that differs from
    the network's (e.g. a negative or out-of-range relative-position index). Tensors the network does not take
    are left to the loader.

    Raises:
        CheckpointError: one line naming ``source`` and the tensor.
    """
    for key, tensor in state.items():
        if key in own and own[key].shape == tensor.shape:
            reason = _unfit_reason(key, own[key], tensor)
            if reason is not None:
                raise CheckpointError(f'{source}: {key} is refused: {reason}')


@dataclass
class LoadReport:
    """Which tensors of a checkpoint a network took (:func:`match_state_dict`; what
    :meth:`hmoe_arch.MFGHMoEArch.load_pretrained` returns).

    Attributes:
        loaded: Network keys filled from the checkpoint.
        kept_init: Modules (shortest prefixes) none of whose tensors were in the checkpoint, and remaining
            network keys that were not, in state_dict order.
        unused: Checkpoint keys not loaded, each with the reason.
    """

    loaded: List[str] = field(default_factory=list)
    kept_init: List[str] = field(default_factory=list)
    unused: List[str] = field(default_factory=list)

    def summary(self) -> str:
        """``Kept their initialisation: ...`` and ``Checkpoint tensors not used: ...`` (one line per tensor)."""
        kept = ', '.join(self.kept_init) if self.kept_init else 'none'
        unused = ''.join(f'\n  {line}' for line in self.unused) if self.unused else ' none'
        return f'Kept their initialisation: {kept}\nCheckpoint tensors not used:{unused}'


def match_state_dict(own: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor]
                     ) -> Tuple[Dict[str, torch.Tensor], LoadReport]:
    """The tensors of ``state`` that a network whose state_dict is ``own`` can take (same name, same shape, the same
    kind of values; buffers fixed by the window sizes equal to the network's, as :func:`check_tensor_values`
    requires), and the :class:`LoadReport` of what was taken and what was not."""
    report, accepted = LoadReport(), {}
    for key, tensor in state.items():
        if key not in own:
            report.unused.append(f'{key} {list(tensor.shape)} (no such tensor in this network)')
        elif own[key].shape != tensor.shape:
            report.unused.append(f'{key} {list(tensor.shape)} (network has {list(own[key].shape)})')
        elif (reason := _unfit_reason(key, own[key], tensor)) is not None:
            report.unused.append(f'{key} {list(tensor.shape)} ({reason})')
        else:
            accepted[key] = tensor
            report.loaded.append(key)
    report.kept_init = _collapse_to_modules([k for k in own if k not in accepted], list(own))
    return accepted, report


def _collapse_to_modules(missing: List[str], all_keys: List[str]) -> List[str]:
    """``missing`` keys with each replaced by its shortest module prefix all of whose keys (in ``all_keys``) are
    missing; order kept, duplicates dropped."""
    def prefixes(key: str) -> List[str]:
        parts = key.split('.')
        return ['.'.join(parts[:i]) for i in range(1, len(parts))]

    total: Dict[str, int] = {}
    for key in all_keys:
        for prefix in prefixes(key):
            total[prefix] = total.get(prefix, 0) + 1
    absent: Dict[str, int] = {}
    for key in missing:
        for prefix in prefixes(key):
            absent[prefix] = absent.get(prefix, 0) + 1
    collapsed: List[str] = []
    for key in missing:
        name = next((p for p in prefixes(key) if absent[p] == total[p]), key)
        if name not in collapsed:
            collapsed.append(name)
    return collapsed
