"""``basicsr bench``: the paper's comparison tables from test option files or experiment folders.

For every model: PSNR and SSIM on Y (``crop_border`` = scale, BasicSR's ``calculate_psnr``/``calculate_ssim``)
over its test split, parameters, MACs of one forward at 64x64 LR (PyTorch's ``FlopCounterMode``, which counts
the operations actually executed, so the MoE head is counted at its routed cost), median latency and peak
memory of that forward on the current device, and the number of training iterations of the weights where
known. Bicubic (MATLAB ``imresize``) is always a row of every (test set, scale). Outputs in ``--out``:
``bench.md``, ``bench.csv``, ``bench_psnr_latency.png``, with ``--per-class`` ``bench_per_class.csv``, and
with ``--expert-maps`` the maps and usage CSV of every MoE model (:mod:`hmoe_arch.expert_maps`).

Peak memory: on CUDA ``max_memory_allocated`` above what was allocated before the forward; on the CPU the
rise of the peak resident set (VmHWM, reset via ``/proc/self/clear_refs``) of a child process that fixes
glibc's mmap threshold at 64 KiB before anything is allocated, so freed tensors leave the resident set. Not
in this process: that setting makes every large allocation a fresh mmap, which slowed a paper-size CPU
forward 1.6-2.0x here (latency and evaluation would pay for it), and setting it late misreports the peak.
"""
import csv
import ctypes
import json
import math
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import cv2
import numpy as np
import torch
from basicsr.data import build_dataset
from basicsr.metrics import calculate_psnr, calculate_ssim
from basicsr.utils import get_root_logger, tensor2img
from basicsr.utils.matlab_functions import imresize
from torch.utils.flop_counter import FlopCounterMode

from .archs import MFGHMoEArch
from .errors import OptionError
from .expert_maps import UsageByClass, group_sizes_of, lr_expert_map, save_expert_map, scene_class
from .infer import load_network
from .options import read_option_file
from .tiling import padded_forward, tiled_forward, window_size_of

COLUMNS = ['test_set', 'scale', 'model', 'psnr_y', 'ssim_y', 'params_m', 'macs_g_64', 'latency_ms', 'peak_mib',
           'train_iters', 'source']
REQUIRED_KEYS = ('scale', 'network_g', 'datasets')


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


def _fmt(value: float, digits: int) -> str:
    return '' if math.isnan(value) else f'{value:.{digits}f}'


# ----------------------------------------------------------------------------------------------------------
# sources
def _test_dataset(opt: Dict[str, Any], path: Path) -> Dict[str, Any]:
    for key in sorted(opt['datasets']):
        if key.split('_')[0] in ('test', 'val'):
            return {**opt['datasets'][key], 'phase': 'val', 'scale': opt['scale']}
    raise OptionError(f'{path}: no test_* or val* dataset to evaluate on')


def model_from_source(source: Path, force_yml: Sequence[str] = ()) -> BenchModel:
    """A test option file (weights from ``path.pretrain_network_g``) or an experiment folder (its copied
    option file, its val dataset and ``models/net_g_latest.pth``, EMA weights when saved)."""
    if source.is_dir():
        options = sorted(source.glob('*.yml'))
        if len(options) != 1:
            raise OptionError(f'{source}: expected one option file (*.yml) in the experiment folder, found '
                              f'{[p.name for p in options]}')
        opt = read_option_file(options[0], force_yml, required=REQUIRED_KEYS)
        weights = source / 'models' / 'net_g_latest.pth'
        if not weights.is_file():
            raise OptionError(f'{source}: no models/net_g_latest.pth (has the training finished?)')
        # net_g_latest.pth is written when training ends, at train.total_iter of the options it ran with
        iters = opt.get('train', {}).get('total_iter')
        return BenchModel(name=opt.get('name', source.name), scale=int(opt['scale']),
                          dataset_opt=_test_dataset(opt, options[0]), network=dict(opt['network_g']),
                          weights=str(weights), param_key='params_ema', strict=True, tile=opt.get('tile'),
                          train_iters=None if iters is None else int(iters), source=str(source))
    opt = read_option_file(source, force_yml, required=REQUIRED_KEYS)
    path_opt = opt.get('path', {})
    weights = path_opt.get('pretrain_network_g')
    if not weights:
        raise OptionError(f'{source}: path.pretrain_network_g names no weights to evaluate')
    return BenchModel(name=opt.get('name', source.stem), scale=int(opt['scale']),
                      dataset_opt=_test_dataset(opt, source), network=dict(opt['network_g']), weights=str(weights),
                      param_key=path_opt.get('param_key_g', 'params'), strict=path_opt.get('strict_load_g', True),
                      tile=opt.get('tile'), source=str(source))


