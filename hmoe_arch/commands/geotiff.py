"""Super-resolution of georeferenced rasters (GeoTIFF) of any size, with rasterio (``pip install -e .[geo]``).

The scene is processed in blocks of ``block`` LR pixels (:func:`hmoe_arch.tiling.context_tiles`), each read
with ``tile_pad`` pixels of context and super-resolved with feathered tiles
(:func:`hmoe_arch.tiling.blended_tiled_forward`); only the block's own area is written, so memory is bounded by the
block size whatever the scene size. The output keeps the CRS, divides the affine transform's pixel size by the
scale (a scene georeferenced by ground control points instead keeps them, each at its row and column times the
scale, with their CRS), keeps the dtype and nodata (an output pixel is nodata where its LR pixel is nodata in any
used band). Values are scaled to [0, 1] by the dtype's maximum (uint8) or, for uint16, by each band's real maximum
over valid pixels (one extra windowed pass), and back. A scene that cannot be read (damaged, truncated) is refused
in one line naming it and GDAL's reason (:class:`OptionError`).
"""
import warnings
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from tqdm import tqdm

from ..errors import OptionError
from ..tiling import blended_tiled_forward, context_tiles

SUPPORTED_DTYPES = ('uint8', 'uint16')


def _rasterio():
    try:
        import rasterio
    except ImportError as error:
        raise OptionError('GeoTIFF input needs rasterio: pip install -e .[geo]') from error
    return rasterio


def is_georeferenced(path: Path) -> bool:
    """True for a TIFF that rasterio reads with a CRS or with ground control points (plain TIFFs go through the
    image path)."""
    if path.suffix.lower() not in ('.tif', '.tiff'):
        return False
    try:
        rasterio = _rasterio()
    except OptionError:
        return False
    with warnings.catch_warnings():  # a plain TIFF is expected here, not worth a warning per file
        warnings.simplefilter('ignore', rasterio.errors.NotGeoreferencedWarning)
        try:
            with rasterio.open(path) as src:
                return src.crs is not None or bool(src.gcps[0])
        except rasterio.errors.RasterioError:  # empty or corrupt: the image reader names what is wrong
            return False


def raster_error_reason(error: BaseException) -> str:
    """What GDAL said behind a rasterio error, in one line: rasterio's own message ("Read failed. See previous
    exception for details.") is replaced by the first and the innermost of the errors that caused it."""
    messages = []
    cause: Optional[BaseException] = error
    while cause is not None and len(messages) < 10:
        text = ' '.join(str(cause).split())
        if text and 'See previous exception' not in text and text not in messages:
            messages.append(text)
        cause = cause.__cause__ or cause.__context__
    if not messages:
        return type(error).__name__
    return messages[0] if len(messages) == 1 else f'{messages[0]} ({messages[-1]})'


def _read(src, source: Path, bands: Sequence[int], slices) -> np.ndarray:
    """``bands`` of ``src`` in the window ``slices`` (rows, columns), ``(len(bands), h, w)`` in the file's dtype.

    Raises:
        OptionError: naming ``source`` and GDAL's reason, when the data cannot be read (a damaged or truncated
            file).
    """
    rasterio = _rasterio()
    from rasterio.windows import Window
    try:
        return src.read(list(bands), window=Window.from_slices(*slices))
    except (rasterio.errors.RasterioError, OSError) as error:
        raise OptionError(f'{source}: cannot read it as a GeoTIFF ({raster_error_reason(error)}); expected an '
                          'intact GeoTIFF') from None


def _band_scale(src, source: Path, bands: Sequence[int], dtype: str, block: int) -> np.ndarray:
    """Per-band divisor mapping values to [0, 1], ``(len(bands),)`` float32: 255 for uint8, else each band's
    maximum over valid pixels (at least 1), read in blocks of ``block`` pixels."""
    if dtype == 'uint8':
        return np.full(len(bands), 255.0, np.float32)
    peak = np.zeros(len(bands), np.float64)
    for part in context_tiles(src.height, src.width, block, 0):
        data = _read(src, source, bands, part.area())
        valid = np.ones(data.shape[1:], bool) if src.nodata is None else np.all(data != src.nodata, axis=0)
        if valid.any():
            peak = np.maximum(peak, data[:, valid].max(axis=1))
    return np.maximum(peak, 1).astype(np.float32)


