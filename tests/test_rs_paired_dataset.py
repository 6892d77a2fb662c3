"""RSPairedDataset: on-the-fly LR and pre-made pairs, disk and LMDB, crops, augmentation, errors."""
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from basicsr.data import build_dataset
from PIL import Image

from hmoe_arch.commands.prepare import prepare
from hmoe_arch.data import RSPairedDataset, rs_paired_dataset
from hmoe_arch.data.degradations import downsample
from hmoe_arch.errors import DatasetError

from util import make_ucmerced_tree, ucmerced_mini

PREPARED_CLASSES = ('agricultural', 'airplane', 'golfcourse')


@pytest.fixture(scope='module')
def prepared(tmp_path_factory) -> Path:
    """Three classes of the real UCMerced subset (30 images; golfcourse has the 251x256 ones) prepared with LMDBs
    (x2, x4): 9 test and 21 training images."""
    source = tmp_path_factory.mktemp('source')
    for name in PREPARED_CLASSES:
        shutil.copytree(ucmerced_mini() / 'Images' / name, source / 'Images' / name)
    out = tmp_path_factory.mktemp('data') / 'UCMerced'
    prepare('ucmerced', source, out, lmdb=True, progress=False)
    return out


@pytest.fixture(scope='module')
def odd_tree(tmp_path_factory) -> Path:
    """An HR folder with an odd-sized image (as in UCMerced: 251x256)."""
    root = tmp_path_factory.mktemp('odd')
    return make_ucmerced_tree(root, classes=('golfcourse',), per_class=2, size=(24, 24),
                              odd={'golfcourse01.tif': (27, 26)}) / 'Images' / 'golfcourse'


def chw_to_hwc_bgr(t: torch.Tensor) -> np.ndarray:
    return t.numpy().transpose(1, 2, 0)[:, :, ::-1]


def test_val_pairs_disk_and_lmdb_are_identical(prepared: Path) -> None:
    disk = RSPairedDataset({'phase': 'val', 'scale': 4, 'dataroot_gt': str(prepared / 'Test_HR'),
                            'dataroot_lq': str(prepared / 'Test_LR_x4'), 'io_backend': {'type': 'disk'}})
    lmdb = RSPairedDataset({'phase': 'val', 'scale': 4, 'dataroot_gt': str(prepared / 'Test_HR.lmdb'),
                            'dataroot_lq': str(prepared / 'Test_LR_x4.lmdb'), 'io_backend': {'type': 'lmdb'}})
    assert len(disk) == len(lmdb) == 9
    for i in range(len(disk)):
        a, b = disk[i], lmdb[i]
        assert torch.equal(a['gt'], b['gt']) and torch.equal(a['lq'], b['lq'])
        assert a['gt'].shape[1] == 4 * a['lq'].shape[1] and a['gt'].shape[2] == 4 * a['lq'].shape[2]
        assert Path(a['gt_path']).stem == Path(b['gt_path']).stem
    assert set(disk[0]) == {'lq', 'gt', 'lq_path', 'gt_path'}


def test_train_from_lmdb_and_split_list_equals_disk(prepared: Path) -> None:
    common = {'phase': 'val', 'scale': 2, 'split_file': str(prepared / 'train.txt')}
    disk = RSPairedDataset({**common, 'dataroot_gt': str(prepared / 'Train')})
    lmdb = RSPairedDataset({**common, 'dataroot_gt': str(prepared / 'Train.lmdb'), 'io_backend': {'type': 'lmdb'}})
    assert len(disk) == len(lmdb) == 21
    for i in (0, 10, 20):
        assert torch.equal(disk[i]['lq'], lmdb[i]['lq']) and torch.equal(disk[i]['gt'], lmdb[i]['gt'])


def test_on_the_fly_lr_is_imresize_of_the_cropped_gt(odd_tree: Path) -> None:
    for degradation in ('bicubic', 'bilinear'):
        ds = RSPairedDataset({'phase': 'val', 'scale': 4, 'dataroot_gt': str(odd_tree), 'degradation': degradation})
        item = ds[1]
        assert item['gt'].shape == (3, 24, 24) and item['lq'].shape == (3, 6, 6)
        gt = chw_to_hwc_bgr(item['gt'])
        np.testing.assert_allclose(chw_to_hwc_bgr(item['lq']), downsample(np.ascontiguousarray(gt), 4, degradation),
                                   atol=1e-6)