def build(model: BenchModel, device: torch.device) -> torch.nn.Module:
    return load_network(Path(model.weights), model.network, device, param_key=model.param_key, strict=model.strict,
                        label=f'{model.source}: path.pretrain_network_g')


# ----------------------------------------------------------------------------------------------------------
# measurements
def evaluate(model: BenchModel, net: Optional[torch.nn.Module], device: torch.device,
             maps_dir: Optional[Path] = None) -> BenchRow:
    """PSNR/SSIM on Y of ``net`` (bicubic when None) over the model's test set."""
    if maps_dir is not None and model.tile is not None:
        raise OptionError(f'{model.source}: expert maps need untiled inference (remove `tile`)')
    dataset = build_dataset(dict(model.dataset_opt))
    window = window_size_of(net, model.network) if net is not None else 1
    usage = UsageByClass(len(net.upsample.moe.experts)) if maps_dir is not None else None
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
        if usage is not None:
            expert = lr_expert_map(net, lq.shape[2], lq.shape[3])
            usage.add(stem, expert)
            save_expert_map(maps_dir / f'{stem}.png', sr_img, expert, group_sizes_of(net), model.scale)
    if usage is not None:
        usage.write_csv(maps_dir / 'expert_usage.csv')
    return BenchRow(model=model, psnr=float(np.mean(psnrs)), ssim=float(np.mean(ssims)), per_class=per_class)


def count_macs(net: torch.nn.Module, lr_size: int, device: torch.device) -> float:
    """Multiply-accumulates of one forward on a random ``(1, 3, lr_size, lr_size)`` input."""
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        net(torch.rand(1, 3, lr_size, lr_size, device=device))
    return counter.get_total_flops() / 2


def fix_malloc_threshold() -> None:
    """Make glibc serve allocations above 64 KiB with mmap and return them on free (no dynamic threshold), so
    the resident set follows the live tensors."""
    try:
        ctypes.CDLL('libc.so.6').mallopt(-3, 65536)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


def _status_kib(field_name: str) -> int:
    with open('/proc/self/status') as f:
        for line in f:
            if line.startswith(field_name + ':'):
                return int(line.split()[1])
    raise RuntimeError(f'/proc/self/status has no {field_name}')


def peak_memory_mib(fn: Callable[[], object], device: torch.device) -> float:
    """Peak memory that one call of ``fn`` adds: CUDA ``max_memory_allocated`` above the allocation before
    it, or on the CPU the rise of the peak resident set (VmHWM, reset via ``/proc/self/clear_refs``); NaN
    where neither is available."""
    if device.type == 'cuda':
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    try:
        with open('/proc/self/clear_refs', 'w') as f:
            f.write('5')
        base = _status_kib('VmRSS')
        fn()
        return (_status_kib('VmHWM') - base) / 1024
    except OSError:
        return float('nan')


def forward_latency(net: torch.nn.Module, lr_size: int, device: torch.device, runs: int) -> float:
    """Median seconds of one forward at ``lr_size`` (after one untimed forward)."""
    x = torch.rand(1, 3, lr_size, lr_size, device=device)
    cuda = device.type == 'cuda'
    times = []
    with torch.no_grad():
        net(x)
        for _ in range(runs):
            if cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            net(x)
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def forward_peak_mib(net: torch.nn.Module, lr_size: int, device: torch.device) -> float:
    """Peak MiB of one forward of ``net`` on a random ``(1, 3, lr_size, lr_size)`` input in this process (see
    :func:`peak_memory_mib`; on the CPU call :func:`fix_malloc_threshold` first, before anything large)."""
    x = torch.rand(1, 3, lr_size, lr_size, device=device)
    with torch.no_grad():
        net(x)  # first-call allocations (thread pools, kernels) are not the network's
        return peak_memory_mib(lambda: net(x), device)