def super_resolve_geotiff(net: torch.nn.Module, source: Path, target: Path, *, scale: int, window_size: int,
                          tile: int, tile_pad: int, bands: Optional[Sequence[int]] = None, block: int = 1024,
                          device: torch.device = torch.device('cpu'), expert_map: Optional[Path] = None,
                          progress: bool = False) -> None:
    """Write the x``scale`` SR of the GeoTIFF ``source`` to ``target`` (see the module docstring). With
    ``expert_map``, the expert of every LR pixel is written there as a uint8 GeoTIFF on the input's grid.

    Raises:
        OptionError: naming ``source``, for a file that cannot be read (damaged, truncated) or bands this command
            does not take. Errors writing ``target`` or ``expert_map`` (a full disk) are rasterio's (``OSError``).
    """
    rasterio = _rasterio()
    from affine import Affine
    from rasterio.control import GroundControlPoint
    from rasterio.windows import Window
    try:
        opened = rasterio.open(source)
    except (rasterio.errors.RasterioError, OSError) as error:
        raise OptionError(f'{source}: cannot read it as a GeoTIFF ({raster_error_reason(error)}); expected an '
                          'intact GeoTIFF') from None
    with opened as src:
        if bands is None:
            if src.count != 3:
                raise OptionError(f'{source}: {src.count} bands; expected 3 (RGB), or choose three with --bands '
                                  '(e.g. --bands 3,2,1)')
            bands = [1, 2, 3]
        if len(bands) != 3 or any(not 1 <= b <= src.count for b in bands):
            raise OptionError(f'--bands {",".join(map(str, bands))}: expected three band numbers in 1..{src.count}')
        dtypes = {src.dtypes[b - 1] for b in bands}
        if len(dtypes) != 1 or next(iter(dtypes)) not in SUPPORTED_DTYPES:
            raise OptionError(f'{source}: bands of type {sorted(dtypes)}; supported: {", ".join(SUPPORTED_DTYPES)}')
        dtype = next(iter(dtypes))
        divisor = _band_scale(src, source, bands, dtype, block)
        nodata = src.nodata
        gcps, gcp_crs = src.gcps
        profile = src.profile.copy()
        profile.update(driver='GTiff', width=src.width * scale, height=src.height * scale, count=3, dtype=dtype,
                       transform=src.transform @ Affine.scale(1 / scale), tiled=True, blockxsize=256,
                       blockysize=256)
        map_profile = src.profile.copy()
        map_profile.update(driver='GTiff', count=1, dtype='uint8', nodata=255)
        if gcps and src.crs is None:  # georeferenced by ground control points (pixel corners, so scaled exactly)
            for written in (profile, map_profile):
                written.pop('transform')
            profile.update(crs=gcp_crs, gcps=[
                GroundControlPoint(row=p.row * scale, col=p.col * scale, x=p.x, y=p.y, z=p.z, id=p.id, info=p.info)
                for p in gcps])
            map_profile.update(crs=gcp_crs, gcps=gcps)
        target.parent.mkdir(parents=True, exist_ok=True)
        map_dst = None
        if expert_map is not None:
            map_dst = rasterio.open(expert_map, 'w', **map_profile)
        try:
            blocks = context_tiles(src.height, src.width, block, tile_pad)
            with rasterio.open(target, 'w', **profile) as dst:
                for part in tqdm(blocks, unit='block', desc=source.name, disable=not progress, leave=False):
                    data = _read(src, source, bands, part.context()).astype(np.float32)
                    invalid = np.zeros(data.shape[1:], bool) if nodata is None else np.any(
                        data == nodata, axis=0)
                    x = np.where(invalid, 0.0, np.clip(data / divisor[:, None, None], 0, 1))
                    experts = np.zeros(x.shape[1:], np.int64) if map_dst is not None else None
                    with torch.no_grad():
                        sr = blended_tiled_forward(net, torch.from_numpy(x).unsqueeze(0).to(device), scale,
                                                   window_size, tile, tile_pad, expert_map=experts)[0].numpy()
                    rows, cols = part.core(scale)
                    values = np.round(np.clip(sr[:, rows, cols], 0, 1) * divisor[:, None, None])
                    values = values.astype(dtype)
                    if nodata is not None:
                        hr_invalid = invalid.repeat(scale, 0).repeat(scale, 1)[rows, cols]
                        # a valid pixel must not come out as nodata
                        clash = (values == nodata) & ~hr_invalid[None]
                        values[clash] = nodata + 1 if nodata < np.iinfo(dtype).max else nodata - 1
                        values[:, hr_invalid] = nodata
                    dst.write(values, window=Window.from_slices(*part.area(scale)))
                    if map_dst is not None:
                        core = np.where(invalid[part.core()], 255, experts[part.core()]).astype(np.uint8)
                        map_dst.write(core[None], window=Window.from_slices(*part.area()))
        finally:
            if map_dst is not None:
                map_dst.close()
