"""``basicsr infer``: super-resolve image files, folders and GeoTIFFs with any trained network of this project,
the authors' released weights or HAT's, with feathered tiled inference
(:func:`hmoe_arch.tiling.blended_tiled_forward`; GeoTIFFs in bounded-memory blocks, :mod:`hmoe_arch.commands.geotiff`).
"""
import io
import re
import tempfile
from contextlib import ExitStack
from pathlib import Path
from typing import Any, List, Optional, Sequence, Tuple, Union

import cv2
import numpy as np
import torch
from basicsr.utils import get_root_logger
from PIL import Image
from tqdm import tqdm

from ..archs import MFGHMoEArch
from ..atomic import atomic_path
from ..data.images import decode_rgb
from ..data.rs_paired_dataset import IMAGE_SUFFIXES
from ..errors import ImageError, OptionError
from ..expert_maps import group_sizes_of, save_expert_map
from ..loading import load_network, measured_scale, network_and_scale
from ..tiling import blended_tiled_forward, context_tiles, window_size_of
from .geotiff import is_georeferenced, raster_error_reason, super_resolve_geotiff

# ----------------------------------------------------------------------------------------------------------
# files
WRITABLE_SUFFIXES = ('.png', '.tif', '.tiff', '.bmp')
"""Suffixes of an ``--output`` file name (lossless formats OpenCV writes)."""
OWN_OUTPUT = re.compile(r'_(SR|experts)$')
"""Stems of what this command writes (``<name>_SR``, ``<name>_SR_experts``); skipped when scanning a folder."""


def input_files(path: Path) -> Tuple[List[Path], List[Tuple[Path, str]]]:
    """The images to super-resolve and the folder entries that look like images but cannot be read (a folder
    named ``x.png``, a dangling link), each with the reason. Hidden files and this command's own outputs are
    skipped."""
    if path.is_dir():
        files, bad, own = [], [], 0
        for entry in sorted(path.iterdir()):
            if entry.suffix.lower() not in IMAGE_SUFFIXES or entry.name.startswith('.'):
                continue
            if OWN_OUTPUT.search(entry.stem):
                own += 1
                continue
            if entry.is_file():
                files.append(entry)
            else:
                bad.append((entry, 'a folder, not an image file' if entry.is_dir() else
                            'a link to nothing (dangling symlink)' if entry.is_symlink() else 'not a regular file'))
        if not files and not bad:
            skipped = f' ({own} earlier outputs of this command, *_SR.* and *_experts.*, are not inputs)' if own else ''
            raise OptionError(f'--input {path}: no images ({", ".join(IMAGE_SUFFIXES)}) in this folder{skipped}')
        return files, bad
    if path.is_file():
        return [path], []
    raise OptionError(f'--input {path}: no such file or folder')


EXIF_ORIENTATION = {
    2: lambda a: a[:, ::-1], 3: lambda a: a[::-1, ::-1], 4: lambda a: a[::-1],
    5: lambda a: a.swapaxes(0, 1), 6: lambda a: np.rot90(a, -1), 7: lambda a: a.swapaxes(0, 1)[::-1, ::-1],
    8: lambda a: np.rot90(a, 1),
}
"""EXIF orientation tag -> the transform that shows the image upright (as viewers do)."""


def read_rgb(path: Path) -> np.ndarray:
    """An 8-bit RGB image as float32 RGB ``(H, W, 3)`` in [0, 1], upright as its EXIF orientation says (the same
    checks as ``basicsr prepare``; 16-bit and multi-band scenes go through the GeoTIFF path)."""
    try:
        data = path.read_bytes()
        img = decode_rgb(data, str(path))
    except ImageError as error:
        raise OptionError(str(error)) from None
    except OSError as error:
        raise OptionError(f'{path}: cannot read it ({error.strerror or error})') from None
    try:
        with Image.open(io.BytesIO(data)) as header:
            orientation = header.getexif().get(0x0112, 1)
    except Exception:  # no EXIF block PIL can parse: nothing to turn
        orientation = 1
    img = EXIF_ORIENTATION.get(orientation, lambda a: a)(img)
    return np.ascontiguousarray(img[..., ::-1]).astype(np.float32) / 255.0