def test_train_crops_stay_aligned_under_augmentation(prepared: Path) -> None:
    ds = build_dataset({'type': 'RSPairedDataset', 'name': 'ucm', 'phase': 'train', 'scale': 4, 'gt_size': 32,
                        'dataroot_gt': str(prepared / 'Train'), 'split_file': str(prepared / 'train.txt'),
                        'use_hflip': True, 'use_rot': True, 'io_backend': {'type': 'disk'}, 'batch_size_per_gpu': 4,
                        'num_worker_per_gpu': 0, 'dataset_enlarge_ratio': 1})
    np.random.seed(0)
    for i in range(20):
        item = ds[i]
        assert item['gt'].shape == (3, 32, 32) and item['lq'].shape == (3, 8, 8)
        gt = np.ascontiguousarray(chw_to_hwc_bgr(item['gt']))
        np.testing.assert_allclose(chw_to_hwc_bgr(item['lq']), downsample(gt, 4), atol=1.01 / 255)


def test_train_crops_from_premade_pairs_are_aligned(prepared: Path) -> None:
    ds = RSPairedDataset({'phase': 'train', 'scale': 2, 'gt_size': 16, 'dataroot_gt': str(prepared / 'Test_HR'),
                          'dataroot_lq': str(prepared / 'Test_LR_x2')})
    np.random.seed(1)
    for i in range(len(ds)):
        item = ds[i]
        gt = np.ascontiguousarray(chw_to_hwc_bgr(item['gt']))
        # the stored LR was made from the whole image: away from the patch border it is the patch's LR
        np.testing.assert_allclose(chw_to_hwc_bgr(item['lq'])[2:-2, 2:-2], downsample(gt, 2)[2:-2, 2:-2],
                                   atol=1.01 / 255)


@pytest.mark.parametrize('backend', ['disk', 'lmdb'])
@pytest.mark.parametrize('pairs', [False, True])
def test_cache_gives_the_same_items_without_reading_files_again(prepared: Path, tmp_path: Path, backend: str,
                                                                pairs: bool) -> None:
    suffix = '.lmdb' if backend == 'lmdb' else ''
    roots = {'dataroot_gt': prepared / f'Test_HR{suffix}'}
    if pairs:
        roots['dataroot_lq'] = prepared / f'Test_LR_x4{suffix}'
    for phase in ('train', 'val'):
        copies = {key: tmp_path / phase / root.name for key, root in roots.items()}
        for key, root in roots.items():
            shutil.copytree(root, copies[key])
        common = {'phase': phase, 'scale': 4, 'gt_size': 32, 'io_backend': {'type': backend}}
        plain = RSPairedDataset({**common, **{k: str(v) for k, v in roots.items()}})
        cached = RSPairedDataset({**common, **{k: str(v) for k, v in copies.items()}, 'cache': True})
        for folder in copies.values():  # everything the cached dataset returns comes from its memory
            for file in folder.iterdir():
                file.write_bytes(b'')
        for i in range(len(plain)):
            np.random.seed(i), random.seed(i)  # crops, augmentation
            a = plain[i]
            np.random.seed(i), random.seed(i)
            b = cached[i]
            assert torch.equal(a['gt'], b['gt']) and torch.equal(a['lq'], b['lq'])
            assert Path(a['gt_path']).name == Path(b['gt_path']).name


def test_cache_keeps_its_images_unchanged_by_augmentation(prepared: Path) -> None:
    ds = RSPairedDataset({'phase': 'train', 'scale': 4, 'gt_size': 64, 'dataroot_gt': str(prepared / 'Test_HR'),
                          'cache': True, 'use_hflip': True, 'use_rot': True})
    before = {key: img.copy() for key, (img, _) in ds._cache.items()}
    np.random.seed(3)
    for _ in range(5):
        for i in range(len(ds)):
            ds[i]
    assert all(np.array_equal(before[key], img) for key, (img, _) in ds._cache.items())