def forward_memory(model: BenchModel, net: torch.nn.Module, lr_size: int, device: torch.device) -> float:
    """Peak MiB of one forward at ``lr_size``: on CUDA of ``net`` in this process, on the CPU of the same
    weights rebuilt in a child process (see the module docstring)."""
    if device.type == 'cuda':
        return forward_peak_mib(net, lr_size, device)
    with tempfile.TemporaryDirectory() as tmp:
        request, answer = Path(tmp) / 'request.json', Path(tmp) / 'answer.json'
        request.write_text(json.dumps({'model': asdict(model), 'lr_size': lr_size}))
        child = subprocess.run([sys.executable, '-c', 'import sys; from hmoe_arch.bench import memory_child; '
                                'memory_child(sys.argv[1], sys.argv[2])', str(request), str(answer)],
                               capture_output=True, text=True)
        if child.returncode:
            raise RuntimeError(f'{model.source}: measuring peak memory in a child process failed:\n'
                               f'{child.stderr[-3000:]}')
        return float(json.loads(answer.read_text())['peak_mib'])


def memory_child(request: str, answer: str) -> None:
    """Entry of the child process of :func:`forward_memory`: JSON ``{model, lr_size}`` in ``request``, JSON
    ``{peak_mib}`` written to ``answer``."""
    fix_malloc_threshold()
    job = json.loads(Path(request).read_text())
    device = torch.device('cpu')
    net = build(BenchModel(**job['model']), device).eval()
    Path(answer).write_text(json.dumps({'peak_mib': forward_peak_mib(net, job['lr_size'], device)}))