def output_paths(inputs: List[Path], input_path: Path, output: Path) -> List[Tuple[Path, Path, bool]]:
    """``(input, output, georeferenced)`` for each input (each is opened once to tell whether it is a GeoTIFF);
    refuses an unsupported suffix, an output under a file, and any output that is one of the inputs."""
    for parent in [output, *output.parents]:
        if parent.exists():
            if not parent.is_dir() and parent != output:
                raise OptionError(f'--output {output}: {parent} is a file, so nothing can be written under it')
            break
    single_file = output.suffix != '' and not output.is_dir()
    if single_file and output.suffix.lower() not in WRITABLE_SUFFIXES:
        raise OptionError(f'--output {output}: {output.suffix} is not a format this command writes; name a file '
                          f'ending in {", ".join(WRITABLE_SUFFIXES)}, or a folder (without a suffix)')
    if single_file and len(inputs) != 1:
        raise OptionError(f'--output {output} is one file but --input {input_path} holds {len(inputs)} images; '
                          'give a folder')
    pairs = []
    for path in inputs:
        georeferenced = is_georeferenced(path)
        suffix = '.tif' if georeferenced else '.png'
        pairs.append((path, output if single_file else output / f'{path.stem}_SR{suffix}', georeferenced))
    sources = {p.resolve() for p in inputs}
    for _, target, _ in pairs:
        for written in (target, target.with_name(f'{target.stem}_experts{target.suffix}')):
            if written.resolve() in sources:
                raise OptionError(f'--output {target}: would overwrite the input {written}; choose another name')
    return pairs