def test_cache_larger_than_half_the_available_memory_is_refused_before_decoding(prepared: Path, monkeypatch,
                                                                                basicsr_log) -> None:
    needed = sum(3 * np.prod(Image.open(path).size) for path in (prepared / 'Test_HR').iterdir())
    monkeypatch.setattr(rs_paired_dataset, 'available_memory', lambda: 2 * needed - 2)
    with pytest.raises(DatasetError, match=r'`cache` would keep 9 images of .*Test_HR decoded in memory, 0.0 GiB, '
                                           r'more than half of the 0.0 GiB available now; set cache: false'):
        RSPairedDataset({'phase': 'val', 'scale': 4, 'dataroot_gt': str(prepared / 'Test_HR'), 'cache': True})
    monkeypatch.setattr(rs_paired_dataset, 'available_memory', lambda: 2 * needed)  # the 9 images fit exactly
    ds = RSPairedDataset({'phase': 'val', 'scale': 4, 'dataroot_gt': str(prepared / 'Test_HR'), 'cache': True,
                          'name': 'ucm_test'})
    assert len(ds._cache) == 9
    megabytes = needed / 2 ** 20
    assert f'RSPairedDataset ucm_test: 9 images decoded into memory (cache: true), {megabytes:.1f} MiB' in basicsr_log


def test_headers_are_read_once_for_the_size_checks_and_the_cache(prepared: Path, monkeypatch) -> None:
    opened = []
    real_open = Image.open
    monkeypatch.setattr(rs_paired_dataset.Image, 'open', lambda path, *a, **k: opened.append(path) or real_open(path))
    ds = RSPairedDataset({'phase': 'train', 'scale': 4, 'gt_size': 32, 'dataroot_gt': str(prepared / 'Test_HR'),
                          'dataroot_lq': str(prepared / 'Test_LR_x4'), 'cache': True})
    assert len(ds._cache) == 18
    files = [path for path in opened if isinstance(path, str)]  # decoding opens the bytes read, not the file
    assert len(files) == 18 and len(set(files)) == 18  # 9 GT and 9 LR headers, each once


def test_available_memory_reads_linux_meminfo() -> None:
    memory = rs_paired_dataset.available_memory()
    assert memory is None or memory > 2 ** 20


def test_cache_must_be_a_boolean(odd_tree: Path) -> None:
    with pytest.raises(DatasetError, match=r"`cache` must be true or false, got 'yes'"):
        RSPairedDataset({'phase': 'val', 'scale': 4, 'dataroot_gt': str(odd_tree), 'cache': 'yes'})


def test_basicsrs_persistent_workers_key_is_accepted_beside_the_dataset_keys(odd_tree: Path) -> None:
    common = {'phase': 'val', 'scale': 4, 'dataroot_gt': str(odd_tree)}
    assert len(RSPairedDataset({**common, 'persistent_workers': True})) == 2
    with pytest.raises(DatasetError, match=r"unknown key\(s\) \['persistent_worker'\]"):
        RSPairedDataset({**common, 'persistent_worker': True})


def test_mean_std_normalisation(odd_tree: Path) -> None:
    plain = RSPairedDataset({'phase': 'val', 'scale': 2, 'dataroot_gt': str(odd_tree)})[0]
    normed = RSPairedDataset({'phase': 'val', 'scale': 2, 'dataroot_gt': str(odd_tree), 'mean': [0.5, 0.5, 0.5],
                              'std': [0.25, 0.25, 0.25]})[0]
    torch.testing.assert_close(normed['gt'], (plain['gt'] - 0.5) / 0.25)


