"""``basicsr prepare``: a published UCMerced/AID archive or folder -> split lists, HR/LR PNGs and LMDBs; the
test-only sets RSSCN7 and WHU-RS19 (every image is a test image, for generalisation tests) -> the same layout
without ``Train``.

Output layout (what the option files and ``basicsr bench --test-set`` point at)::

    DIR/train.txt, DIR/test.txt        published file names, class-stratified seeded split (splits.py)
    DIR/Train/<stem>.png               HR training images (not for the test-only sets)
    DIR/Test_HR/<stem>.png             HR test images
    DIR/Test_LR_x{s}/<stem>.png        LR test images, one folder per scale
    DIR/Train.lmdb, DIR/Test_HR.lmdb, DIR/Test_LR_x{s}.lmdb   with --lmdb (basicsr.utils.lmdb_util layout)
    DIR/prepare.json                   the arguments and the summary

GT is cropped at the bottom/right to a multiple of every requested scale, never resized. Everything is
written into ``DIR``'s temporary name ``.DIR.partial-<pid>`` (:func:`hmoe_arch.atomic.atomic_path`) and renamed to
``DIR`` when complete, so an interrupted run leaves no ``DIR``. The run owns that folder: it holds ``DIR.lock`` (an
exclusive ``flock``, released when the process ends, also when it is killed) for its whole duration and writes its
PID and arguments into ``.DIR.partial-<pid>/.prepare-owner``. A second run on the same ``DIR`` refuses while the
first holds the lock; a later run removes a stale ``.DIR.partial-*`` folder only when that marker shows prepare
wrote it, and refuses to touch a folder of such a name that it did not write. Before the rename the counts of
written files are checked against the split lists. Re-running with the same arguments does nothing.

``--lmdb`` on a finished run made with the same arguments but without ``--lmdb`` adds the LMDBs from the PNGs
already in ``DIR`` (:func:`add_lmdbs`): the same records in the same order as a fresh ``--lmdb`` run writes, so
each LMDB's ``data.mdb`` and ``meta_info.txt`` are byte for byte those of a fresh run (``lock.mdb``, LMDB's lock
file, holds the writing process's state and differs between any two runs). They are built and checked in
``.DIR.partial-<pid>`` under the same lock and owner marker, moved into ``DIR``, and ``DIR/prepare.json`` is replaced
last (now recording ``lmdb: true``); an error or Ctrl-C before that takes back what was moved. A process killed
between the moves can leave some LMDBs beside the old ``prepare.json``; the next ``--lmdb`` run names them
instead of overwriting them. The PNGs and split lists are only read.

Inputs are bounded: an image file (or archive member, by its declared size) over :data:`MAX_IMAGE_BYTES`, or
an image whose header declares more than :data:`MAX_IMAGE_PIXELS` pixels, is refused before it is decoded.
Hidden and system files (``.DS_Store``, ``Thumbs.db``, ``desktop.ini``, ``__MACOSX/``, ``.git/``) are ignored, and so
are README and LICENSE files beside the class folders (RSSCN7 is published as a Git repository with a README).
"""
import hashlib
import json
import math
import os
import re
import shutil
import urllib.request
import zipfile
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import cv2
import numpy as np
from basicsr.utils import get_root_logger
from basicsr.utils.lmdb_util import LmdbMaker
from tqdm import tqdm

from ..atomic import atomic_path, move_into_place, partial_path, remove_partial, stale_partials
from ..checkpoints import file_digest
from ..data.degradations import DEGRADATIONS, crop_to_scale, downsample
from ..data.images import decode_rgb, to_unit_float
from ..data.splits import stratified_split
from ..errors import ImageError, PrepareError
from ..locking import exclusive_lock

MAX_IMAGE_BYTES = 256 * 2**20
"""Largest image file read (archive members by their declared uncompressed size)."""
SYSTEM_FILES = ('thumbs.db', 'desktop.ini', 'icon\r')
"""Files that file managers leave in folders (compared lower-cased); hidden files (``.*``) are skipped too."""
PNG_COMPRESSION = 1
"""PNG compression level of every written image (BasicSR's LMDB default); disk and LMDB hold the same bytes."""


