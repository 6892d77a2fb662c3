"""``basicsr prepare``: layout, split lists, cropping, LR, LMDB, atomicity, re-runs and bad inputs."""
import dataclasses
import hashlib
import io
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
import zipfile
from contextlib import contextmanager
from pathlib import Path

import cv2
import numpy as np
import pytest
from basicsr.utils.matlab_functions import imresize

from hmoe_arch.commands import prepare as prepare_module
from hmoe_arch.commands.prepare import DATASETS, DatasetSpec, download_archive, prepare
from hmoe_arch.data.degradations import downsample
from hmoe_arch.errors import PrepareError

from util import UCMERCED_CLASSES, make_aid_tree, make_ucmerced_tree, ucmerced_mini, write_image

SPLITS = Path(__file__).resolve().parents[1] / 'datasets' / 'splits'


def read_png(path: Path) -> np.ndarray:
    img = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    assert img is not None, path
    return img


def zip_folder(folder: Path, archive: Path) -> Path:
    with zipfile.ZipFile(archive, 'w') as zf:
        for path in sorted(folder.rglob('*')):
            if path.is_file():
                zf.write(path, path.relative_to(folder.parent).as_posix())
    return archive


@pytest.mark.slow
def test_real_ucmerced_subset(tmp_path: Path) -> None:
    out = tmp_path / 'UCMerced'
    summary = prepare('ucmerced', ucmerced_mini(), out, lmdb=True, progress=False)
    assert summary.train_per_class == {c: 7 for c in UCMERCED_CLASSES}
    assert summary.test_per_class == {c: 3 for c in UCMERCED_CLASSES}
    assert sorted(summary.cropped) == ['golfcourse04.tif', 'golfcourse05.tif', 'golfcourse06.tif', 'golfcourse07.tif',
                                       'parkinglot09.tif']
    assert summary.cropped['golfcourse04.tif'] == '251x256 -> 248x256'
    assert summary.skipped == {}
    train = (out / 'train.txt').read_text().splitlines()
    test = (out / 'test.txt').read_text().splitlines()
    assert len(train) == 147 and len(test) == 63 and not set(train) & set(test)
    assert sorted(p.name for p in (out / 'Train').iterdir()) == sorted(n.replace('.tif', '.png') for n in train)
    for name in test:
        stem = name[:-4]
        hr = read_png(out / 'Test_HR' / f'{stem}.png')
        assert hr.shape[0] % 4 == 0 and hr.shape[1] % 4 == 0
        original = cv2.imread(str(ucmerced_mini() / 'Images' / stem.rstrip('0123456789') / name))
        np.testing.assert_array_equal(hr, original[:hr.shape[0], :hr.shape[1]])
        for scale in (2, 4):
            lr = read_png(out / f'Test_LR_x{scale}' / f'{stem}.png')
            expected = np.clip(imresize(hr.astype(np.float32) / 255, 1 / scale), 0, 1)  # BasicSR's own, bit for bit
            np.testing.assert_array_equal(lr, (expected * 255).round().astype(np.uint8))
    meta = (out / 'Test_LR_x4.lmdb' / 'meta_info.txt').read_text().splitlines()
    assert len(meta) == 63 and meta[0].endswith(' 1') and '.png (' in meta[0]


@pytest.mark.slow
def test_synthetic_full_ucmerced_reproduces_the_committed_split(tmp_path: Path) -> None:
    source = make_ucmerced_tree(tmp_path / 'src', classes=UCMERCED_CLASSES, per_class=100, size=(8, 8))
    out = tmp_path / 'out'
    prepare('ucmerced', source, out, seed=0, progress=False)
    assert (out / 'train.txt').read_text() == (SPLITS / 'ucmerced_train.txt').read_text()
    assert (out / 'test.txt').read_text() == (SPLITS / 'ucmerced_test.txt').read_text()


def test_zip_and_folder_give_the_same_dataset(tmp_path: Path) -> None:
    source = make_ucmerced_tree(tmp_path / 'src', odd={'beach03.tif': (26, 24)})
    archive = zip_folder(source, tmp_path / 'UCMerced_LandUse.zip')
    a = prepare('ucmerced', source, tmp_path / 'a', scales=[2, 3], progress=False)
    b = prepare('ucmerced', archive, tmp_path / 'b', scales=[2, 3], progress=False)
    assert a == b and a.cropped == {'beach03.tif': '26x24 -> 24x24'}
    files_a = sorted(p.relative_to(tmp_path / 'a') for p in (tmp_path / 'a').rglob('*.png'))
    files_b = sorted(p.relative_to(tmp_path / 'b') for p in (tmp_path / 'b').rglob('*.png'))
    assert files_a == files_b and any('Test_LR_x3' in str(p) for p in files_a)
    for rel in files_a:
        assert (tmp_path / 'a' / rel).read_bytes() == (tmp_path / 'b' / rel).read_bytes()


