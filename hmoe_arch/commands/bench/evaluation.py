"""A network (or bicubic) over a test set: PSNR/SSIM under each protocol, per image and per scene class, the
optional metrics, and expert maps."""
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np
import torch
from basicsr.data import build_dataset
from basicsr.utils import get_root_logger, tensor2img
from basicsr.utils.matlab_functions import imresize
from tqdm import tqdm

from ...errors import OptionError
from ...expert_maps import ExpertMapWriter, scene_class
from ...protocols import Protocol
from ...tiling import padded_forward, tiled_forward, window_size_of
from .perceptual import niqe
from .rows import BenchModel, BenchRow

Lpips = Callable[[np.ndarray, np.ndarray, int], float]


@dataclass(frozen=True)
class TestSet:
    """A test set at one scale: its name in the tables and the BasicSR dataset options that load it."""

    name: str
    dataset_opt: Dict[str, Any]


def option_file_test_set(model: BenchModel) -> TestSet:
    return TestSet(name=model.dataset_opt.get('name', '?'), dataset_opt=dict(model.dataset_opt))


def folder_test_set(folder: Path, scale: int) -> TestSet:
    """``DIR/Test_HR`` and ``DIR/Test_LR_x{scale}`` (what ``basicsr prepare`` writes), named after ``DIR``."""
    if not folder.is_dir():
        raise OptionError(f'--test-set {folder}: no such folder')
    if not (folder / 'Test_HR').is_dir():
        raise OptionError(f'--test-set {folder}: no Test_HR folder (expected the layout basicsr prepare writes: '
                          'Test_HR, Test_LR_x{s})')
    lr = folder / f'Test_LR_x{scale}'
    if not lr.is_dir():
        found = ', '.join(sorted(p.name for p in folder.glob('Test_LR_x*') if p.is_dir())) or 'none'
        raise OptionError(f'--test-set {folder}: no {lr.name} for a x{scale} model (found: {found}; '
                          f'basicsr prepare ... --scales {scale} writes it)')
    return TestSet(name=folder.name, dataset_opt={
        'name': folder.name, 'type': 'RSPairedDataset', 'dataroot_gt': str(folder / 'Test_HR'),
        'dataroot_lq': str(lr), 'io_backend': {'type': 'disk'}, 'phase': 'val', 'scale': scale})


def evaluate(model: BenchModel, net: Optional[torch.nn.Module], device: torch.device, test_set: TestSet,
             protocols: Sequence[Protocol], *, with_niqe: bool = False, lpips: Optional[Lpips] = None,
             maps_dir: Optional[Path] = None, progress: bool = False) -> List[BenchRow]:
    """One row per protocol for ``net`` (bicubic when None) on ``test_set``; the network runs once per image.
    With ``progress`` a progress bar (images, with an ETA) on stderr."""
    if maps_dir is not None and model.tile is not None:
        raise OptionError(f'{model.source}: expert maps need untiled inference (remove `tile`)')
    dataset = build_dataset(dict(test_set.dataset_opt))
    window = window_size_of(net, model.network) if net is not None else 1
    maps = ExpertMapWriter(maps_dir, net, model.scale) if maps_dir is not None else None
    values: Dict[str, Dict[str, List[float]]] = {p.name: {} for p in protocols}
    per_class: Dict[str, Dict[str, List[float]]] = {p.name: {} for p in protocols}
    for index in tqdm(range(len(dataset)), desc=f'{model.name} on {test_set.name}', unit='image',
                      disable=not progress):
        item = dataset[index]
        lq = item['lq'].unsqueeze(0).to(device)
        with torch.no_grad():
            if net is None:
                sr = imresize(item['lq'], model.scale).clamp(0, 1).unsqueeze(0)
            elif model.tile is not None:
                sr = tiled_forward(net, lq, model.scale, window, model.tile['tile_size'], model.tile['tile_pad'])
            else:
                sr = padded_forward(net, lq, model.scale, window)
        sr = sr.cpu()
        gt_img = tensor2img(item['gt'])
        stem = Path(item['lq_path']).stem
        # protocols with the same 8-bit conversion share the SR image; NIQE (always on Y) and LPIPS (always on RGB)
        # depend only on that image and the border, so each is computed once per (conversion, border)
        images: Dict[str, np.ndarray] = {}
        shared: Dict[tuple, Dict[str, float]] = {}
        for p in protocols:
            if p.to_uint8 not in images:
                images[p.to_uint8] = p.quantise(sr)
            sr_img, crop = images[p.to_uint8], p.crop(model.scale)
            psnr, ssim = p.measure(sr_img, gt_img, model.scale)
            if (p.to_uint8, crop) not in shared:
                extra = shared[(p.to_uint8, crop)] = {}
                if with_niqe:
                    extra['niqe'] = niqe(sr_img, crop, f'{test_set.name}/{stem} ({model.name})')
                if lpips is not None:
                    extra['lpips'] = lpips(sr_img, gt_img, crop)
            for key, value in {'psnr': psnr, 'ssim': ssim, **shared[(p.to_uint8, crop)]}.items():
                values[p.name].setdefault(key, []).append(value)
            per_class[p.name].setdefault(scene_class(stem), []).append(psnr)
        if maps is not None:
            maps.add(stem, net, lq.shape[2], lq.shape[3], images['round'] if 'round' in images else tensor2img(sr))
    if maps is not None:
        maps.close()
    rows = []
    for p in protocols:
        undefined = int(np.isnan(values[p.name].get('niqe', [])).sum())
        if undefined:
            get_root_logger().warning(f'bench: NIQE is undefined for {undefined} of {len(dataset)} SR images of '
                                      f'{model.name} on {test_set.name} ({p.name}; images without texture); its '
                                      'NIQE is reported as nan')
        means = {key: float(np.mean(v)) for key, v in values[p.name].items()}
        rows.append(BenchRow(model=model, protocol=p.name, test_set=test_set.name, psnr=means.pop('psnr'),
                             ssim=means.pop('ssim'), metrics=means, per_class=per_class[p.name]))
    return rows