@dataclass(frozen=True)
class DatasetSpec:
    """What a published dataset looks like."""

    title: str
    test_fraction: float
    roots: Tuple[str, ...]
    """Candidate image roots relative to the source (folder or archive), first match wins."""
    layout: str
    """The expected layout, for messages."""
    file_pattern: str
    """Regex of a file name in class folder ``{cls}`` (the folder name, lower-cased)."""
    url: Optional[str] = None
    md5: Optional[str] = None
    archive: Optional[str] = None
    test_only: bool = False
    """Every image goes to ``Test_HR``/``Test_LR_x{s}`` (a set for testing models trained on another)."""
    where: str = ''
    """Where to get the data, for messages when there is no direct download."""
    ignore_case: bool = False
    """File names compared case-insensitively (releases disagree on the case of class prefixes)."""

    def matches(self, class_dir: str, file_name: str) -> bool:
        pattern = self.file_pattern.format(cls=re.escape(class_dir.lower()), initial=re.escape(class_dir[:1]))
        return re.fullmatch(pattern, file_name, flags=re.IGNORECASE if self.ignore_case else 0) is not None


DATASETS: Dict[str, DatasetSpec] = {
    'ucmerced': DatasetSpec(
        title='UCMerced Land Use', test_fraction=0.25, roots=('UCMerced_LandUse/Images', 'Images', ''),
        layout='UCMerced_LandUse/Images/<class>/<class>NN.tif', file_pattern=r'{cls}\d{{2}}\.tif',
        url='http://weegee.vision.ucmerced.edu/datasets/UCMerced_LandUse.zip',
        md5='5b7ec56793786b6dc8a908e8854ac0e4', archive='UCMerced_LandUse.zip'),
    'aid': DatasetSpec(
        title='AID', test_fraction=0.2, roots=('AID', ''), layout='AID/<Class>/<class>_N.jpg',
        file_pattern=r'{cls}_\d+\.jpg'),
    'rsscn7': DatasetSpec(
        title='RSSCN7', test_fraction=1.0, roots=('RSSCN7', 'RSSCN7-master', 'RSSCN7-main', ''),
        layout='RSSCN7/<x><Class>/<x>NNN.jpg (e.g. aGrass/a001.jpg; 7 classes x 400 images of 400x400)',
        file_pattern=r'{initial}\d{{3}}\.jpg',
        test_only=True, where='https://github.com/palewithout/RSSCN7 (Zou et al., GRSL 2015)'),
    'whurs19': DatasetSpec(
        title='WHU-RS19', test_fraction=1.0, roots=('WHU-RS19', 'RSDataset', ''),
        layout='WHU-RS19/<Class>/<class>_NN.jpg (19 classes, about 50 images of 600x600 each)',
        file_pattern=r'{cls}_\d+\.jpg', test_only=True, ignore_case=True,
        where='https://captain-whu.github.io/BED4RS/ (WHU-RS19.zip)'),
}


@dataclass(frozen=True)
class SourceImage:
    class_name: str
    name: str
    member: str
    """Path relative to the source folder, or member name in the archive."""
    location: str
    """Where it is, for messages."""


