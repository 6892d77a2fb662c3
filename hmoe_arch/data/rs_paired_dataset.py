"""RSPairedDataset: remote-sensing SR pairs for BasicSR option files (UCMerced, AID, any HR folder or LMDB).

Two modes, chosen by whether ``dataroot_lq`` is given:

- LR made on the fly (no ``dataroot_lq``): HR from a folder or LMDB (optionally restricted to a split list),
  LR = ``downsample(GT, scale, degradation)`` (MATLAB bicubic by default, or bilinear; 8-bit rounded);
- pre-made pairs (``dataroot_lq``): LR and GT matched by file stem, as ``basicsr prepare`` writes them.

In both, GT whose size is not a multiple of the scale is cropped at the bottom/right (never resized). In the
``train`` phase a random ``gt_size`` patch is cut at an LR-aligned position and flipped/rotated together
with its LR; other phases return full images. Items are BasicSR's dict ``lq``, ``gt`` (RGB float tensors
``(C, H, W)`` in [0, 1], optionally normalised by ``mean``/``std``), ``lq_path``, ``gt_path``.

With ``cache: true`` every selected image is decoded once, at construction, and kept as 8-bit BGR in memory
(height x width x 3 bytes each; the log states the total). Data loader workers forked from the process share it.
A training patch is cut from the 8-bit image before it becomes float, so the items are the same with and without
the cache; only the decoding is saved (2 ms and more per UCMerced image, ``docs/performance.md``).
"""
import os
import re
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
from basicsr.data.transforms import augment, paired_random_crop
from basicsr.utils import FileClient, get_root_logger, img2tensor
from basicsr.utils.registry import DATASET_REGISTRY
from PIL import Image
from torch.utils import data
from torchvision.transforms.functional import normalize

from ..errors import DatasetError, DatasetNotFoundError, ImageError
from ..options import is_strict_int, is_strict_number
from .degradations import DEGRADATIONS, crop_to_scale, downsample
from .images import decode_rgb, to_unit_float

IMAGE_SUFFIXES = ('.png', '.jpg', '.jpeg', '.tif', '.tiff', '.bmp')
META_LINE = re.compile(r'(\S+) \((\d+),\s*(\d+),\s*\d+\)(?: \d+)?')
"""A line of an LMDB's ``meta_info.txt`` (basicsr.utils.lmdb_util): ``name (h,w,c) compress_level``."""

DATASET_KEYS = {'type', 'name', 'phase', 'scale', 'dataroot_gt', 'dataroot_lq', 'io_backend', 'split_file',
                'degradation', 'gt_size', 'use_hflip', 'use_rot', 'mean', 'std', 'cache'}
"""The keys this dataset reads."""

LOADER_KEYS = {'num_worker_per_gpu', 'batch_size_per_gpu', 'dataset_enlarge_ratio', 'prefetch_mode', 'use_shuffle',
               'pin_memory', 'num_prefetch_queue', 'persistent_workers'}
"""Keys of BasicSR's data loader that live in the same option block."""


def available_memory() -> Optional[int]:
    """Bytes of memory the system can give without swapping (Linux's ``MemAvailable``), or None where it does not
    say."""
    try:
        with open('/proc/meminfo') as f:
            for line in f:
                if line.startswith('MemAvailable:'):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _fail(key: str, message: str) -> None:
    raise DatasetError(f'RSPairedDataset: `{key}` {message}')


