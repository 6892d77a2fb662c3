"""GeoTIFF super-resolution: georeferencing, dtype, nodata, bands, blocks, and the docs' worked example."""
import os
import shlex
import shutil
import stat
from pathlib import Path

import numpy as np
import pytest
import torch

from hmoe_arch import MFGHMoEArch
from hmoe_arch.commands.cli import main
from hmoe_arch.commands.geotiff import is_georeferenced, super_resolve_geotiff
from hmoe_arch.commands.infer import infer
from hmoe_arch.errors import OptionError
from hmoe_arch.loading import network_options

from util import SMALL_GROUPS, docs_block, tiny, ucmerced_mini

rasterio = pytest.importorskip('rasterio', reason='GeoTIFF support needs rasterio (pip install -e .[geo])')
from affine import Affine  # noqa: E402  (a rasterio dependency)
from rasterio.transform import from_origin  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
INFERENCE_DOCS = REPO / 'docs' / 'inference.md'

TINY_ARGS = ['embed_dim=24', 'depths=[1, 1]', 'num_heads=[2, 2]', 'window_size=4', 'img_size=16',
             'squeeze_factor=6', 'expert_groups=[{kernel_size: 1, num_experts: 2}, {kernel_size: 3, num_experts: 2}]',
             'upscale=2']


def write_scene(path: Path, bands: int = 3, height: int = 21, width: int = 26, dtype: str = 'uint16') -> np.ndarray:
    rng = np.random.default_rng(0)
    data = rng.integers(1, 4096, (bands, height, width)).astype(dtype)
    data[:, 3:6, 4:9] = 0
    with rasterio.open(path, 'w', driver='GTiff', width=width, height=height, count=bands, dtype=dtype,
                       crs='EPSG:32633', transform=from_origin(500000.0, 4200000.0, 0.5, 0.5), nodata=0) as dst:
        dst.write(data)
    return data


@pytest.fixture
def net() -> MFGHMoEArch:
    return MFGHMoEArch(**tiny(upscale=2, expert_groups=SMALL_GROUPS)).eval()


@pytest.mark.parametrize('block', [64, 8])
def test_round_trip_keeps_georeferencing_dtype_and_nodata(tmp_path: Path, net: MFGHMoEArch, block: int) -> None:
    source, target = tmp_path / 'scene.tif', tmp_path / 'scene_SR.tif'
    data = write_scene(source)
    maps = tmp_path / 'experts.tif'
    super_resolve_geotiff(net, source, target, scale=2, window_size=4, tile=8, tile_pad=2, block=block,
                          expert_map=maps)
    with rasterio.open(source) as src, rasterio.open(target) as out:
        assert (out.width, out.height, out.count) == (52, 42, 3)
        assert out.crs == src.crs and out.dtypes == ('uint16',) * 3 and out.nodata == 0
        assert out.transform == from_origin(500000.0, 4200000.0, 0.25, 0.25)
        sr = out.read()
    invalid = np.any(data == 0, axis=0).repeat(2, 0).repeat(2, 1)
    assert np.all(sr[:, invalid] == 0)
    assert np.all(sr[:, ~invalid] != 0)
    with rasterio.open(maps) as expert_map:
        assert expert_map.transform == from_origin(500000.0, 4200000.0, 0.5, 0.5)
        experts = expert_map.read(1)
    assert np.all(experts[3:6, 4:9] == 255) and experts[0, 0] <= 3


def test_blocks_agree_with_one_block(tmp_path: Path, net: MFGHMoEArch) -> None:
    source = tmp_path / 'scene.tif'
    write_scene(source, height=24, width=24)
    outputs = []
    for block in (64, 12):
        target = tmp_path / f'out_{block}.tif'
        super_resolve_geotiff(net, source, target, scale=2, window_size=4, tile=12, tile_pad=4, block=block)
        with rasterio.open(target) as out:
            outputs.append(out.read().astype(np.int64))
    # blocks overlap by tile_pad pixels of context; HAT's global channel pooling makes them differ slightly
    assert np.abs(outputs[0] - outputs[1]).mean() < 0.3 * outputs[0].mean()