class Source:
    """The images of a published folder or ``.zip`` archive, validated against the dataset's layout."""

    def __init__(self, spec: DatasetSpec, path: Path) -> None:
        self.spec = spec
        self.path = path
        self._zip: Optional[zipfile.ZipFile] = None
        if path.is_dir():
            files = [p.relative_to(path).as_posix() for p in sorted(path.rglob('*')) if p.is_file()]
        elif path.is_file() and zipfile.is_zipfile(path):
            self._zip = zipfile.ZipFile(path)
            files = sorted(info.filename for info in self._zip.infolist() if not info.is_dir())
            self._sizes = {info.filename: info.file_size for info in self._zip.infolist()}
        elif path.exists():
            raise PrepareError(f'{path}: expected the published .zip archive or its extracted folder '
                               f'({spec.layout})')
        else:
            raise PrepareError(f'{path}: no such file or folder (expected {spec.layout} or its .zip archive)')
        self.images = self._find_images([f for f in files if not is_system_file(f)])
        self._check_class_folders()

    def _check_class_folders(self) -> None:
        folders: Dict[str, str] = {}
        for image in self.images:
            other = folders.setdefault(image.class_name.lower(), image.class_name)
            if other != image.class_name:
                raise PrepareError(f'{self.path}: class folders {other!r} and {image.class_name!r} differ only in '
                                   'case (on a case-insensitive disk one would overwrite the other); merge them')
        stems: Dict[str, SourceImage] = {}
        for image in self.images:
            first = stems.setdefault(Path(image.name).stem.lower(), image)
            if first is not image:
                raise PrepareError(f'{first.location} and {image.location}: both would be written as '
                                   f'{Path(image.name).stem}.png (output names are the file stems); rename one')

    def _find_images(self, files: List[str]) -> List[SourceImage]:
        for root in self.spec.roots:
            prefix = f'{root}/' if root else ''
            inside = [f[len(prefix):] for f in files if f.startswith(prefix)]
            inside = [f for f in inside if not is_documentation(f)]
            if any(f.count('/') == 1 for f in inside):
                return [self._check(prefix, relative) for relative in inside]
        raise PrepareError(f'{self.path}: no class folders found; expected the layout {self.spec.layout}')

    def _check(self, prefix: str, relative: str) -> SourceImage:
        parts = relative.split('/')
        location = self._location(prefix + relative)
        if any(ord(c) < 32 or c == '\x7f' for c in relative):
            raise PrepareError(f'{location!r}: the name holds a control character (e.g. a newline), which the split '
                               'lists (one name per line) cannot hold; rename the file')
        if len(parts) != 2 or not self.spec.matches(parts[0], parts[1]):
            raise PrepareError(f'{location}: wrong folder layout; expected {self.spec.layout}')
        return SourceImage(class_name=parts[0], name=parts[1], member=prefix + relative, location=location)

    def _location(self, member: str) -> str:
        return str(self.path / member) if self._zip is None else f'{self.path}:{member}'

    def read(self, image: SourceImage) -> bytes:
        """The file's bytes; files (or archive members, by their declared size) over :data:`MAX_IMAGE_BYTES` are
        refused before they are read."""
        size = (self.path / image.member).stat().st_size if self._zip is None else self._sizes[image.member]
        if size > MAX_IMAGE_BYTES:
            raise PrepareError(f'{image.location}: {size} bytes, more than the {MAX_IMAGE_BYTES // 2**20} MiB an '
                               'image file may have here; not a dataset image')
        if self._zip is None:
            return (self.path / image.member).read_bytes()
        return self._zip.read(image.member)

    def close(self) -> None:
        if self._zip is not None:
            self._zip.close()


def is_documentation(relative: str) -> bool:
    """A README or LICENSE beside the class folders (a dataset's Git repository or its GitHub archive has one)."""
    return '/' not in relative and relative.lower().startswith(('readme', 'license', 'licence'))


def is_system_file(relative: str) -> bool:
    """Hidden files and folders, macOS archive metadata and Windows folder files."""
    parts = relative.split('/')
    return (any(part.startswith('.') or part == '__MACOSX' for part in parts)
            or parts[-1].lower() in SYSTEM_FILES)


def encode_png(img: np.ndarray) -> bytes:
    ok, buf = cv2.imencode('.png', img, [cv2.IMWRITE_PNG_COMPRESSION, PNG_COMPRESSION])
    if not ok:
        raise PrepareError(f'could not encode a {img.shape} image as PNG')
    return buf.tobytes()


def download_archive(spec: DatasetSpec, dest: Path, opener: Optional[Callable] = None) -> Path:
    """Fetch the official archive into ``dest`` (a folder or file path) and verify its MD5.

    An archive already there with the right checksum is reused. ``opener`` defaults to ``urlopen``.
    """
    opener = opener or urllib.request.urlopen
    if spec.url is None or spec.md5 is None:
        raise PrepareError(f'{spec.title} has no direct download URL with a published checksum; download the '
                           f'archive from {spec.where or "its official page"} and pass it with --source')
    target = dest / spec.archive if dest.is_dir() else dest
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.is_file() and file_digest(target, 'md5') == spec.md5:
        return target
    digest = hashlib.md5()
    with atomic_path(target) as partial:
        try:
            with opener(spec.url) as response, open(partial, 'wb') as f:
                while True:
                    chunk = response.read(1 << 20)
                    if not chunk:
                        break
                    digest.update(chunk)
                    f.write(chunk)
        except OSError as error:
            raise PrepareError(f'could not download {spec.url}: {error}') from error
        if digest.hexdigest() != spec.md5:
            raise PrepareError(f'{spec.url}: MD5 {digest.hexdigest()} does not match the published {spec.md5}; '
                               'the download was removed')
    return target


