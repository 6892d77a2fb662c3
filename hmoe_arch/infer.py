"""``basicsr infer``: super-resolve image files, folders and GeoTIFFs with any trained network of this project,
the authors' released weights or HAT's, with feathered tiled inference
(:func:`hmoe_arch.tiling.blended_tiled_forward`; GeoTIFFs in bounded-memory blocks, :mod:`hmoe_arch.geotiff`).
"""
import math
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import cv2
import numpy as np
import torch
from basicsr.archs import build_network
from basicsr.utils import get_root_logger, img2tensor, tensor2img
from tqdm import tqdm

from .archs import MFGHMoEArch
from .archs.mfghmoe_arch import checkpoint_filter_fn
from .data.prepare import PrepareError, decode_rgb
from .data.rs_paired_dataset import IMAGE_SUFFIXES
from .expert_maps import group_sizes_of, save_expert_map
from .geotiff import is_georeferenced, super_resolve_geotiff
from .options import OptionError, apply_force_yml, read_option_file
from .tiling import blended_tiled_forward


# ----------------------------------------------------------------------------------------------------------
# network
def checkpoint_scale(state: Dict[str, torch.Tensor]) -> Optional[int]:
    """The upscaling factor a state_dict was trained for, read from its upsampler's shapes (None if unknown)."""
    experts = state.get('upsample.0.experts.0.weight')
    if experts is not None:
        return round(math.sqrt(experts.shape[0] / experts.shape[1]))
    convs = [state[k] for k in sorted(state) if k.startswith('upsample.') and k.endswith('.weight')
             and state[k].dim() == 4]
    if convs and all(c.shape[0] == 4 * c.shape[1] for c in convs):
        return 2 ** len(convs)
    if len(convs) == 1 and convs[0].shape[0] == 9 * convs[0].shape[1]:
        return 3
    return None


def network_options(opt_path: Optional[Path], arch_args: Sequence[str]) -> Dict[str, Any]:
    """``network_g`` of an option file (default: MFGHMoEArch's defaults) with ``key=value`` overrides (YAML)."""
    holder: Dict[str, Any] = {'network_g': {'type': 'MFGHMoEArch'}}
    if opt_path is not None:
        holder = {'network_g': dict(read_option_file(opt_path, required=('network_g',))['network_g'])}
    for entry in arch_args:
        apply_force_yml(holder, f'network_g:{entry}')
    return holder['network_g']


def load_network(weights: Path, network: Dict[str, Any], device: torch.device, *, param_key: str = 'params_ema',
                 strict: bool = True, label: str = '--weights') -> torch.nn.Module:
    """Build ``network`` and load ``weights``: the ``param_key`` entry, else ``params``, else the file itself
    as a state_dict (``weights_only``). A checkpoint trained for another scale is refused before loading.
    Errors are :class:`OptionError` naming ``label`` (the flag or option key that gave the path)."""
    if not weights.is_file():
        raise OptionError(f'{label} {weights}: no such file')
    try:
        checkpoint = torch.load(weights, map_location='cpu', weights_only=True)
    except Exception as error:
        raise OptionError(f'{label} {weights}: not a checkpoint torch.load(weights_only=True) can read '
                          f'({error})') from error
    try:
        state = checkpoint_filter_fn(checkpoint, param_key, str(weights))
    except ValueError as error:
        raise OptionError(f'{label} {error}') from error
    try:
        net = build_network(dict(network))
    except (ValueError, TypeError, KeyError) as error:
        raise OptionError(f'network_g: {error}') from error
    scale, trained = getattr(net, 'upscale', None), checkpoint_scale(state)
    if scale is not None and trained is not None and scale != trained:
        fix = f'use --arch-args upscale={trained}' if label == '--weights' else f'set network_g.upscale: {trained}'
        raise OptionError(f'{label} {weights}: trained for x{trained}, but the network is x{scale} ({fix})')
    try:
        if isinstance(net, MFGHMoEArch):
            net.load_pretrained(state, strict=strict)
        else:
            net.load_state_dict(state, strict=strict)
    except (ValueError, RuntimeError) as error:
        raise OptionError(f'{label} {weights}: does not fit the network: {error}') from error
    return net.to(device).eval()


