"""What ``basicsr bench`` evaluates and reports: a model, a test set, and one row of the tables."""
import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

BASE_COLUMNS = ['protocol', 'test_set', 'scale', 'model', 'psnr', 'ssim']
COST_COLUMNS = ['params_m', 'macs_g_64', 'latency_ms', 'peak_mib', 'train_iters', 'source']
COLUMNS = BASE_COLUMNS + COST_COLUMNS
"""CSV columns without the optional metrics (``niqe``, ``lpips`` follow ``ssim`` when requested)."""
REQUIRED_KEYS = ('scale', 'network_g', 'datasets')


def columns(optional_metrics: List[str]) -> List[str]:
    return BASE_COLUMNS + list(optional_metrics) + COST_COLUMNS


def _fmt(value: float, digits: int) -> str:
    return '' if math.isnan(value) else f'{value:.{digits}f}'


@dataclass
class BenchModel:
    """One model to evaluate (``network`` is None for bicubic); ``dataset_opt`` is its option file's test set."""

    name: str
    scale: int
    dataset_opt: Dict[str, Any]
    network: Optional[Dict[str, Any]] = None
    weights: Optional[str] = None
    param_key: str = 'params'
    strict: bool = True
    tile: Optional[Dict[str, int]] = None
    train_iters: Optional[int] = None
    source: str = ''
    option_file: str = ''
    """The option file ``network`` comes from (``source`` itself, or the one in the experiment folder)."""


@dataclass
class BenchRow:
    """One model on one test set under one protocol."""

    model: BenchModel
    protocol: str
    test_set: str
    psnr: float
    ssim: float
    metrics: Dict[str, float] = field(default_factory=dict)
    """Optional metrics by column name (``niqe``, ``lpips``)."""
    params_m: float = float('nan')
    macs_g: float = float('nan')
    latency_ms: float = float('nan')
    peak_mib: float = float('nan')
    per_class: Dict[str, List[float]] = field(default_factory=dict)
    """PSNR of each image, by scene class."""

    def values(self, optional_metrics: List[str]) -> List[Any]:
        iters = '' if self.model.train_iters is None else self.model.train_iters
        return ([self.protocol, self.test_set, self.model.scale, self.model.name, f'{self.psnr:.4f}',
                 f'{self.ssim:.4f}'] + [f'{self.metrics[m]:.4f}' for m in optional_metrics]
                + [_fmt(self.params_m, 3), _fmt(self.macs_g, 3), _fmt(self.latency_ms, 2), _fmt(self.peak_mib, 1),
                   iters, self.model.source])