@dataclass
class PrepareSummary:
    """What ``prepare`` wrote (also stored in ``DIR/prepare.json``)."""

    train_per_class: Dict[str, int] = field(default_factory=dict)
    test_per_class: Dict[str, int] = field(default_factory=dict)
    cropped: Dict[str, str] = field(default_factory=dict)
    """name -> ``'HxW -> HxW'`` for GT not a multiple of every scale."""
    skipped: Dict[str, str] = field(default_factory=dict)
    """name -> reason, only with ``skip_bad``."""
    lmdb_added: List[str] = field(default_factory=list)
    """The LMDBs (``Train.lmdb``, ...) a later ``--lmdb`` run added from the PNGs already written."""

    def lines(self) -> Iterator[str]:
        train, test = sum(self.train_per_class.values()), sum(self.test_per_class.values())
        yield f'train {train} / test {test} images in {len(self.train_per_class)} classes'
        for name in sorted(set(self.train_per_class) | set(self.test_per_class)):
            yield f'  {name}: {self.train_per_class.get(name, 0)} train, {self.test_per_class.get(name, 0)} test'
        yield f'GT cropped to a multiple of the scales: {len(self.cropped)}'
        for name, change in self.cropped.items():
            yield f'  {name}: {change}'
        yield f'files skipped: {len(self.skipped) or "none"}'
        for name, reason in self.skipped.items():
            yield f'  {name}: {reason}'
        if self.lmdb_added:
            yield f'LMDBs added from the PNGs already there: {", ".join(self.lmdb_added)}'


class _Writers:
    """PNG files and, optionally, LMDBs of one output folder; every image goes to both as the same bytes."""

    def __init__(self, root: Path, folders: Sequence[str], lmdb: bool) -> None:
        self.root = root
        self.makers: Dict[str, LmdbMaker] = {}
        for folder in folders:
            (root / folder).mkdir(parents=True)
            if lmdb:
                self.makers[folder] = LmdbMaker(str(root / f'{folder}.lmdb'), compress_level=PNG_COMPRESSION)

    def put(self, folder: str, stem: str, img: np.ndarray) -> None:
        import lmdb
        data = encode_png(img)
        target = self.root / folder / f'{stem}.png'
        try:
            target.write_bytes(data)
            if folder in self.makers:
                self.makers[folder].put(data, stem, img.shape)
        except (OSError, lmdb.Error) as error:  # disk full, read-only or removed output
            raise PrepareError(f'{target}: cannot write it ({getattr(error, "strerror", None) or error}); nothing '
                               'of this run is kept') from error

    def close(self) -> None:
        import lmdb
        for folder, maker in self.makers.items():
            try:
                maker.close()
            except lmdb.Error as error:
                raise PrepareError(f'{self.root / folder}.lmdb: cannot finish it ({error}); nothing of this run is '
                                   'kept') from error


def _arguments(dataset: str, source: Path, scales: Sequence[int], seed: int, degradation: str, lmdb: bool,
               skip_bad: bool) -> Dict[str, object]:
    return {'dataset': dataset, 'source': str(source.resolve()), 'scales': sorted(set(scales)), 'seed': seed,
            'degradation': degradation, 'lmdb': lmdb, 'skip_bad': skip_bad}