# ----------------------------------------------------------------------------------------------------------
# files
def input_files(path: Path) -> List[Path]:
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise OptionError(f'--input {path}: no images ({", ".join(IMAGE_SUFFIXES)}) in this folder')
        return files
    if path.is_file():
        return [path]
    raise OptionError(f'--input {path}: no such file or folder')


def read_rgb(path: Path) -> np.ndarray:
    """An 8-bit RGB image as float32 BGR in [0, 1] (the same checks as ``basicsr prepare``; 16-bit and
    multi-band scenes go through the GeoTIFF path)."""
    try:
        return decode_rgb(path.read_bytes(), str(path)).astype(np.float32) / 255.0
    except PrepareError as error:
        raise OptionError(str(error)) from error


def output_paths(inputs: List[Path], output: Path) -> Iterator[Tuple[Path, Path]]:
    single = len(inputs) == 1 and output.suffix.lower() in IMAGE_SUFFIXES
    for path in inputs:
        suffix = '.tif' if is_georeferenced(path) else '.png'
        yield path, output if single else output / f'{path.stem}_SR{suffix}'


def infer(weights: Path, input_path: Path, output: Path, *, opt_path: Optional[Path] = None,
          arch_args: Sequence[str] = (), tile: int = 256, tile_pad: int = 32, device: str = 'cpu',
          expert_map: bool = False, bands: Optional[Sequence[int]] = None, block: int = 1024,
          progress: bool = True) -> List[Path]:
    """Super-resolve every input (images, or GeoTIFFs with a CRS through :mod:`hmoe_arch.geotiff`); returns
    the written SR paths."""
    if device.startswith('cuda') and not torch.cuda.is_available():
        raise OptionError('--device cuda: no CUDA device is available')
    if tile < 1 or not 0 <= tile_pad < tile:
        raise OptionError(f'--tile must be >= 1 and 0 <= --tile-pad < --tile, got {tile} and {tile_pad}')
    if block < tile:
        raise OptionError(f'--block ({block}) must be at least --tile ({tile})')
    inputs = input_files(input_path)
    net = load_network(weights, network_options(opt_path, arch_args), torch.device(device))
    scale = int(getattr(net, 'upscale', getattr(net, 'scale', 1)))
    window = int(getattr(net, 'window_size', 1))
    if expert_map and not (isinstance(net, MFGHMoEArch) and net.moe):
        raise OptionError('--expert-map needs an MFGHMoEArch with its MoE upsampler')
    written = []
    for source, target in tqdm(list(output_paths(inputs, output)), unit='image', disable=not progress):
        if is_georeferenced(source):
            maps = target.with_name(f'{target.stem}_experts.tif') if expert_map else None
            super_resolve_geotiff(net, source, target, scale=scale, window_size=window, tile=tile, tile_pad=tile_pad,
                                  bands=bands, block=block, device=torch.device(device), expert_map=maps,
                                  progress=progress)
            written.append(target)
            continue
        if bands is not None:
            raise OptionError(f'--bands applies to GeoTIFFs; {source} is not georeferenced')
        lq = img2tensor(read_rgb(source), bgr2rgb=True, float32=True).unsqueeze(0).to(device)
        experts = np.zeros(lq.shape[2:], np.int64) if expert_map else None
        with torch.no_grad():
            sr = blended_tiled_forward(net, lq, scale, window, tile, tile_pad, progress, experts)
        target.parent.mkdir(parents=True, exist_ok=True)
        sr_img = tensor2img(sr)
        if not cv2.imwrite(str(target), sr_img):
            raise OptionError(f'--output {target}: cannot write it')
        written.append(target)
        if experts is not None:
            save_expert_map(target.with_name(f'{target.stem}_experts.png'), sr_img, experts, group_sizes_of(net),
                            scale)
    get_root_logger().info(f'infer: {len(written)} image(s) written to {output}')
    return written
