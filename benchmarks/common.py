"""What the benchmark scripts share: the networks they compare and the labels of their tables."""
import torch

import hmoe_arch  # noqa: F401  (registers the plugin before anything imports basicsr)
from hmoe_arch import MFGHMoEArch
from hmoe_arch.archs.config import HAT_RGB_MEAN

TINY = dict(embed_dim=60, depths=[2, 2], num_heads=[6, 6], window_size=8, squeeze_factor=10)
"""A small network for CPU runs (CI); the paper size is MFGHMoEArch's default."""

KINDS = ('hat', 'moe', 'moe_dense')
"""``hat``: the exact HAT configuration; ``moe``: MFGHMoEArch's defaults; ``moe_dense``: the same with the
authors' dense expert evaluation (``HeterogeneousMoE.dense``, :meth:`HeterogeneousMoE.dense_dispatch`)."""


def build(kind: str, scale: int, device: str, *, tiny: bool = False, attention: str = 'sdpa') -> MFGHMoEArch:
    """A network of ``kind`` (see :data:`KINDS`); the same seed, so ``moe`` and ``moe_dense`` share weights."""
    torch.manual_seed(0)
    size = TINY if tiny else {}
    if kind == 'hat':
        net = MFGHMoEArch(upscale=scale, moe=False, mfa=False, rgb_mean=HAT_RGB_MEAN, attention=attention, **size)
    else:
        net = MFGHMoEArch(upscale=scale, attention=attention, **size)
        net.upsample.moe.dense = kind == 'moe_dense'
    return net.to(device)


def network_label(tiny: bool) -> str:
    return 'tiny (embed 60, depths [2, 2], window 8)' if tiny else 'paper size (embed 180, 6x6, window 16)'


def device_label(device: str) -> str:
    return torch.cuda.get_device_name() if device.startswith('cuda') else f'CPU, {torch.get_num_threads()} threads'