def test_aid_layout_and_ratio(tmp_path: Path) -> None:
    source = make_aid_tree(tmp_path, per_class=10)
    summary = prepare('aid', source, tmp_path / 'AID_out', scales=[2], progress=False)
    assert summary.train_per_class == {'Airport': 8, 'BareLand': 8}
    assert summary.test_per_class == {'Airport': 2, 'BareLand': 2}
    out = tmp_path / 'AID_out'
    test = (out / 'test.txt').read_text().split()
    train = (out / 'train.txt').read_text().split()
    assert all(re.fullmatch(r'(airport|bareland)_\d+\.jpg', n) for n in train + test)
    assert sorted(p.name for p in (out / 'Test_LR_x2').iterdir()) == sorted(n.replace('.jpg', '.png') for n in test)
    assert sorted(p.name for p in (out / 'Train').iterdir()) == sorted(n.replace('.jpg', '.png') for n in train)


def test_rerun_with_same_arguments_is_a_no_op(tmp_path: Path) -> None:
    source = make_ucmerced_tree(tmp_path / 'src')
    out = tmp_path / 'out'
    first = prepare('ucmerced', source, out, progress=False)
    stamp = (out / 'prepare.json').stat().st_mtime_ns
    assert prepare('ucmerced', source, out, progress=False) == first
    assert (out / 'prepare.json').stat().st_mtime_ns == stamp
    with pytest.raises(PrepareError, match=r"already prepared with other arguments \(seed: 0 there, 3 now\)"):
        prepare('ucmerced', source, out, seed=3, progress=False)
    (tmp_path / 'other').mkdir()
    with pytest.raises(PrepareError, match='exists and was not written by prepare'):
        prepare('ucmerced', source, tmp_path / 'other', progress=False)


def partials(folder: Path) -> list:
    """Names of the temporary files and folders (``.<stem>.partial-<pid><suffix>``) in ``folder``."""
    return sorted(p.name for p in folder.iterdir() if '.partial-' in p.name) if folder.is_dir() else []