@DATASET_REGISTRY.register()
class RSPairedDataset(data.Dataset):
    """Paired LR/GT dataset for UCMerced/AID; ``opt`` is the dataset block of a BasicSR option file.

    Keys: ``dataroot_gt`` (folder or ``.lmdb``), ``dataroot_lq`` (optional: pre-made LR of the same stems),
    ``io_backend: {type: disk | lmdb}``, ``scale``, ``split_file`` (optional list of file names; a name's
    stem selects the image), ``degradation`` (``bicubic`` | ``bilinear``, on-the-fly LR only), ``gt_size``,
    ``use_hflip``, ``use_rot`` (train phase), ``mean``/``std`` (optional normalisation), ``cache`` (decode every
    image once, at construction, and keep it in memory; default false).
    """

    def __init__(self, opt: Dict[str, Any]) -> None:
        super().__init__()
        unknown = set(opt) - DATASET_KEYS - LOADER_KEYS
        if unknown:
            raise DatasetError(f'RSPairedDataset: unknown key(s) {sorted(unknown)}; valid keys: '
                               f'{", ".join(sorted(DATASET_KEYS))}')
        self.opt = opt
        self.train = opt.get('phase') == 'train'
        self.scale = opt.get('scale')
        if not is_strict_int(self.scale, 1):
            _fail('scale', f'must be a positive integer, got {self.scale!r}')
        if 'dataroot_gt' not in opt:
            _fail('dataroot_gt', 'is required (a folder or an .lmdb of HR images)')
        self.gt_root = str(opt['dataroot_gt'])
        self.lq_root = None if opt.get('dataroot_lq') is None else str(opt['dataroot_lq'])
        self.degradation = opt.get('degradation', 'bicubic')
        if self.degradation not in DEGRADATIONS:
            _fail('degradation', f'must be one of {DEGRADATIONS}, got {self.degradation!r}')
        if self.lq_root is not None and 'degradation' in opt:
            _fail('degradation', 'applies to LR made on the fly; with dataroot_lq the LR is read from disk')
        self.gt_size = opt.get('gt_size')
        if self.train:
            if not is_strict_int(self.gt_size, self.scale) or self.gt_size % self.scale:
                _fail('gt_size', f'must be a multiple of scale ({self.scale}) in the train phase, got {self.gt_size!r}')
        self.mean, self.std = opt.get('mean'), opt.get('std')
        for key, value in (('mean', self.mean), ('std', self.std)):
            if value is not None and (not isinstance(value, (list, tuple)) or len(value) != 3
                                      or not all(is_strict_number(v) for v in value)):
                _fail(key, f'must be a list of 3 numbers (RGB), got {value!r}')
        if self.std is not None and any(v <= 0 for v in self.std):
            _fail('std', f'must be positive, got {self.std!r}')
        cache = opt.get('cache', False)
        if not isinstance(cache, bool):
            _fail('cache', f'must be true or false, got {cache!r}')
        io_opt = dict(opt.get('io_backend', {'type': 'disk'}))
        self.backend = io_opt.get('type')
        if self.backend not in ('disk', 'lmdb'):
            _fail('io_backend.type', f"must be 'disk' or 'lmdb', got {self.backend!r}")
        roots = [self.gt_root] + ([self.lq_root] if self.lq_root else [])
        for root in roots:
            if not os.path.isdir(root):
                raise DatasetNotFoundError(f'RSPairedDataset: {root} is not a folder'
                                           + (' (an .lmdb folder)' if self.backend == 'lmdb' else ''))
            if self.backend == 'lmdb' and not root.endswith('.lmdb'):
                _fail('io_backend.type', f'is lmdb but {root} is not an .lmdb folder')
        io_opt.pop('type')
        if self.backend == 'lmdb':
            io_opt.update(db_paths=roots, client_keys=['gt'] + (['lq'] if self.lq_root else []))
        self.io_args = io_opt
        self.file_client: Optional[FileClient] = None
        self._meta: Dict[str, Dict[str, Tuple[int, int]]] = {}
        self._image_sizes: Dict[str, Dict[str, tuple]] = {}
        self.stems = self._select_stems(opt.get('split_file'))
        self._check_sizes()
        self._cache: Optional[Dict[Tuple[str, str], Tuple[np.ndarray, str]]] = None
        if cache:
            self._cache = self._decode_all()

    def _decode_all(self) -> Dict[Tuple[str, str], Tuple[np.ndarray, str]]:
        """``(client key, stem) -> (8-bit BGR image, where it was read from)`` of every selected image.

        Raises:
            DatasetError: before decoding anything, where the images (sizes from their headers or the LMDB's
                ``meta_info.txt``) would take more than half of the memory available now.
        """
        sources = [(self.gt_root, self.gt_files, 'gt')]
        if self.lq_root:
            sources.append((self.lq_root, self.lq_files, 'lq'))
        needed = sum(3 * height * width for root, files, _ in sources
                     for height, width in self._sizes(root, files).values())
        available = available_memory()
        if available is not None and needed > available / 2:
            _fail('cache', f'would keep {len(self.stems)} images of {self.gt_root} decoded in memory, '
                           f'{needed / 2 ** 30:.1f} GiB, more than half of the {available / 2 ** 30:.1f} GiB available '
                           'now; set cache: false (each image is then decoded when it is drawn)')
        self.file_client = FileClient(self.backend, **self.io_args)
        try:
            images = {}
            for root, files, key in sources:
                for stem in self.stems:
                    images[key, stem] = self._read(root, files, stem, key)
        finally:
            for env in getattr(self.file_client.client, '_client', {}).values():  # LMDB environments
                env.close()
            self.file_client = None  # each worker opens its own (an LMDB environment does not survive a fork)
        megabytes = sum(img.nbytes for img, _ in images.values()) / 2 ** 20
        pairs = ' and their LR' if self.lq_root else ''
        get_root_logger().info(f'RSPairedDataset {self.opt.get("name", self.gt_root)}: {len(self.stems)} images'
                               f'{pairs} decoded into memory (cache: true), {megabytes:.1f} MiB')
        return images

    # ------------------------------------------------------------------------------------------------------
    def _available(self, root: str) -> Dict[str, str]:
        """stem -> file name (disk) or key (LMDB) of the images under ``root``."""
        if self.backend == 'lmdb':
            return {stem: stem for stem in self._lmdb_shapes(root)}
        return {Path(n).stem: n for n in sorted(os.listdir(root)) if n.lower().endswith(IMAGE_SUFFIXES)}

    def _lmdb_shapes(self, root: str) -> Dict[str, Tuple[int, int]]:
        """key -> (height, width) of an LMDB, from its ``meta_info.txt`` (``name.png (h,w,c) level`` lines)."""
        if root not in self._meta:
            meta = os.path.join(root, 'meta_info.txt')
            if not os.path.isfile(meta):
                raise DatasetNotFoundError(f'RSPairedDataset: {meta} is missing (an LMDB made by '
                                           'basicsr.utils.lmdb_util has one)')
            shapes = {}
            with open(meta) as f:
                for number, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    match = META_LINE.fullmatch(line.strip())
                    if match is None:
                        raise DatasetError(f'{meta}:{number}: expected `<name>.png (<h>,<w>,<c>) <level>`, got '
                                           f'{line.strip()[:80]!r}')
                    shapes[Path(match.group(1)).stem] = (int(match.group(2)), int(match.group(3)))
            self._meta[root] = shapes
        return self._meta[root]

    def _select_stems(self, split_file: Optional[str]) -> List[str]:
        self.gt_files = self._available(self.gt_root)
        self.lq_files = self._available(self.lq_root) if self.lq_root else {}
        if split_file is not None:
            if not os.path.isfile(split_file):
                raise DatasetNotFoundError(f'RSPairedDataset: split_file {split_file} does not exist')
            with open(split_file) as f:
                stems = [Path(line.strip()).stem for line in f if line.strip()]
            missing = [s for s in stems if s not in self.gt_files]
            if missing:
                raise DatasetNotFoundError(f'RSPairedDataset: {len(missing)} image(s) of {split_file} are not in '
                                           f'{self.gt_root}, e.g. {missing[:3]}')
        else:
            stems = sorted(self.gt_files)
        if not stems:
            raise DatasetNotFoundError(f'RSPairedDataset: no images in {self.gt_root}')
        if self.lq_root:
            missing = [s for s in stems if s not in self.lq_files]
            if missing:
                raise DatasetNotFoundError(f'RSPairedDataset: {len(missing)} GT image(s) have no LR in '
                                           f'{self.lq_root}, e.g. {missing[:3]}')
        return stems

    def _sizes(self, root: str, files: Dict[str, str]) -> Dict[str, tuple]:
        """(height, width) of every selected image, from LMDB meta_info or the image headers (no decoding); read
        once per root (the size checks and the cache's memory check both ask)."""
        if root not in self._image_sizes:
            self._image_sizes[root] = self._read_sizes(root, files)
        return self._image_sizes[root]

    def _read_sizes(self, root: str, files: Dict[str, str]) -> Dict[str, tuple]:
        if self.backend == 'lmdb':
            shapes = self._lmdb_shapes(root)
            return {stem: shapes[stem] for stem in self.stems}
        sizes = {}
        for stem in self.stems:
            path = os.path.join(root, files[stem])
            try:
                with Image.open(path) as img:
                    sizes[stem] = (img.height, img.width)
            except (OSError, ValueError) as error:
                raise DatasetError(f'RSPairedDataset: {path}: cannot be read as an image ({error})') from error
        return sizes

    def _check_sizes(self) -> None:
        """Fail at construction, naming the file, for GT smaller than gt_size or LR not GT / scale."""
        if not (self.train and self.gt_size) and not self.lq_root:
            return
        gt_sizes = self._sizes(self.gt_root, self.gt_files)
        lq_sizes = self._sizes(self.lq_root, self.lq_files) if self.lq_root else {}
        for stem, (height, width) in gt_sizes.items():
            if self.train and min(height, width) < self.gt_size:
                raise DatasetError(f'RSPairedDataset: {self.gt_root}/{self.gt_files[stem]} is {height}x{width}, '
                                   f'smaller than gt_size {self.gt_size}')
            if stem in lq_sizes and lq_sizes[stem] != (height // self.scale, width // self.scale):
                raise DatasetError(f'RSPairedDataset: {self.lq_root}/{self.lq_files[stem]} is '
                                   f'{lq_sizes[stem][0]}x{lq_sizes[stem][1]} but {self.gt_root}/{self.gt_files[stem]} '
                                   f'is {height}x{width}; expected the GT size divided by {self.scale}')

    def _read(self, root: str, files: Dict[str, str], stem: str, client_key: str) -> Tuple[np.ndarray, str]:
        """The image ``stem`` of ``root`` as uint8 BGR ``(H, W, 3)``, and where it was read from (the file, or
        ``<lmdb>/<key>``); from the cache where there is one.

        Raises:
            DatasetError: naming the file or the LMDB and key, for a key the LMDB does not hold (its
                ``meta_info.txt`` lists it) and for an image that is not 8-bit RGB.
        """
        if self._cache is not None:
            return self._cache[client_key, stem]
        if self.backend == 'lmdb':
            path = stem
        else:
            path = os.path.join(root, files[stem])
        where = path if self.backend == 'disk' else f'{root}/{stem}'
        data = self.file_client.get(path, client_key)
        if data is None:  # BasicSR's LMDB client returns None for a key the database lacks
            raise DatasetError(f'RSPairedDataset: {root}: no key {stem!r} in this LMDB, although its meta_info.txt '
                               'lists it; the database and its meta_info.txt do not match (rebuild the LMDB, e.g. '
                               'with basicsr prepare --lmdb)')
        try:
            return decode_rgb(data, where), where
        except ImageError as error:
            raise DatasetError(f'RSPairedDataset: {error}') from error

    def __getitem__(self, index: int) -> Dict[str, Any]:
        if self.file_client is None and self._cache is None:
            self.file_client = FileClient(self.backend, **self.io_args)
        stem = self.stems[index]
        img_gt, gt_path = self._read(self.gt_root, self.gt_files, stem, 'gt')
        if self.lq_root:
            img_lq, lq_path = self._read(self.lq_root, self.lq_files, stem, 'lq')
            img_gt = crop_to_scale(img_gt, self.scale)  # LR sizes were checked against GT at construction
            if self.train:
                img_gt, img_lq = paired_random_crop(img_gt, img_lq, self.gt_size, self.scale, gt_path)
            img_gt, img_lq = to_unit_float(img_gt), to_unit_float(img_lq)
        else:
            lq_path = gt_path
            img_gt = crop_to_scale(img_gt, self.scale)
            if self.train:
                img_gt = self._random_crop(img_gt)
            img_gt = to_unit_float(img_gt)
            img_lq = downsample(img_gt, self.scale, self.degradation)
        if self.train:
            # BasicSR's augment flips in place with cv2, which OpenCV >= 5 refuses on non-contiguous crops
            img_gt, img_lq = augment([np.ascontiguousarray(img_gt), np.ascontiguousarray(img_lq)],
                                     self.opt.get('use_hflip', True), self.opt.get('use_rot', True))
        img_gt, img_lq = img2tensor([img_gt, img_lq], bgr2rgb=True, float32=True)
        if self.mean is not None or self.std is not None:
            normalize(img_lq, self.mean, self.std, inplace=True)
            normalize(img_gt, self.mean, self.std, inplace=True)
        return {'lq': img_lq, 'gt': img_gt, 'lq_path': lq_path, 'gt_path': gt_path}

    def _random_crop(self, img: np.ndarray) -> np.ndarray:
        """A ``gt_size`` patch at an LR-aligned position (sizes >= gt_size were checked at construction)."""
        height, width = img.shape[:2]
        top = np.random.randint(0, (height - self.gt_size) // self.scale + 1) * self.scale
        left = np.random.randint(0, (width - self.gt_size) // self.scale + 1) * self.scale
        return img[top:top + self.gt_size, left:left + self.gt_size]

    def __len__(self) -> int:
        return len(self.stems)