def prepare(dataset: str, source: Optional[Path], out: Path, *, scales: Sequence[int] = (2, 4), seed: int = 0,
            degradation: str = 'bicubic', lmdb: bool = False, skip_bad: bool = False, download: bool = False,
            progress: bool = True) -> PrepareSummary:
    """Build the dataset folder ``out`` from ``source``; see the module docstring.

    With ``download``, the official archive is fetched into ``source`` (a folder or file path; default: the
    folder that will hold ``out``) unless a verified copy is already there.

    Raises:
        PrepareError: for a bad argument, source layout, input file or output folder.
    """
    logger = get_root_logger()
    if dataset not in DATASETS:
        raise PrepareError(f'unknown dataset {dataset!r}; expected one of {sorted(DATASETS)}')
    if not scales or any(s < 2 for s in scales):
        raise PrepareError(f'--scales must be integers >= 2, got {list(scales)}')
    if degradation not in DEGRADATIONS:
        raise PrepareError(f'--degradation must be one of {DEGRADATIONS}, got {degradation!r}')
    spec = DATASETS[dataset]
    if download:
        if source is None:
            out.parent.mkdir(parents=True, exist_ok=True)
        source = download_archive(spec, out.parent if source is None else source)
    elif source is None:
        raise PrepareError('--source is required (the published archive or its folder) unless --download is given')
    arguments = _arguments(dataset, source, scales, seed, degradation, lmdb, skip_bad)
    with exclusive_lock(out.with_name(out.name + '.lock'), remove_when_done=True, busy=lambda holder: PrepareError(
            f'{out}: another prepare run is writing it ({holder}); wait for it to finish')):
        recorded = _already_prepared(out, arguments)
        if recorded is not None and recorded['arguments'] == arguments:
            logger.info(f'{out}: already prepared with these arguments; nothing to do.')
            return PrepareSummary(**recorded['summary'])
        if recorded is not None:
            summary = add_lmdbs(out, recorded, arguments, spec.test_only, progress)
            logger.info(f'{spec.title} in {out}: LMDBs added from its PNGs (PNGs and split lists unchanged):\n'
                        + '\n'.join(summary.lines()))
            return summary
        src = Source(spec, source)
        try:
            names_by_class: Dict[str, List[str]] = {}
            by_name: Dict[str, SourceImage] = {}
            for image in src.images:
                names_by_class.setdefault(image.class_name, []).append(image.name)
                by_name[image.name] = image
            if spec.test_only:
                train, test = [], [n for c in sorted(names_by_class) for n in sorted(names_by_class[c])]
            else:
                train, test = stratified_split(names_by_class, spec.test_fraction, seed)
            _remove_stale_partials(out)
            with atomic_path(out, folder=True) as partial:
                _mark_owner(partial, arguments)
                summary = _write(src, by_name, train, test, partial, sorted(set(scales)), degradation, lmdb,
                                 skip_bad, progress, spec.test_only)
                _verify(partial, sorted(set(scales)), lmdb, spec.test_only)
                _write_record(partial, arguments, summary)
                (partial / OWNER_FILE).unlink()
        finally:
            src.close()
    logger.info(f'{spec.title} prepared in {out}:\n' + '\n'.join(summary.lines()))
    return summary


OWNER_FILE = '.prepare-owner'
"""Marker in ``.DIR.partial-<pid>``: the PID and arguments of the prepare run writing it."""


def _write_record(root: Path, arguments: Dict[str, object], summary: PrepareSummary) -> None:
    """``root/prepare.json`` (the arguments and the summary), replaced in one step."""
    with atomic_path(root / 'prepare.json') as partial:
        partial.write_text(json.dumps({'arguments': arguments, 'summary': asdict(summary)}, indent=2))


def _adds_only_lmdb(recorded: Dict[str, object], arguments: Dict[str, object]) -> bool:
    """Whether ``arguments`` are the recorded ones with ``lmdb`` turned on (LMDBs can be added to the PNGs)."""
    return bool(arguments['lmdb']) and recorded == {**arguments, 'lmdb': False}


def _already_prepared(out: Path, arguments: Dict[str, object]) -> Optional[Dict[str, object]]:
    """The record of a finished run with these arguments, or with these arguments but without ``lmdb`` (the caller
    adds the LMDBs); ``None`` when ``out`` does not exist; refuses others."""
    if not out.exists():
        return None
    stamp = out / 'prepare.json'
    if not stamp.is_file():
        raise PrepareError(f'{out}: exists and was not written by prepare; remove it or choose another --out')
    recorded = json.loads(stamp.read_text())
    if recorded['arguments'] != arguments and not _adds_only_lmdb(recorded['arguments'], arguments):
        changed = ', '.join(f'{k}: {recorded["arguments"].get(k)!r} there, {arguments[k]!r} now'
                            for k in arguments if recorded['arguments'].get(k) != arguments[k])
        raise PrepareError(f'{out}: already prepared with other arguments ({changed}); remove it or choose '
                           'another --out')
    return recorded


def _remove_stale_partials(out: Path) -> None:
    """Remove the temporary folders of ``out`` (:func:`hmoe_arch.atomic.stale_partials`) left by interrupted runs;
    the caller holds ``out``'s lock, so none is in use. Refuses to touch one without prepare's owner marker."""
    for stale in stale_partials(out):
        if not (stale / OWNER_FILE).is_file():
            raise PrepareError(f'{stale}: exists and was not written by prepare; remove or rename it, or choose '
                               'another --out')
        get_root_logger().info(f'removing {stale}, left by an interrupted run '
                               f'({(stale / OWNER_FILE).read_text().strip()})')
        shutil.rmtree(stale)


