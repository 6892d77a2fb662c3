"""Reading and writing checkpoint files: BasicSR ``.pth`` (``torch.load(weights_only=True)``), ``.safetensors``
(the network options in its metadata) and weights given as an ``https://`` URL (downloaded once into torch's hub
cache, checked against ``#sha256=<hex>`` when the URL ends with it); the state_dict inside a checkpoint
(:func:`state_dict_of`) and which of its tensors fit a network (:func:`match_state_dict`).

``safetensors`` is the optional extra ``pip install -e .[export]``; it is imported only for such files.
"""
import hashlib
import json
import os
import re
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

import torch

from .atomic import atomic_path, plain_file_mode  # noqa: F401 (plain_file_mode: re-exported)
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


def fetch_weights(url: str, cache_dir: Optional[Union[str, os.PathLike]] = None) -> Path:
    """The local copy of the weights at ``url`` (``...#sha256=<64 hex>`` to check them), downloaded into
    ``<torch hub dir>/checkpoints`` on first use; a cached file is checked again against the hash.

    Raises:
        CheckpointError: for an unreachable URL, a failed download or a hash that does not match (the file is
            then not kept).
    """
    address, _, fragment = url.partition('#')
    expected = None
    if fragment:
        match = re.fullmatch(r'sha256=([0-9a-fA-F]{64})', fragment)
        if match is None:
            raise CheckpointError(f'{url}: the part after # must be sha256=<64 hex digits>')
        expected = match.group(1).lower()
    name = Path(urllib.parse.urlparse(address).path).name or 'weights.pth'
    folder = Path(cache_dir) if cache_dir is not None else Path(torch.hub.get_dir()) / 'checkpoints'
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / (f'{expected[:12]}-{name}' if expected else name)
    if not target.is_file():
        try:
            with atomic_path(target) as partial:
                torch.hub.download_url_to_file(address, str(partial), progress=False)
                found = file_digest(partial, 'sha256') if expected is not None else None
                if found != expected:
                    raise CheckpointError(f'{url}: the downloaded file has SHA-256 {found}, not {expected}; '
                                          'it was not kept')
        except CheckpointError:
            raise
        except Exception as error:
            raise CheckpointError(f'{url}: cannot download it ({error})') from None
    elif expected is not None and (found := file_digest(target, 'sha256')) != expected:
        raise CheckpointError(f'{url}: the cached copy {target} has SHA-256 {found}, not {expected}; '
                              'remove it to download again')
    return target


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
    """The file ``source`` names: the path itself, or for an ``https://`` URL its cached download
    (:func:`fetch_weights`); whether the file exists is not checked.

    Raises:
        CheckpointError: for a URL that cannot be downloaded or whose file fails its hash check.
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

    Raises:
        CheckpointError: naming ``source`` when that is not a non-empty mapping of names to tensors.
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
    return {(k[len('module.'):] if k.startswith('module.') else k): v for k, v in checkpoint.items()}


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
    """The tensors of ``state`` that a network whose state_dict is ``own`` can take (same name, same shape), and
    the :class:`LoadReport` of what was taken and what was not."""
    report, accepted = LoadReport(), {}
    for key, tensor in state.items():
        if key not in own:
            report.unused.append(f'{key} {list(tensor.shape)} (no such tensor in this network)')
        elif own[key].shape != tensor.shape:
            report.unused.append(f'{key} {list(tensor.shape)} (network has {list(own[key].shape)})')
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
