"""Optional metrics of ``basicsr bench`` that run offline: NIQE (BasicSR's, no reference) and LPIPS (AlexNet,
only from weights already on disk: a benchmark never downloads in the middle of a run)."""
import math
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from basicsr.metrics import calculate_niqe

from ...errors import OptionError

ALEXNET_FILE = 'alexnet-owt-7be5be79.pth'
"""torchvision's ImageNet AlexNet weights, the backbone of LPIPS (``net='alex'``)."""
OPTIONAL_METRICS = ('niqe', 'lpips')
NIQE_BLOCK = 96
"""BasicSR's NIQE fits its statistics over 96x96 blocks: it needs at least two."""


def niqe(sr_img: np.ndarray, crop: int, label: str = 'image') -> float:
    """NIQE of a ``(H, W, 3)`` BGR uint8 image on its Y channel, ``crop`` pixels left out on every side (BasicSR's
    ``calculate_niqe`` with its pristine-image parameters; lower is better). NaN where NIQE is undefined: an image
    without texture (e.g. flat) has no natural-scene statistics to fit, and BasicSR's fit fails on it.

    Raises:
        OptionError: for an image smaller than one 96x96 block after the crop (``label`` names it).
    """
    height, width = sr_img.shape[0] - 2 * crop, sr_img.shape[1] - 2 * crop
    if (height // NIQE_BLOCK) * (width // NIQE_BLOCK) < 2:
        raise OptionError(f'--niqe: {label} is {height}x{width} after the border; NIQE needs at least two '
                          f'{NIQE_BLOCK}x{NIQE_BLOCK} blocks (e.g. {NIQE_BLOCK}x{2 * NIQE_BLOCK})')
    with warnings.catch_warnings(), np.errstate(all='ignore'):
        warnings.simplefilter('ignore', RuntimeWarning)
        try:
            value = float(calculate_niqe(sr_img, crop, input_order='HWC', convert_to='y'))
        except np.linalg.LinAlgError:
            return float('nan')
    return value if math.isfinite(value) else float('nan')


def alexnet_weights() -> Path:
    return Path(torch.hub.get_dir()) / 'checkpoints' / ALEXNET_FILE


def load_lpips(device: torch.device) -> Callable[[np.ndarray, np.ndarray, int], float]:
    """LPIPS (v0.1, AlexNet) as ``distance(sr_img, gt_img, crop)`` on BGR uint8 images (lower is better).

    Raises:
        OptionError: without the ``lpips`` package, or when the AlexNet weights are not on disk.
    """
    try:
        import lpips
    except ImportError:
        raise OptionError("--lpips needs the lpips package: pip install 'hmoe_arch[lpips]'") from None
    weights = alexnet_weights()
    if not weights.is_file():
        raise OptionError(f'--lpips needs the AlexNet weights LPIPS is built on at {weights}, and bench never '
                          'downloads during a run; fetch them once with: python -c "import torchvision; '
                          "torchvision.models.alexnet(weights='IMAGENET1K_V1')\" (or copy "
                          f'{ALEXNET_FILE} there)')
    with warnings.catch_warnings():  # lpips passes torchvision the deprecated `pretrained=False`
        warnings.filterwarnings('ignore', message='.*(pretrained|weights).*deprecated', category=UserWarning)
        model = lpips.LPIPS(net='alex', version='0.1', pnet_rand=True, verbose=False)
    alexnet = torch.load(weights, map_location='cpu', weights_only=True)
    # LPIPS's slices keep AlexNet's feature layers under their original indices: slice2.3.weight is features.3.weight
    wanted = model.net.state_dict()
    try:
        model.net.load_state_dict({k: alexnet[f'features.{k.split(".", 1)[1]}'] for k in wanted}, strict=True)
    except (KeyError, RuntimeError) as error:
        raise OptionError(f'{weights}: not torchvision\'s AlexNet weights ({error})') from None
    model = model.to(device).eval()

    def distance(sr_img: np.ndarray, gt_img: np.ndarray, crop: int) -> float:
        pair = [torch.from_numpy(np.ascontiguousarray(img[..., ::-1])).permute(2, 0, 1)[None].float() / 127.5 - 1
                for img in (sr_img, gt_img)]
        if crop:
            pair = [t[..., crop:-crop, crop:-crop] for t in pair]
        with torch.no_grad():
            return float(model(pair[0].to(device), pair[1].to(device)).item())

    return distance