def _mark_owner(partial: Path, arguments: Dict[str, object]) -> None:
    """Write this run's owner marker (its PID and ``arguments``) into its temporary folder ``partial``."""
    (partial / OWNER_FILE).write_text(json.dumps({'pid': os.getpid(), 'arguments': arguments}))


def _split_stems(root: Path, scales: Sequence[int], test_only: bool) -> Dict[str, List[str]]:
    """Image folder -> the file stems its split list names, in the list's order: ``Train`` from ``train.txt``
    (not for test-only sets), ``Test_HR`` and each ``Test_LR_x{s}`` from ``test.txt``."""
    lists = ({} if test_only else {'Train': 'train.txt'}) | {'Test_HR': 'test.txt'}
    lists.update({f'Test_LR_x{s}': 'test.txt' for s in scales})
    stems = {}
    for folder, name in lists.items():
        if not (root / name).is_file():
            raise PrepareError(f'{root / name}: missing; prepare wrote it, so the folder was changed afterwards')
        stems[folder] = [Path(n).stem for n in (root / name).read_text().split('\n')[:-1]]
    return stems


def _verify(root: Path, scales: List[int], lmdb: bool, test_only: bool = False) -> None:
    """Every split-list entry has its PNG in each folder (and its LMDB record), and nothing else is there."""
    for folder, stems in _split_stems(root, scales, test_only).items():
        stems = sorted(stems)
        written = sorted(p.stem for p in (root / folder).glob('*.png'))
        if written != stems:
            raise PrepareError(f'{root / folder}: {len(written)} images written but the split list names '
                               f'{len(stems)}; the output was changed while prepare ran')
        if lmdb:
            meta = root / f'{folder}.lmdb' / 'meta_info.txt'
            records = sorted(line.split('.png')[0] for line in meta.read_text().splitlines() if line.strip())
            if records != stems:
                raise PrepareError(f'{meta}: {len(records)} records but the split list names {len(stems)}')


def add_lmdbs(out: Path, recorded: Dict[str, object], arguments: Dict[str, object], test_only: bool,
              progress: bool = True) -> PrepareSummary:
    """Add ``Train.lmdb``, ``Test_HR.lmdb`` and ``Test_LR_x{s}.lmdb`` to the finished PNG-only run in ``out``,
    whose ``prepare.json`` holds ``recorded``; ``arguments`` are the recorded ones with ``lmdb`` on.

    Each LMDB gets the PNG files of its folder as they are (bytes and ``(H, W, 3)`` shape), in the order of the
    split list, as :class:`_Writers` does in a fresh ``--lmdb`` run. The caller holds ``out``'s lock.

    Returns:
        The recorded summary with :attr:`PrepareSummary.lmdb_added` naming the new LMDBs.

    Raises:
        PrepareError: naming the file, for PNG folders that no longer match the split lists, an unreadable PNG,
            an LMDB already in ``out``, or a failed write or move (nothing of this run is kept then).
    """
    import lmdb

    expected = _split_stems(out, arguments['scales'], test_only)
    for folder, stems in expected.items():
        written = sorted(p.stem for p in (out / folder).glob('*.png'))
        if written != sorted(stems):
            raise PrepareError(f'{out / folder}: {len(written)} PNG images but the split list names {len(stems)}; '
                               'the folder was changed after prepare wrote it, so it cannot give the LMDB a fresh '
                               'run writes; prepare it again into another --out')
        if os.path.lexists(out / f'{folder}.lmdb'):
            raise PrepareError(f'{out / folder}.lmdb: exists though {out / "prepare.json"} records no LMDBs (a '
                               'killed --lmdb run may have left it); remove it and run again')
    _remove_stale_partials(out)
    partial = partial_path(out)
    partial.mkdir()
    moved: List[Path] = []
    try:
        _mark_owner(partial, arguments)
        for folder, stems in expected.items():
            target = partial / f'{folder}.lmdb'
            try:
                maker = LmdbMaker(str(target), compress_level=PNG_COMPRESSION)
                try:
                    for stem in tqdm(stems, desc=f'{folder}.lmdb', unit='image', disable=not progress):
                        path = out / folder / f'{stem}.png'
                        try:
                            data = path.read_bytes()
                        except OSError as error:
                            raise PrepareError(f'{path}: cannot read it ({error.strerror or error}); nothing of '
                                               'this run is kept') from error
                        try:
                            shape = decode_rgb(data, str(path)).shape
                        except ImageError as error:
                            raise PrepareError(f'{error}; prepare wrote an 8-bit RGB PNG there, so the folder was '
                                               'changed afterwards') from None
                        maker.put(data, stem, shape)
                finally:
                    maker.close()
            except (OSError, lmdb.Error) as error:  # disk full, read-only or removed output
                raise PrepareError(f'{target}: cannot write it ({getattr(error, "strerror", None) or error}); '
                                   'nothing of this run is kept') from error
        _verify_lmdbs(partial, expected)
        summary = PrepareSummary(**recorded['summary'])
        summary.lmdb_added = [f'{folder}.lmdb' for folder in expected]
        for name in summary.lmdb_added:
            try:
                move_into_place(partial / name, out / name)
            except OSError as error:
                raise PrepareError(f'{out / name}: cannot move it there from {partial} ({error.strerror or error}); '
                                   'nothing of this run is kept') from error
            moved.append(out / name)
        _write_record(out, arguments, summary)
    except BaseException:
        for path in moved:
            shutil.rmtree(path, ignore_errors=True)
        remove_partial(partial)
        raise
    shutil.rmtree(partial)
    return summary


