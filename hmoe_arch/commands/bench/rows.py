"""What ``basicsr bench`` evaluates and reports: a model to evaluate and one row of the tables."""
import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

COLUMNS = ['test_set', 'scale', 'model', 'psnr_y', 'ssim_y', 'params_m', 'macs_g_64', 'latency_ms', 'peak_mib',
           'train_iters', 'source']
REQUIRED_KEYS = ('scale', 'network_g', 'datasets')


def _fmt(value: float, digits: int) -> str:
    return '' if math.isnan(value) else f'{value:.{digits}f}'


@dataclass
class BenchModel:
    """One model to evaluate (``network`` is None for bicubic)."""

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


@dataclass
class BenchRow:
    model: BenchModel
    psnr: float
    ssim: float
    params_m: float = float('nan')
    macs_g: float = float('nan')
    latency_ms: float = float('nan')
    peak_mib: float = float('nan')
    per_class: Dict[str, List[float]] = field(default_factory=dict)

    @property
    def test_set(self) -> str:
        return self.model.dataset_opt.get('name', '?')

    def values(self) -> List[Any]:
        iters = '' if self.model.train_iters is None else self.model.train_iters
        return [self.test_set, self.model.scale, self.model.name, f'{self.psnr:.4f}', f'{self.ssim:.4f}',
                _fmt(self.params_m, 3), _fmt(self.macs_g, 3), _fmt(self.latency_ms, 2), _fmt(self.peak_mib, 1), iters,
                self.model.source]