def files_under(root: Path, skip=('prepare.json',)) -> dict:
    """Relative path -> (bytes, mtime in ns) of every file under ``root``, but for ``skip`` and LMDB folders."""
    return {p.relative_to(root).as_posix(): (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(root.rglob('*'))
            if p.is_file() and p.name not in skip and not any(part.endswith('.lmdb') for part in p.parts)}


def lmdb_contents(root: Path) -> dict:
    """Relative path -> bytes of the data and the meta_info.txt of ``root``'s LMDBs (not ``lock.mdb``, LMDB's lock
    file, which holds the writing process's state: two fresh runs in two processes differ there)."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.glob('*.lmdb/*'))
            if p.name != 'lock.mdb'}


@pytest.mark.parametrize('dataset', ['ucmerced', 'rsscn7'])
def test_lmdb_on_a_finished_png_run_adds_the_lmdbs_a_fresh_run_writes(tmp_path: Path, basicsr_log,
                                                                     dataset: str) -> None:
    if dataset == 'ucmerced':
        source = make_ucmerced_tree(tmp_path / 'src', per_class=4, odd={'beach01.tif': (26, 24)})
        added = ['Train.lmdb', 'Test_HR.lmdb', 'Test_LR_x2.lmdb', 'Test_LR_x4.lmdb']
    else:
        source = make_rsscn7_tree(tmp_path / 'src')
        added = ['Test_HR.lmdb', 'Test_LR_x2.lmdb', 'Test_LR_x4.lmdb']
    out = tmp_path / 'out'
    first = prepare(dataset, source, out, progress=False)
    pngs_and_lists = files_under(out)
    summary = prepare(dataset, source, out, lmdb=True, progress=False)
    assert summary.lmdb_added == added and dataclasses.replace(summary, lmdb_added=[]) == first
    assert files_under(out) == pngs_and_lists  # neither rewritten nor touched (same bytes, same mtime)
    assert not partials(tmp_path) and not partials(out)
    assert f'LMDBs added from the PNGs already there: {", ".join(added)}' in basicsr_log[-1]
    assert 'PNGs and split lists unchanged' in basicsr_log[-1]

    fresh = prepare(dataset, source, tmp_path / 'fresh', lmdb=True, progress=False)
    assert fresh == first
    made, expected = lmdb_contents(out), lmdb_contents(tmp_path / 'fresh')
    assert sorted(made) == sorted(f'{name}/{file}' for name in added for file in ('data.mdb', 'meta_info.txt'))
    assert list(made) == list(expected) and all(made[name] == expected[name] for name in expected), \
        [name for name in expected if made.get(name) != expected[name]]
    recorded = json.loads((out / 'prepare.json').read_text())
    assert recorded['arguments'] == json.loads((tmp_path / 'fresh' / 'prepare.json').read_text())['arguments']
    assert recorded['arguments']['lmdb'] is True and recorded['summary']['lmdb_added'] == added
    assert prepare(dataset, source, out, lmdb=True, progress=False) == summary
    assert basicsr_log[-1].endswith('already prepared with these arguments; nothing to do.')


def test_adding_lmdbs_keeps_nothing_when_interrupted_and_refuses_folders_it_cannot_trust(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source = make_ucmerced_tree(tmp_path / 'src', per_class=4)
    out = tmp_path / 'out'
    prepare('ucmerced', source, out, scales=[2], progress=False)
    before = files_under(out, skip=())

    def untouched() -> None:
        assert files_under(out, skip=()) == before and not list(out.glob('*.lmdb'))
        assert not partials(tmp_path) and not partials(out)

    moves, move = [], prepare_module.move_into_place

    def interrupted_move(partial: Path, target: Path):
        if partial.suffix == '.lmdb':
            moves.append(partial.name)
            if len(moves) == 2:
                raise KeyboardInterrupt
        return move(partial, target)

    monkeypatch.setattr(prepare_module, 'move_into_place', interrupted_move)
    with pytest.raises(KeyboardInterrupt):
        prepare('ucmerced', source, out, scales=[2], lmdb=True, progress=False)
    monkeypatch.undo()
    assert moves == ['Train.lmdb', 'Test_HR.lmdb']
    untouched()

    import lmdb as lmdb_module

    def full(self, *args, **kwargs):
        raise lmdb_module.DiskError('mdb_put: MDB_DISK_FULL')

    monkeypatch.setattr(prepare_module.LmdbMaker, 'put', full)
    with pytest.raises(PrepareError, match=r'\.out\.partial-\d+/Train\.lmdb: cannot write it '
                                           r'\(mdb_put: MDB_DISK_FULL\); nothing of this run is kept'):
        prepare('ucmerced', source, out, scales=[2], lmdb=True, progress=False)
    monkeypatch.undo()
    untouched()

    with pytest.raises(PrepareError, match=r"other arguments \(seed: 0 there, 3 now, lmdb: False there, True now\)"):
        prepare('ucmerced', source, out, scales=[2], seed=3, lmdb=True, progress=False)
    untouched()

    lr = out / 'Test_LR_x2' / f'{Path((out / "test.txt").read_text().split()[0]).stem}.png'
    data = lr.read_bytes()
    lr.unlink()
    with pytest.raises(PrepareError, match=r'out/Test_LR_x2: 2 PNG images but the split list names 3; the folder was '
                                           r'changed after prepare wrote it'):
        prepare('ucmerced', source, out, scales=[2], lmdb=True, progress=False)
    lr.write_bytes(b'not a png')
    with pytest.raises(PrepareError, match=r'Test_LR_x2/\w+\.png: cannot be decoded as an image; expected an 8-bit RGB '
                                           r'image; prepare wrote an 8-bit RGB PNG there'):
        prepare('ucmerced', source, out, scales=[2], lmdb=True, progress=False)
    lr.write_bytes(data)
    (out / 'Test_HR.lmdb').mkdir()
    with pytest.raises(PrepareError, match=r'out/Test_HR\.lmdb: exists though .*out/prepare\.json records no LMDBs'):
        prepare('ucmerced', source, out, scales=[2], lmdb=True, progress=False)
    (out / 'Test_HR.lmdb').rmdir()
    assert not list(out.glob('*.lmdb')) and not partials(tmp_path)
    assert (out / 'prepare.json').read_bytes() == before['prepare.json'][0]

    summary = prepare('ucmerced', source, out, scales=[2], lmdb=True, progress=False)
    assert summary.lmdb_added == ['Train.lmdb', 'Test_HR.lmdb', 'Test_LR_x2.lmdb']
    assert sorted(p.name for p in out.glob('*.lmdb')) == ['Test_HR.lmdb', 'Test_LR_x2.lmdb', 'Train.lmdb']


def test_interrupted_run_leaves_nothing_that_loads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from hmoe_arch.data import RSPairedDataset
    source = make_ucmerced_tree(tmp_path / 'src')
    out = tmp_path / 'out'
    calls = []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return downsample(*args, **kwargs)

    monkeypatch.setattr(prepare_module, 'downsample', interrupted)
    with pytest.raises(KeyboardInterrupt):
        prepare('ucmerced', source, out, lmdb=True, progress=False)
    assert not out.exists() and not partials(tmp_path)
    with pytest.raises(FileNotFoundError):
        RSPairedDataset({'phase': 'val', 'scale': 4, 'dataroot_gt': str(out / 'Test_HR'),
                         'dataroot_lq': str(out / 'Test_LR_x4')})
    monkeypatch.undo()
    prepare('ucmerced', source, out, lmdb=True, progress=False)
    assert (out / 'prepare.json').is_file()


@pytest.mark.slow
def test_killed_run_leaves_nothing_at_the_output_and_the_next_run_recovers(tmp_path: Path) -> None:
    source = make_ucmerced_tree(tmp_path / 'src')
    out, marker = tmp_path / 'out', tmp_path / 'started'
    code = '\n'.join([
        'import sys, time',
        'from pathlib import Path',
        'import hmoe_arch.commands.prepare as p',
        'put = p._Writers.put',
        'def slow(self, *args):',
        f'    Path({str(marker)!r}).touch()',
        '    time.sleep(0.2)',
        '    return put(self, *args)',
        'p._Writers.put = slow',
        f'p.prepare("ucmerced", Path({str(source)!r}), Path({str(out)!r}), lmdb=True, progress=False)',
    ])
    proc = subprocess.Popen([sys.executable, '-c', code])
    try:
        deadline = time.time() + 120
        while not marker.exists() and time.time() < deadline and proc.poll() is None:
            time.sleep(0.05)
        assert marker.exists(), 'the child process never started writing'
        time.sleep(0.3)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert not out.exists()
    assert partials(tmp_path) == [f'.out.partial-{proc.pid}']
    prepare('ucmerced', source, out, lmdb=True, progress=False)
    assert not partials(tmp_path) and (out / 'prepare.json').is_file()


@pytest.mark.parametrize('make_bad, message', [
    (lambda p: p.write_bytes(b''), r'beach02.tif: empty file \(0 bytes\)'),
    (lambda p: p.write_bytes(b'II*\x00garbage'), r'beach02.tif: cannot be decoded as an image'),
    (lambda p: write_image(p, 24, 24, 0, channels=1), r'beach02.tif: grayscale image; expected an 8-bit RGB'),
    (lambda p: write_image(p, 24, 24, 0, channels=4), r'beach02.tif: RGBA image; expected an 8-bit RGB'),
    (lambda p: write_image(p, 24, 24, 0, dtype=np.uint16), r'beach02.tif: uint16 samples \(16-bit\); expected'),
])
def test_bad_inputs_are_named_and_nothing_is_written(tmp_path: Path, make_bad, message: str) -> None:
    source = make_ucmerced_tree(tmp_path / 'src')
    bad = source / 'Images' / 'beach' / 'beach02.tif'
    bad.unlink()
    make_bad(bad)
    with pytest.raises(PrepareError, match=message):
        prepare('ucmerced', source, tmp_path / 'out', progress=False)
    assert not (tmp_path / 'out').exists() and not partials(tmp_path)
    assert not (tmp_path / 'out.lock').exists()  # a failed run leaves nothing beside the output either
    summary = prepare('ucmerced', source, tmp_path / 'out', skip_bad=True, progress=False)
    assert list(summary.skipped) == ['beach02.tif'] and re.search(message, summary.skipped['beach02.tif'])
    listed = (tmp_path / 'out' / 'train.txt').read_text() + (tmp_path / 'out' / 'test.txt').read_text()
    assert 'beach02.tif' not in listed


@pytest.mark.parametrize('move, message', [
    (('beach/beach02.tif', 'beach/sand02.tif'), r'sand02.tif: wrong folder layout; expected UCMerced_LandUse/Images'),
    (('beach/beach02.tif', 'beach02.tif'), r'beach02.tif: wrong folder layout'),
    (('beach/beach02.tif', 'beach/beach02.png'), r'beach02.png: wrong folder layout'),
])
def test_wrong_layout_is_named(tmp_path: Path, move, message: str) -> None:
    source = make_ucmerced_tree(tmp_path / 'src')
    images = source / 'Images'
    (images / move[0]).rename(images / move[1])
    with pytest.raises(PrepareError, match=message):
        prepare('ucmerced', source, tmp_path / 'out', progress=False)


def test_missing_or_foreign_source(tmp_path: Path) -> None:
    with pytest.raises(PrepareError, match='no such file or folder'):
        prepare('ucmerced', tmp_path / 'nothing', tmp_path / 'out', progress=False)
    (tmp_path / 'empty').mkdir()
    with pytest.raises(PrepareError, match='no class folders found; expected the layout UCMerced_LandUse'):
        prepare('ucmerced', tmp_path / 'empty', tmp_path / 'out', progress=False)
    (tmp_path / 'file.rar').write_bytes(b'Rar!')
    with pytest.raises(PrepareError, match=r'file.rar: expected the published .zip archive'):
        prepare('aid', tmp_path / 'file.rar', tmp_path / 'out', progress=False)
    aid = make_aid_tree(tmp_path / 'aid_src')
    with pytest.raises(PrepareError, match='wrong folder layout; expected UCMerced_LandUse'):
        prepare('ucmerced', aid, tmp_path / 'out', progress=False)


@contextmanager
def fake_response(data: bytes):
    yield io.BytesIO(data)


def make_rsscn7_tree(root: Path, per_class: int = 3) -> Path:
    """``root/RSSCN7/<x><Class>/<x>NNN.jpg`` for three of the seven published classes."""
    for c, folder in enumerate(('aGrass', 'bField', 'gParking')):
        for i in range(1, per_class + 1):
            write_image(root / 'RSSCN7' / folder / f'{folder[0]}{i:03d}.jpg', 20, 20, seed=c * 10 + i)
    return root / 'RSSCN7'


@pytest.mark.parametrize('lmdb', [False, True])
def test_rsscn7_is_a_test_only_set(tmp_path: Path, lmdb: bool) -> None:
    source = make_rsscn7_tree(tmp_path)
    summary = prepare('rsscn7', source, tmp_path / 'out', scales=[2, 4], lmdb=lmdb, progress=False)
    assert summary.train_per_class == {} and summary.test_per_class == {'aGrass': 3, 'bField': 3, 'gParking': 3}
    out = tmp_path / 'out'
    names = ['a001.jpg', 'a002.jpg', 'a003.jpg', 'b001.jpg', 'b002.jpg', 'b003.jpg', 'g001.jpg', 'g002.jpg',
             'g003.jpg']
    assert (out / 'test.txt').read_text().split() == names
    assert not (out / 'train.txt').exists() and not (out / 'Train').exists()
    assert sorted(p.name for p in out.iterdir() if not p.name.endswith('.lmdb')) == [
        'Test_HR', 'Test_LR_x2', 'Test_LR_x4', 'prepare.json', 'test.txt']
    assert (lmdb and sorted(p.name for p in out.glob('*.lmdb'))) == (lmdb and [
        'Test_HR.lmdb', 'Test_LR_x2.lmdb', 'Test_LR_x4.lmdb'])
    gt = cv2.imread(str(out / 'Test_HR' / 'b002.png'))
    assert gt.shape == (20, 20, 3)  # 20 is a multiple of 4: nothing cropped
    expected = (downsample(gt[..., ::-1].astype(np.float32) / 255, 4, 'bicubic', reference=True) * 255).round()
    expected = expected.astype(np.uint8)
    assert np.array_equal(cv2.imread(str(out / 'Test_LR_x4' / 'b002.png'))[..., ::-1], expected)


def test_rsscn7_as_published_on_github(tmp_path: Path) -> None:
    """The repository's own layout (README.md beside the class folders, .git) and GitHub's archive of it."""
    clone = tmp_path / 'RSSCN7-master'
    make_rsscn7_tree(tmp_path / 'tree', per_class=2)
    (tmp_path / 'tree' / 'RSSCN7').rename(clone)
    (clone / 'README.md').write_text('# RSSCN7\n')
    (clone / '.git').mkdir()
    (clone / '.git' / 'HEAD').write_text('ref: refs/heads/master\n')
    from_clone = prepare('rsscn7', clone, tmp_path / 'a', scales=[2], progress=False)
    archive = tmp_path / 'RSSCN7-master.zip'
    with zipfile.ZipFile(archive, 'w') as zf:
        for path in sorted(clone.rglob('*')):
            if path.is_file() and '.git' not in path.parts:
                zf.write(path, path.relative_to(tmp_path).as_posix())
    from_archive = prepare('rsscn7', archive, tmp_path / 'b', scales=[2], progress=False)
    assert from_clone.test_per_class == from_archive.test_per_class == {'aGrass': 2, 'bField': 2, 'gParking': 2}
    assert (tmp_path / 'a' / 'test.txt').read_text() == (tmp_path / 'b' / 'test.txt').read_text()
    (clone / 'notes.txt').write_text('x')
    with pytest.raises(PrepareError, match='notes.txt: wrong folder layout'):
        prepare('rsscn7', clone, tmp_path / 'c', scales=[2], progress=False)


def test_whurs19_names_in_either_case_and_duplicate_stems_are_refused(tmp_path: Path) -> None:
    root = tmp_path / 'WHU-RS19'
    for c, (folder, stem) in enumerate([('Airport', 'airport'), ('footballField', 'footballField'),
                                        ('railwayStation', 'RailwayStation')]):
        for i in range(1, 3):
            write_image(root / folder / f'{stem}_{i:02d}.jpg', 24, 24, seed=c * 10 + i)
    summary = prepare('whurs19', root, tmp_path / 'out', scales=[4], progress=False)
    assert summary.test_per_class == {'Airport': 2, 'footballField': 2, 'railwayStation': 2}
    assert sorted(p.name for p in (tmp_path / 'out' / 'Test_LR_x4').iterdir())[:3] == [
        'RailwayStation_01.png', 'RailwayStation_02.png', 'airport_01.png']
    write_image(root / 'Airport' / 'Airport_01.jpg', 24, 24, seed=99)
    with pytest.raises(PrepareError, match=r'Airport/Airport_01.jpg and .*Airport/airport_01.jpg: both would be '
                                           r'written as airport_01.png \(output names are the file stems\); rename'):
        prepare('whurs19', root, tmp_path / 'out2', scales=[4], progress=False)
    assert not (tmp_path / 'out2').exists()


@pytest.mark.parametrize('dataset, where', [('rsscn7', 'github.com/palewithout/RSSCN7'),
                                            ('whurs19', 'captain-whu.github.io/BED4RS')])
def test_test_only_sets_say_where_to_get_them(tmp_path: Path, dataset: str, where: str) -> None:
    with pytest.raises(PrepareError, match=f'no direct download URL with a published checksum; download the archive '
                                           f'from https://{re.escape(where)}'):
        prepare(dataset, None, tmp_path / 'out', download=True, progress=False)
    write_image(tmp_path / 'src' / 'RSSCN7' / 'aGrass' / 'grass1.jpg', 8, 8, seed=0)
    if dataset == 'rsscn7':
        with pytest.raises(PrepareError, match=r'grass1.jpg: wrong folder layout; expected RSSCN7/<x><Class>/<x>NNN'):
            prepare(dataset, tmp_path / 'src', tmp_path / 'out', progress=False)


def test_download_verifies_the_checksum(tmp_path: Path) -> None:
    payload = b'archive bytes'
    spec = DatasetSpec(title='X', test_fraction=0.25, roots=('',), layout='x', file_pattern='x', url='http://x/a.zip',
                       md5=hashlib.md5(payload).hexdigest(), archive='a.zip')
    path = download_archive(spec, tmp_path, opener=lambda url: fake_response(payload))
    assert path == tmp_path / 'a.zip' and path.read_bytes() == payload
    assert download_archive(spec, tmp_path, opener=lambda url: pytest.fail('reused file must not download')) == path
    path.unlink()
    with pytest.raises(PrepareError, match=r'MD5 .* does not match the published'):
        download_archive(spec, tmp_path, opener=lambda url: fake_response(b'tampered'))
    assert list(tmp_path.iterdir()) == []

    @contextmanager
    def cut_off(url: str):
        chunks = iter([b'archive', OSError('Connection reset by peer')])

        class Response:
            def read(self, size: int) -> bytes:
                chunk = next(chunks)
                if isinstance(chunk, Exception):
                    raise chunk
                return chunk

        yield Response()

    with pytest.raises(PrepareError, match=r'could not download http://x/a.zip: Connection reset by peer'):
        download_archive(spec, tmp_path, opener=cut_off)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(PrepareError, match='AID has no direct download URL'):
        download_archive(DATASETS['aid'], tmp_path)
    assert DATASETS['ucmerced'].url.endswith('UCMerced_LandUse.zip')


def test_download_without_source_saves_next_to_the_output(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source = make_ucmerced_tree(tmp_path / 'src', per_class=4)
    archive = zip_folder(source, tmp_path / 'built.zip')
    payload = archive.read_bytes()
    monkeypatch.setitem(DATASETS, 'ucmerced', dataclasses.replace(DATASETS['ucmerced'],
                                                                  md5=hashlib.md5(payload).hexdigest()))
    monkeypatch.setattr(urllib.request, 'urlopen', lambda url: fake_response(payload))
    out = tmp_path / 'datasets' / 'UCMerced'
    summary = prepare('ucmerced', None, out, download=True, progress=False)
    assert (tmp_path / 'datasets' / 'UCMerced_LandUse.zip').read_bytes() == payload
    assert sum(summary.train_per_class.values()) == 9
    with pytest.raises(PrepareError, match='--source is required'):
        prepare('ucmerced', None, tmp_path / 'other', progress=False)


@pytest.mark.slow
def test_cli_exit_codes_and_summary(tmp_path: Path) -> None:
    source = make_ucmerced_tree(tmp_path / 'src', per_class=4)
    env = {**os.environ}
    ok = subprocess.run([sys.executable, '-m', 'hmoe_arch', 'prepare', 'ucmerced', '--source', str(source),
                         '--out', str(tmp_path / 'out'), '--scales', '2', '--no-progress'], capture_output=True,
                        text=True, env=env, timeout=300)
    assert ok.returncode == 0, ok.stderr
    assert 'train 9 / test 3 images in 3 classes' in ok.stderr and 'files skipped: none' in ok.stderr
    again = subprocess.run([sys.executable, '-m', 'hmoe_arch', 'prepare', 'ucmerced', '--source', str(source),
                            '--out', str(tmp_path / 'out'), '--scales', '2', '--no-progress'], capture_output=True,
                           text=True, env=env, timeout=300)
    assert again.returncode == 0 and 'nothing to do' in again.stderr
    lmdb = subprocess.run([sys.executable, '-m', 'hmoe_arch', 'prepare', 'ucmerced', '--source', str(source),
                           '--out', str(tmp_path / 'out'), '--scales', '2', '--no-progress', '--lmdb'],
                          capture_output=True, text=True, env=env, timeout=300)
    assert lmdb.returncode == 0, lmdb.stderr
    assert 'LMDBs added from its PNGs (PNGs and split lists unchanged)' in lmdb.stderr
    assert 'LMDBs added from the PNGs already there: Train.lmdb, Test_HR.lmdb, Test_LR_x2.lmdb' in lmdb.stderr
    bad = subprocess.run([sys.executable, '-m', 'hmoe_arch', 'prepare', 'ucmerced', '--source',
                          str(tmp_path / 'missing'), '--out', str(tmp_path / 'o2')], capture_output=True, text=True,
                         env=env, timeout=300)
    assert bad.returncode == 2 and 'missing: no such file or folder' in bad.stderr


# ------------------------------------------------------------------------------------------------------
# bounded inputs, system files, names
def png_header(width: int, height: int) -> bytes:
    """A PNG whose header declares ``width x height`` 8-bit RGB pixels (no image data follows)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack('>I', len(data)) + kind + data + struct.pack('>I', zlib.crc32(kind + data))

    ihdr = struct.pack('>IIBBBBB', width, height, 8, 2, 0, 0, 0)
    return b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', ihdr) + chunk(b'IDAT', zlib.compress(b'\0' * 16)) + chunk(b'IEND', b'')


def test_pixel_bomb_is_refused_from_its_header() -> None:
    from hmoe_arch.data.images import decode_rgb
    from hmoe_arch.errors import ImageError
    with pytest.raises(ImageError, match=r'^bomb.png: 15000x15000 pixels, more than the 89478485 an image may have'):
        decode_rgb(png_header(15000, 15000), 'bomb.png')


def test_archive_member_declaring_a_huge_size_is_refused_before_it_is_read(tmp_path: Path, monkeypatch) -> None:
    archive = zip_folder(make_ucmerced_tree(tmp_path / 'src', per_class=4), tmp_path / 'UCMerced_LandUse.zip')
    monkeypatch.setattr(prepare_module, 'MAX_IMAGE_BYTES', 100)
    read = []
    monkeypatch.setattr(zipfile.ZipFile, 'read', lambda self, name, pwd=None: read.append(name))
    with pytest.raises(PrepareError, match=r'UCMerced_LandUse.zip:UCMerced_LandUse/Images/agricultural/agricultural'
                                           r'\d\d.tif: \d+ bytes, more than the 0 MiB'):
        prepare('ucmerced', archive, tmp_path / 'out', progress=False)
    assert read == [] and not (tmp_path / 'out').exists() and not partials(tmp_path)


def test_hidden_and_system_files_are_ignored(tmp_path: Path) -> None:
    source = make_ucmerced_tree(tmp_path / 'src', per_class=4)
    for junk in ('Images/.DS_Store', 'Images/beach/.DS_Store', 'Images/beach/Thumbs.db', 'Images/beach/desktop.ini',
                 'Images/beach/._beach00.tif', '__MACOSX/Images/beach/._beach01.tif'):
        (source / junk).parent.mkdir(parents=True, exist_ok=True)
        (source / junk).write_bytes(b'\0\1junk')
    clean = prepare('ucmerced', make_ucmerced_tree(tmp_path / 'clean', per_class=4), tmp_path / 'a', progress=False)
    summary = prepare('ucmerced', source, tmp_path / 'b', progress=False)
    assert summary.train_per_class == clean.train_per_class and not summary.skipped
    assert (tmp_path / 'a' / 'train.txt').read_text() == (tmp_path / 'b' / 'train.txt').read_text()


def test_class_folders_differing_only_in_case_are_refused(tmp_path: Path) -> None:
    source = make_ucmerced_tree(tmp_path / 'src', per_class=4)
    write_image(source / 'Images' / 'Beach' / 'beach07.tif', 24, 24, 7)
    with pytest.raises(PrepareError, match=r"class folders 'Beach' and 'beach' differ only in case|class folders "
                                           r"'beach' and 'Beach' differ only in case"):
        prepare('ucmerced', source, tmp_path / 'out', progress=False)


def test_control_characters_in_names_are_refused(tmp_path: Path) -> None:
    source = make_ucmerced_tree(tmp_path / 'src', per_class=4)
    write_image(source / 'Images' / 'bea\nch' / 'bea\nch00.tif', 24, 24, 7)
    with pytest.raises(PrepareError, match='holds a control character'):
        prepare('ucmerced', source, tmp_path / 'out', skip_bad=True, progress=False)
    assert not (tmp_path / 'out').exists()


# ------------------------------------------------------------------------------------------------------
# the output folder is owned by one run
def test_a_second_run_on_the_same_output_is_refused_while_the_first_holds_it(tmp_path: Path) -> None:
    import fcntl
    source = make_ucmerced_tree(tmp_path / 'src', per_class=4)
    out = tmp_path / 'out'
    with open(tmp_path / 'out.lock', 'w') as held:
        held.write('pid 12345')
        held.flush()
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(PrepareError, match=r'out: another prepare run is writing it \(pid 12345\)'):
            prepare('ucmerced', source, out, progress=False)
        assert (tmp_path / 'out.lock').read_text() == 'pid 12345'  # the holder's file is left alone
    assert not out.exists()
    prepare('ucmerced', source, out, progress=False)
    assert out.is_dir() and not (tmp_path / 'out.lock').exists()


def test_a_folder_named_like_the_partial_output_is_never_deleted(tmp_path: Path) -> None:
    source = make_ucmerced_tree(tmp_path / 'src', per_class=4)
    mine = tmp_path / '.out.partial-999999999'
    (mine / 'notes.txt').parent.mkdir()
    (mine / 'notes.txt').write_text('my work')
    with pytest.raises(PrepareError, match=r'\.out\.partial-999999999: exists and was not written by prepare'):
        prepare('ucmerced', source, tmp_path / 'out', progress=False)
    assert (mine / 'notes.txt').read_text() == 'my work'


def test_counts_are_verified_before_the_rename(tmp_path: Path, monkeypatch) -> None:
    source = make_ucmerced_tree(tmp_path / 'src', per_class=4)
    write = prepare_module._write

    def write_then_lose_one(*args, **kwargs):
        summary = write(*args, **kwargs)
        next((args[4] / 'Test_HR').glob('*.png')).unlink()  # as if another process removed it
        return summary

    monkeypatch.setattr(prepare_module, '_write', write_then_lose_one)
    with pytest.raises(PrepareError, match=r'Test_HR: 2 images written but the split list names 3'):
        prepare('ucmerced', source, tmp_path / 'out', progress=False)
    assert not (tmp_path / 'out').exists() and not partials(tmp_path)


@pytest.mark.parametrize('lmdb', [False, True])
def test_disk_full_is_one_named_error_and_nothing_is_kept(tmp_path: Path, monkeypatch, lmdb: bool) -> None:
    import errno

    import lmdb as lmdb_module
    source = make_ucmerced_tree(tmp_path / 'src', per_class=4)
    if lmdb:
        def full(self, *args, **kwargs):
            raise lmdb_module.DiskError('mdb_put: MDB_DISK_FULL')
        monkeypatch.setattr(prepare_module.LmdbMaker, 'put', full)
    else:
        def full(self, data):
            raise OSError(errno.ENOSPC, 'No space left on device')
        monkeypatch.setattr(Path, 'write_bytes', full)
    with pytest.raises(PrepareError, match=r'\.png: cannot write it \((No space left on device|mdb_put: MDB_DISK_FULL)'
                                           r'\); nothing of this run is kept'):
        prepare('ucmerced', source, tmp_path / 'out', lmdb=lmdb, progress=False)
    assert not (tmp_path / 'out').exists() and not partials(tmp_path)