def writable_folder(folder: Path) -> None:
    """Create ``folder`` and check that files can be created in it."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix='.probe-'):
            pass
    except OSError as error:
        raise OptionError(f'--output {folder}: cannot write there ({error.strerror or error})') from None


def write_image(path: Path, img: np.ndarray) -> None:
    """Write the uint8 BGR ``img`` ``(H, W, 3)`` to ``path`` in the format of its suffix (``cv2.imwrite``)."""
    if not cv2.imwrite(str(path), img):
        raise OptionError(f'--output {path}: cannot write it')


def super_resolve_image(net: torch.nn.Module, lr: np.ndarray, *, scale: int, window: int, tile: int, tile_pad: int,
                        block: int, device: torch.device, experts: Optional[np.ndarray] = None,
                        progress: bool = False, label: str = '') -> np.ndarray:
    """The x``scale`` SR of ``lr`` (float32 RGB ``(H, W, 3)``) as uint8 BGR, assembled block by block.

    Each block of ``block`` LR pixels (:func:`hmoe_arch.tiling.context_tiles`) is read with ``tile_pad`` pixels of
    context, super-resolved with feathered tiles (:func:`hmoe_arch.tiling.blended_tiled_forward`) and only its own
    area is kept, converted to uint8 at once; host memory is the uint8 output plus one block in float32. An image
    no larger than one block is one block (the same result as tiling the whole image). With ``experts`` (an
    ``(H, W)`` integer array, MoE networks) each LR pixel's expert is recorded there.

    Raises:
        OptionError: naming ``label`` when the network produces NaN or Inf.
    """
    height, width, _ = lr.shape
    out = np.empty((height * scale, width * scale, 3), np.uint8)
    blocks = context_tiles(height, width, block, tile_pad)
    for part in tqdm(blocks, unit='block', disable=not progress or len(blocks) == 1, leave=False):
        x = torch.from_numpy(np.ascontiguousarray(lr[part.context()].transpose(2, 0, 1)))
        block_experts = None if experts is None else np.zeros(x.shape[1:], np.int64)
        with torch.no_grad():
            sr = blended_tiled_forward(net, x.unsqueeze(0).to(device), scale, window, tile, tile_pad,
                                       progress, block_experts)[0]
        core = sr[(slice(None), *part.core(scale))]
        if not torch.isfinite(core).all():
            raise OptionError(f'{label}: the network produced NaN/Inf values; nothing was written')
        rgb = core.clamp_(0, 1).mul_(255.0).round_().to(torch.uint8).permute(1, 2, 0).numpy()
        out[part.area(scale)] = rgb[..., ::-1]
        if experts is not None:
            experts[part.area()] = block_experts[part.core()]
    return out


def infer(weights: Union[str, Path], input_path: Path, output: Path, *, opt_path: Optional[Path] = None,
          arch_args: Sequence[str] = (), tile: int = 256, tile_pad: int = 32, device: str = 'cpu',
          expert_map: bool = False, bands: Optional[Sequence[int]] = None, block: int = 1024,
          progress: bool = True, max_memory: Optional[float] = None) -> List[Path]:
    """Super-resolve every input (images, or GeoTIFFs with a CRS through :mod:`hmoe_arch.commands.geotiff`); returns
    the written SR paths. ``max_memory`` (GiB; None: the default) bounds the network's estimated memory
    (:func:`hmoe_arch.loading.load_network`).

    An input that cannot be read or processed is reported and the others are still written; the call then
    raises :class:`OptionError` listing every such input.
    """
    if device.startswith('cuda') and not torch.cuda.is_available():
        raise OptionError('--device cuda: no CUDA device is available')
    if tile < 1 or not 0 <= tile_pad < tile:
        raise OptionError(f'--tile must be >= 1 and 0 <= --tile-pad < --tile, got {tile} and {tile_pad}')
    if block < tile:
        raise OptionError(f'--block ({block}) must be at least --tile ({tile})')
    inputs, failed = input_files(input_path)
    pairs = output_paths(inputs, input_path, output)
    total = len(pairs) + len(failed)
    network, option_scale = network_and_scale(opt_path, ()) if opt_path is not None else (None, None)
    net = load_network(weights, network, torch.device(device), overrides=arch_args, max_memory=max_memory)
    window = window_size_of(net, net.network_options)
    declared = {'the option file\'s scale': option_scale,
                'the network\'s upscale': getattr(net, 'upscale', getattr(net, 'scale', None))}
    scale = measured_scale(net, declared, torch.device(device), window)
    if expert_map and not (isinstance(net, MFGHMoEArch) and net.moe):
        raise OptionError('--expert-map needs an MFGHMoEArch with its MoE upsampler')
    for folder in sorted({target.parent for _, target, _ in pairs}):
        writable_folder(folder)
    logger = get_root_logger()
    for path, reason in failed:
        logger.error(f'{path}: {reason}; skipped')
    written = []
    for source, target, georeferenced in tqdm(pairs, unit='image', disable=not progress):
        try:
            if georeferenced:
                maps = target.with_name(f'{target.stem}_experts.tif') if expert_map else None
                _write_geotiff(net, source, target, maps, scale=scale, window_size=window, tile=tile, tile_pad=tile_pad,
                               bands=bands, block=block, device=torch.device(device), progress=progress)
            else:
                if bands is not None:
                    raise OptionError(f'--bands applies to GeoTIFFs; {source} is not georeferenced')
                lr = read_rgb(source)
                experts = np.zeros(lr.shape[:2], np.int64) if expert_map else None
                sr_img = super_resolve_image(net, lr, scale=scale, window=window, tile=tile, tile_pad=tile_pad,
                                             block=block, device=torch.device(device), experts=experts,
                                             progress=progress, label=str(source))
                with atomic_path(target) as partial:
                    write_image(partial, sr_img)
                if experts is not None:
                    with atomic_path(target.with_name(f'{target.stem}_experts.png')) as partial:
                        save_expert_map(partial, sr_img, experts, group_sizes_of(net), scale)
        except OptionError as error:
            logger.error(f'{error}; skipped')
            failed.append((source, str(error)))
            continue
        written.append(target)
    logger.info(f'infer: {len(written)} image(s) written to {output}')
    if failed:
        reasons = [reason if str(path) in reason else f'{path}: {reason}' for path, reason in failed]
        if total == 1:
            raise OptionError(reasons[0])
        raise OptionError(f'{len(failed)} of {total} input(s) not super-resolved: ' + '; '.join(reasons))
    return written


def _write_geotiff(net: torch.nn.Module, source: Path, target: Path, maps: Optional[Path], **kwargs: Any) -> None:
    """:func:`super_resolve_geotiff` into the temporary names of ``target`` and ``maps``
    (:func:`hmoe_arch.atomic.atomic_path`), moved into place, ``target`` first, when both are complete.

    Raises:
        OptionError: naming ``source`` when it cannot be read (:func:`super_resolve_geotiff`), or ``target`` when
            it (or ``maps``) cannot be written, with the reason; nothing of this input is left.
    """
    try:
        with ExitStack() as stack:
            partial_maps = None if maps is None else stack.enter_context(atomic_path(maps))
            partial = stack.enter_context(atomic_path(target))
            super_resolve_geotiff(net, source, partial, expert_map=partial_maps, **kwargs)
    except OSError as error:  # rasterio's write errors are OSErrors; its read errors are OptionErrors already
        written = target if maps is None else f'{target} (or {maps.name})'
        raise OptionError(f'--output {written}: cannot write it ({raster_error_reason(error)})') from None