@pytest.mark.parametrize('overrides, error, message', [
    ({'colour': 'rgb'}, ValueError, r"unknown key\(s\) \['colour'\]"),
    ({'scale': 0}, ValueError, '`scale` must be a positive integer'),
    ({'degradation': 'nearest'}, ValueError, '`degradation` must be one of'),
    ({'phase': 'train', 'gt_size': 30}, ValueError, r'`gt_size` must be a multiple of scale \(4\)'),
    ({'io_backend': {'type': 'lmdb'}}, ValueError, 'is lmdb but .* is not an .lmdb folder'),
    ({'io_backend': {'type': 'ceph'}}, ValueError, "`io_backend.type` must be 'disk' or 'lmdb'"),
    ({'std': [0.5, 0, 0.5]}, ValueError, r'`std` must be positive'),
    ({'mean': [0.5, 0.5]}, ValueError, r'`mean` must be a list of 3 numbers'),
    ({'dataroot_gt': '/no/such/folder'}, FileNotFoundError, '/no/such/folder is not a folder'),
])
def test_option_errors_name_the_key(odd_tree: Path, overrides: dict, error, message: str) -> None:
    opt = {'phase': 'val', 'scale': 4, 'dataroot_gt': str(odd_tree), **overrides}
    with pytest.raises(error, match=message):
        RSPairedDataset(opt)


def test_split_list_naming_missing_images(odd_tree: Path, tmp_path: Path) -> None:
    split = tmp_path / 'split.txt'
    split.write_text('golfcourse00.tif\ngolfcourse77.tif\n')
    with pytest.raises(FileNotFoundError, match=r"split.txt are not in .* e.g. \['golfcourse77'\]"):
        RSPairedDataset({'phase': 'val', 'scale': 2, 'dataroot_gt': str(odd_tree), 'split_file': str(split)})


@pytest.mark.parametrize('backend', ['disk', 'lmdb'])
def test_lr_of_the_wrong_size_is_named_at_construction(prepared: Path, backend: str) -> None:
    ext = '.lmdb' if backend == 'lmdb' else ''
    with pytest.raises(DatasetError, match=r'Test_LR_x2.*/\w+(\.png)? is 128x128 but .* expected the GT size '
                                           r'divided by 4'):
        RSPairedDataset({'phase': 'val', 'scale': 4, 'dataroot_gt': str(prepared / f'Test_HR{ext}'),
                         'dataroot_lq': str(prepared / f'Test_LR_x2{ext}'), 'io_backend': {'type': backend}})


def test_gt_smaller_than_gt_size_is_named_at_construction(prepared: Path) -> None:
    with pytest.raises(DatasetError, match=r'golfcourse0[4-7].png is 248x256, smaller than gt_size 256'):
        RSPairedDataset({'phase': 'train', 'scale': 4, 'gt_size': 256, 'dataroot_gt': str(prepared / 'Train')})


def test_cmyk_and_16_bit_images_are_refused_when_read(tmp_path: Path) -> None:
    folder = tmp_path / 'hr'
    folder.mkdir()
    Image.fromarray(np.zeros((8, 8, 4), np.uint8), mode='CMYK').save(folder / 'cmyk.jpg')
    ds = RSPairedDataset({'phase': 'val', 'scale': 2, 'dataroot_gt': str(folder)})
    with pytest.raises(DatasetError, match=r'cmyk.jpg: CMYK image; expected an 8-bit RGB image'):
        ds[0]
    with pytest.raises(DatasetError, match=r'cmyk.jpg: CMYK image; expected an 8-bit RGB image'):  # when built
        RSPairedDataset({'phase': 'val', 'scale': 2, 'dataroot_gt': str(folder), 'cache': True})


def test_a_key_missing_from_the_lmdb_is_named_with_the_database(tmp_path: Path) -> None:
    import cv2
    import lmdb
    root = tmp_path / 'HR.lmdb'
    ok, png = cv2.imencode('.png', np.full((8, 8, 3), 90, np.uint8))
    with lmdb.open(str(root), map_size=1 << 20) as env, env.begin(write=True) as txn:
        txn.put(b'kept', png.tobytes())
    (root / 'meta_info.txt').write_text('kept.png (8,8,3) 1\nlost.png (8,8,3) 1\n')
    ds = RSPairedDataset({'phase': 'val', 'scale': 2, 'dataroot_gt': str(root), 'io_backend': {'type': 'lmdb'}})
    assert ds.stems == ['kept', 'lost'] and ds[0]['gt'].shape == (3, 8, 8)
    with pytest.raises(DatasetError, match=rf"^RSPairedDataset: {root}: no key 'lost' in this LMDB, although its "
                                           r'meta_info.txt lists it; the database and its meta_info.txt do not match'):
        ds[1]
