"""PSNR/SSIM on Y of a network (or bicubic) over a test set, per image and per scene class, with expert maps."""
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from basicsr.data import build_dataset
from basicsr.metrics import calculate_psnr, calculate_ssim
from basicsr.utils import tensor2img
from basicsr.utils.matlab_functions import imresize

from ...errors import OptionError
from ...expert_maps import ExpertMapWriter, scene_class
from ...tiling import padded_forward, tiled_forward, window_size_of
from .rows import BenchModel, BenchRow


def evaluate(model: BenchModel, net: Optional[torch.nn.Module], device: torch.device,
             maps_dir: Optional[Path] = None) -> BenchRow:
    """PSNR/SSIM on Y of ``net`` (bicubic when None) over the model's test set."""
    if maps_dir is not None and model.tile is not None:
        raise OptionError(f'{model.source}: expert maps need untiled inference (remove `tile`)')
    dataset = build_dataset(dict(model.dataset_opt))
    window = window_size_of(net, model.network) if net is not None else 1
    maps = ExpertMapWriter(maps_dir, net, model.scale) if maps_dir is not None else None
    psnrs, ssims, per_class = [], [], {}
    for index in range(len(dataset)):
        item = dataset[index]
        lq = item['lq'].unsqueeze(0).to(device)
        with torch.no_grad():
            if net is None:
                sr = imresize(item['lq'], model.scale).clamp(0, 1).unsqueeze(0)
            elif model.tile is not None:
                sr = tiled_forward(net, lq, model.scale, window, model.tile['tile_size'], model.tile['tile_pad'])
            else:
                sr = padded_forward(net, lq, model.scale, window)
        sr_img, gt_img = tensor2img(sr.cpu()), tensor2img(item['gt'])
        psnr = calculate_psnr(sr_img, gt_img, crop_border=model.scale, test_y_channel=True)
        ssim = calculate_ssim(sr_img, gt_img, crop_border=model.scale, test_y_channel=True)
        psnrs.append(psnr)
        ssims.append(ssim)
        stem = Path(item['lq_path']).stem
        per_class.setdefault(scene_class(stem), []).append(psnr)
        if maps is not None:
            maps.add(stem, net, lq.shape[2], lq.shape[3], sr_img)
    if maps is not None:
        maps.close()
    return BenchRow(model=model, psnr=float(np.mean(psnrs)), ssim=float(np.mean(ssims)), per_class=per_class)