def test_band_selection_and_errors(tmp_path: Path, net: MFGHMoEArch) -> None:
    source = tmp_path / 'four.tif'
    write_scene(source, bands=4, dtype='uint8')
    with pytest.raises(OptionError, match=r'four.tif: 4 bands; expected 3 \(RGB\), or choose three with --bands'):
        super_resolve_geotiff(net, source, tmp_path / 'x.tif', scale=2, window_size=4, tile=8, tile_pad=2)
    with pytest.raises(OptionError, match=r'--bands 1,5,2: expected three band numbers in 1..4'):
        super_resolve_geotiff(net, source, tmp_path / 'x.tif', scale=2, window_size=4, tile=8, tile_pad=2,
                              bands=[1, 5, 2])
    super_resolve_geotiff(net, source, tmp_path / 'x.tif', scale=2, window_size=4, tile=8, tile_pad=2,
                          bands=[3, 2, 1])
    with rasterio.open(tmp_path / 'x.tif') as out:
        assert out.count == 3 and out.dtypes[0] == 'uint8'
    floats = tmp_path / 'float.tif'
    with rasterio.open(floats, 'w', driver='GTiff', width=8, height=8, count=3, dtype='float32', crs='EPSG:4326',
                       transform=from_origin(10, 50, 1, 1)) as dst:
        dst.write(np.zeros((3, 8, 8), np.float32))
    with pytest.raises(OptionError, match=r"bands of type \['float32'\]; supported: uint8, uint16"):
        super_resolve_geotiff(net, floats, tmp_path / 'y.tif', scale=2, window_size=4, tile=8, tile_pad=2)


def test_infer_command_routes_geotiffs(tmp_path: Path) -> None:
    weights = tmp_path / 'w.pth'
    torch.save({'params': MFGHMoEArch(**tiny(upscale=2, expert_groups=SMALL_GROUPS)).state_dict()}, weights)
    folder = tmp_path / 'scenes'
    folder.mkdir()
    write_scene(folder / 'a.tif')
    assert is_georeferenced(folder / 'a.tif')
    written = infer(weights, folder, tmp_path / 'out', arch_args=TINY_ARGS, tile=8, tile_pad=2, block=16,
                    progress=False)
    assert [p.name for p in written] == ['a_SR.tif']
    with rasterio.open(written[0]) as out:
        assert out.crs.to_epsg() == 32633 and out.width == 52


def write_tiled_scene(path: Path, size: int = 32) -> None:
    """A deflate-compressed uint8 GeoTIFF in 16-pixel tiles."""
    data = np.random.default_rng(1).integers(1, 255, (3, size, size)).astype('uint8')
    with rasterio.open(path, 'w', driver='GTiff', width=size, height=size, count=3, dtype='uint8', crs='EPSG:32633',
                       transform=from_origin(500000.0, 4200000.0, 0.5, 0.5), tiled=True, blockxsize=16,
                       blockysize=16, compress='deflate') as dst:
        dst.write(data)


