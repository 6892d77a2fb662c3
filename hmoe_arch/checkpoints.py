"""Reading and writing checkpoint files: BasicSR ``.pth`` (``torch.load(weights_only=True)``), ``.safetensors``
(the network options in its metadata) and weights given as an ``https://`` URL (downloaded once into torch's hub
cache, checked against ``#sha256=<hex>`` when the URL ends with it).

``safetensors`` is the optional extra ``pip install -e .[export]``; it is imported only for such files.
"""
import hashlib
import json
import os
import re
import urllib.parse
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Union

import torch

from .errors import CheckpointError

CONFIG_ENTRY = 'network_g'
"""Checkpoint entry (``.pth``) or safetensors metadata key (JSON) holding the network options."""
SAFETENSORS_PARAM_KEY = 'params_ema'
"""The entry a ``.safetensors`` file stands for when read as a BasicSR checkpoint."""


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


def plain_file_mode() -> int:
    """The permission bits ``open(path, 'w')`` gives a new file: ``0o666 & ~umask`` (the umask read from
    ``/proc/self/status`` on Linux, else by setting it and setting it back at once)."""
    try:
        with open('/proc/self/status') as status:
            for line in status:
                if line.startswith('Umask:'):
                    return 0o666 & ~int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o077)
    os.umask(mask)
    return 0o666 & ~mask


def move_into_place(partial: Union[str, os.PathLike], target: Union[str, os.PathLike]) -> None:
    """Rename the complete file ``partial`` to ``target`` (atomic on one file system), with the permissions a plain
    ``open(target, 'w')`` would give it (:func:`plain_file_mode`): writers that go through a private temporary
    file of their own (safetensors' ``save_file``, torch.hub's download) leave it 0600."""
    os.chmod(partial, plain_file_mode())
    os.replace(partial, target)


def is_url(text: Union[str, os.PathLike]) -> bool:
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
        partial = target.with_name(f'.{target.name}.partial-{os.getpid()}')
        try:
            torch.hub.download_url_to_file(address, str(partial), progress=False)
            found = file_digest(partial, 'sha256') if expected is not None else None
            if found != expected:
                raise CheckpointError(f'{url}: the downloaded file has SHA-256 {found}, not {expected}; '
                                      'it was not kept')
            move_into_place(partial, target)
        except CheckpointError:
            raise
        except Exception as error:
            raise CheckpointError(f'{url}: cannot download it ({error})') from None
        finally:
            partial.unlink(missing_ok=True)
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