def _verify_lmdbs(root: Path, expected: Dict[str, List[str]]) -> None:
    """Each ``root/<folder>.lmdb`` lists exactly the stems of ``expected[folder]``, in that order."""
    for folder, stems in expected.items():
        meta = root / f'{folder}.lmdb' / 'meta_info.txt'
        records = [line.split('.png')[0] for line in meta.read_text().splitlines() if line.strip()]
        if records != stems:
            raise PrepareError(f'{meta}: {len(records)} records but the split list names {len(stems)}; the PNG '
                               'folder was changed while prepare ran')


def _write(src: Source, by_name: Dict[str, SourceImage], train: List[str], test: List[str], root: Path,
           scales: List[int], degradation: str, lmdb: bool, skip_bad: bool, progress: bool,
           test_only: bool = False) -> PrepareSummary:
    multiple = math.lcm(*scales)
    lr_folders = [f'Test_LR_x{s}' for s in scales]
    writers = _Writers(root, ([] if test_only else ['Train']) + ['Test_HR'] + lr_folders, lmdb)
    summary = PrepareSummary()
    kept: Dict[str, List[str]] = {'train': [], 'test': []}
    try:
        jobs = [('train', n) for n in train] + [('test', n) for n in test]
        for split, name in tqdm(jobs, desc='prepare', unit='image', disable=not progress):
            image = by_name[name]
            try:
                img = decode_rgb(src.read(image), image.location)
                if img.shape[0] < multiple or img.shape[1] < multiple:
                    raise PrepareError(f'{image.location}: {img.shape[0]}x{img.shape[1]} is smaller than the '
                                       f'scale multiple {multiple}')
            except (PrepareError, ImageError) as error:
                if not skip_bad:
                    raise PrepareError(str(error)) from None
                summary.skipped[name] = str(error)
                continue
            cropped = crop_to_scale(img, multiple)
            if cropped.shape != img.shape:
                summary.cropped[name] = f'{img.shape[0]}x{img.shape[1]} -> {cropped.shape[0]}x{cropped.shape[1]}'
            stem = Path(name).stem
            kept[split].append(name)
            if split == 'train':
                writers.put('Train', stem, cropped)
                continue
            writers.put('Test_HR', stem, cropped)
            gt = to_unit_float(cropped)
            for scale, folder in zip(scales, lr_folders):
                lr = downsample(gt, scale, degradation, reference=True)
                writers.put(folder, stem, (lr * 255.0).round().astype(np.uint8))
    finally:
        writers.close()
    for split in ('test',) if test_only else ('train', 'test'):
        (root / f'{split}.txt').write_text(''.join(f'{n}\n' for n in kept[split]))
    summary.train_per_class = dict(sorted(Counter(by_name[n].class_name for n in kept['train']).items()))
    summary.test_per_class = dict(sorted(Counter(by_name[n].class_name for n in kept['test']).items()))
    return summary