def test_a_damaged_geotiff_in_a_folder_is_reported_and_skipped(tmp_path: Path, basicsr_log) -> None:
    weights = tmp_path / 'w.pth'
    torch.save({'params': MFGHMoEArch(**tiny(upscale=2, expert_groups=SMALL_GROUPS)).state_dict()}, weights)
    folder = tmp_path / 'scenes'
    folder.mkdir()
    for name in ('a.tif', 'b.tif', 'c.tif'):
        write_tiled_scene(folder / name)
    damaged = bytearray((folder / 'b.tif').read_bytes())
    damaged[len(damaged) // 2:len(damaged) // 2 + 400] = b'\xff' * 400  # the header and tags stay intact
    (folder / 'b.tif').write_bytes(bytes(damaged))
    assert is_georeferenced(folder / 'b.tif')
    code = main(['infer', '--weights', str(weights), '--input', str(folder), '--output', str(tmp_path / 'out'),
                 '--arch-args', *TINY_ARGS, '--tile', '8', '--tile-pad', '2', '--no-progress'])
    assert code == 2
    assert sorted(p.name for p in (tmp_path / 'out').iterdir()) == ['a_SR.tif', 'c_SR.tif']
    last = basicsr_log[-1]
    assert '\n' not in last
    assert last.startswith(f'basicsr infer: 1 of 3 input(s) not super-resolved: {folder / "b.tif"}: cannot read it '
                           'as a GeoTIFF (b.tif, band ')
    assert 'TIFFReadEncodedTile() failed' in last and last.endswith('); expected an intact GeoTIFF')
    with rasterio.open(tmp_path / 'out' / 'c_SR.tif') as out:
        assert out.width == 64 and out.crs.to_epsg() == 32633


def test_a_geotiff_that_cannot_be_written_is_named_and_skipped(tmp_path: Path, monkeypatch) -> None:
    weights = tmp_path / 'w.pth'
    torch.save({'params': MFGHMoEArch(**tiny(upscale=2, expert_groups=SMALL_GROUPS)).state_dict()}, weights)
    write_tiled_scene(tmp_path / 'a.tif')

    def full_disk(self, *args, **kwargs):  # as rasterio reports a full disk: GDAL's message is the cause
        raise rasterio.errors.RasterioIOError('Write failed. See previous exception for details.') from RuntimeError(
            'TIFFAppendToStrip:Write error at scanline 16')

    monkeypatch.setattr(rasterio.io.DatasetWriter, 'write', full_disk)
    out = tmp_path / 'out' / 'a_x2.tif'
    with pytest.raises(OptionError, match=rf'^{tmp_path / "a.tif"}: --output {out}: cannot write it '
                                          r'\(TIFFAppendToStrip:Write error at scanline 16\)$'):
        infer(weights, tmp_path / 'a.tif', out, arch_args=TINY_ARGS, tile=8, tile_pad=2, progress=False)
    assert list((tmp_path / 'out').iterdir()) == []


def test_a_scene_georeferenced_by_ground_control_points_keeps_them_scaled(tmp_path: Path) -> None:
    from rasterio.control import GroundControlPoint
    weights = tmp_path / 'w.pth'
    torch.save({'params': MFGHMoEArch(**tiny(upscale=2, expert_groups=SMALL_GROUPS)).state_dict()}, weights)
    gcps = [GroundControlPoint(row=0, col=0, x=500000.0, y=4200000.0, z=10.0),
            GroundControlPoint(row=0, col=26, x=500013.0, y=4200001.0, z=11.0),
            GroundControlPoint(row=21, col=0, x=499999.0, y=4199989.5, z=12.0),
            GroundControlPoint(row=10.5, col=13.25, x=500006.6, y=4199994.7, z=13.0)]
    source = tmp_path / 'gcps.tif'
    data = np.random.default_rng(2).integers(1, 255, (3, 21, 26)).astype('uint8')
    with rasterio.open(source, 'w', driver='GTiff', width=26, height=21, count=3, dtype='uint8', gcps=gcps,
                       crs='EPSG:32633') as dst:
        dst.write(data)
    assert is_georeferenced(source)
    written = infer(weights, source, tmp_path / 'out', arch_args=TINY_ARGS, tile=8, tile_pad=2, expert_map=True,
                    progress=False)
    assert [p.name for p in written] == ['gcps_SR.tif']
    with rasterio.open(written[0]) as out, rasterio.open(tmp_path / 'out' / 'gcps_SR_experts.tif') as experts:
        assert (out.width, out.height, out.count) == (52, 42, 3)
        out_gcps, out_crs = out.gcps
        map_gcps, map_crs = experts.gcps
        assert out_crs.to_epsg() == map_crs.to_epsg() == 32633
        assert [(p.row, p.col, p.x, p.y, p.z) for p in out_gcps] == [
            (2 * p.row, 2 * p.col, p.x, p.y, p.z) for p in gcps]
        assert [(p.row, p.col, p.x, p.y, p.z) for p in map_gcps] == [(p.row, p.col, p.x, p.y, p.z) for p in gcps]
        assert (experts.width, experts.height) == (26, 21)


@pytest.mark.slow
def test_the_docs_geotiff_recipe_and_command_keep_the_georeferencing(tmp_path: Path, monkeypatch) -> None:
    shared = '../shared/data/UCMerced_mini'
    recipe = docs_block('inference.md', 'python', "'airplane00_geo.tif'")
    command = shlex.split(docs_block('inference.md', 'bash', '--input airplane00_geo.tif'))
    assert shared in recipe and command[:2] == ['basicsr', 'infer']
    recipe = recipe.replace(shared, str(ucmerced_mini()))
    # the tiny network the command names, untrained (this checks the plumbing), where the command looks for it
    opt = Path(command[command.index('-opt') + 1])
    arch_args = command[command.index('--arch-args') + 1:command.index('--input')]
    options = network_options(REPO / opt, arch_args)
    weights = tmp_path / command[command.index('--weights') + 1]
    weights.parent.mkdir(parents=True)
    net = MFGHMoEArch(**{k: v for k, v in options.items() if k != 'type'})
    torch.save({'params_ema': net.state_dict(), 'network_g': options}, weights)
    (tmp_path / opt).parent.mkdir(parents=True)
    shutil.copyfile(REPO / opt, tmp_path / opt)
    monkeypatch.chdir(tmp_path)
    previous = os.umask(0o027)
    try:
        exec(compile(recipe, f'{INFERENCE_DOCS} (GeoTIFF recipe)', 'exec'), {'__name__': 'docs_recipe'})
        assert main(command[1:] + ['--no-progress']) == 0
    finally:
        os.umask(previous)
    scale = options['upscale']
    with rasterio.open('airplane00_geo.tif') as src, rasterio.open('airplane00_geo_x4.tif') as out, \
            rasterio.open('airplane00_geo_x4_experts.tif') as experts:
        assert src.crs.to_epsg() == out.crs.to_epsg() == experts.crs.to_epsg() == 26911
        assert src.transform == from_origin(500000, 3800000, 0.3, 0.3) == experts.transform
        assert out.transform == src.transform @ Affine.scale(1 / scale)
        assert out.transform.almost_equals(from_origin(500000, 3800000, 0.075, 0.075))
        assert (src.width, src.height, out.width, out.height) == (256, 256, 256 * scale, 256 * scale)
        assert out.dtypes == ('uint8',) * 3 and out.nodata == 0 and experts.nodata == 255
    for name in ('airplane00_geo_x4.tif', 'airplane00_geo_x4_experts.tif'):  # as open(name, 'w') would make them
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o640, name