# ----------------------------------------------------------------------------------------------------------
# outputs
def write_tables(rows: List[BenchRow], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with open(out / 'bench.csv', 'w', newline='') as f:
        writer = csv.writer(f)
        writer.writerow(COLUMNS)
        for row in rows:
            writer.writerow(row.values())
    header = ['Test set', 'Scale', 'Model', 'PSNR (Y)', 'SSIM (Y)', 'Params (M)', 'MACs @64x64 (G)', 'Latency (ms)',
              'Peak mem (MiB)', 'Train iters', 'Source']
    lines = ['| ' + ' | '.join(header) + ' |', '|' + ' --- |' * len(header)]
    lines += ['| ' + ' | '.join(str(v) for v in row.values()) + ' |' for row in rows]
    (out / 'bench.md').write_text('\n'.join(lines) + '\n')


def write_per_class(rows: List[BenchRow], path: Path) -> None:
    with open(path, 'w', newline='') as f:
        writer = csv.writer(f)
        writer.writerow(['test_set', 'scale', 'model', 'class', 'images', 'psnr_y'])
        for row in rows:
            for key in sorted(row.per_class):
                values = row.per_class[key]
                writer.writerow([row.test_set, row.model.scale, row.model.name, key, len(values),
                                 f'{np.mean(values):.4f}'])


def plot_psnr_latency(rows: List[BenchRow], path: Path) -> None:
    """PSNR (Y) against latency, one point per model (bicubic has no latency and is left out)."""
    points = [(r.latency_ms, r.psnr, f'{r.model.name} ({r.test_set} x{r.model.scale})') for r in rows
              if not math.isnan(r.latency_ms)]
    width, height, margin = 900, 560, 70
    canvas = np.full((height, width, 3), 255, np.uint8)
    cv2.rectangle(canvas, (margin, margin // 2), (width - margin // 2, height - margin), (0, 0, 0), 1)
    cv2.putText(canvas, 'latency (ms)', (width // 2 - 40, height - 20), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 0, 0), 1,
                cv2.LINE_AA)
    cv2.putText(canvas, 'PSNR Y (dB)', (5, margin // 2 - 8), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 0, 0), 1, cv2.LINE_AA)
    if points:
        xs, ys = [p[0] for p in points], [p[1] for p in points]
        x_lo, x_hi = min(xs) * 0.9, max(xs) * 1.1 + 1e-9
        y_lo, y_hi = min(ys) - 0.1, max(ys) + 0.1

        def position(x: float, y: float):
            px = margin + (x - x_lo) / (x_hi - x_lo) * (width - 1.5 * margin)
            py = height - margin - (y - y_lo) / (y_hi - y_lo) * (height - 1.5 * margin)
            return int(px), int(py)

        for value, label in ((x_lo, f'{x_lo:.1f}'), (x_hi, f'{x_hi:.1f}')):
            cv2.putText(canvas, label, (position(value, y_lo)[0] - 10, height - margin + 18), cv2.FONT_HERSHEY_SIMPLEX,
                        0.4, (0, 0, 0), 1, cv2.LINE_AA)
        for value in (y_lo, y_hi):
            cv2.putText(canvas, f'{value:.2f}', (8, position(x_lo, value)[1] + 4), cv2.FONT_HERSHEY_SIMPLEX, 0.4,
                        (0, 0, 0), 1, cv2.LINE_AA)
        for x, y, label in points:
            px, py = position(x, y)
            cv2.circle(canvas, (px, py), 5, (200, 80, 0), -1, cv2.LINE_AA)
            cv2.putText(canvas, label, (px + 8, py - 6), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 0, 0), 1, cv2.LINE_AA)
    if not cv2.imwrite(str(path), canvas):
        raise OSError(f'could not write {path}')


# ----------------------------------------------------------------------------------------------------------
def run_bench(sources: Sequence[Path], out: Path, *, device: str = 'cpu', lr_size: int = 64, runs: int = 5,
              per_class: bool = False, expert_maps: bool = False, force_yml: Sequence[str] = ()) -> List[BenchRow]:
    """Evaluate every source and write the tables; returns the rows (bicubic first in each test set)."""
    logger = get_root_logger()
    if device.startswith('cuda') and not torch.cuda.is_available():
        raise OptionError('--device cuda: no CUDA device is available')
    dev = torch.device(device)
    models = [model_from_source(Path(s), force_yml) for s in sources]
    rows: List[BenchRow] = []
    seen_sets = set()
    for model in models:
        key = (model.dataset_opt.get('dataroot_gt'), model.dataset_opt.get('dataroot_lq'), model.scale)
        if key not in seen_sets:
            seen_sets.add(key)
            bicubic = BenchModel(name='Bicubic', scale=model.scale, dataset_opt=model.dataset_opt, source='imresize')
            rows.append(evaluate(bicubic, None, dev))
            logger.info(f'bench: Bicubic on {rows[-1].test_set} x{model.scale}: {rows[-1].psnr:.4f} dB')
        net = build(model, dev)
        maps_dir = out / 'expert_maps' / model.name if expert_maps and isinstance(net, MFGHMoEArch) and net.moe \
            else None
        row = evaluate(model, net, dev, maps_dir)
        row.params_m = sum(p.numel() for p in net.parameters()) / 1e6
        row.macs_g = count_macs(net, lr_size, dev) / 1e9
        row.latency_ms = forward_latency(net, lr_size, dev, runs) * 1e3
        row.peak_mib = forward_memory(model, net, lr_size, dev)
        rows.append(row)
        logger.info(f'bench: {model.name} on {row.test_set} x{model.scale}: {row.psnr:.4f} dB, {row.ssim:.4f}')
    write_tables(rows, out)
    plot_psnr_latency(rows, out / 'bench_psnr_latency.png')
    if per_class:
        write_per_class(rows, out / 'bench_per_class.csv')
    logger.info(f'bench: tables in {out}:\n' + (out / 'bench.md').read_text())
    return rows
