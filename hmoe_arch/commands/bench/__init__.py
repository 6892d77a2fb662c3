"""``basicsr bench``: the paper's comparison tables from test option files or experiment folders.

For every model: PSNR and SSIM under each requested protocol (:mod:`hmoe_arch.protocols`; ``basicsr-y`` by
default: Y, ``crop_border`` = scale, BasicSR's ``calculate_psnr``/``calculate_ssim``) over its test split or the
``--test-set`` folders, optionally NIQE and LPIPS (:mod:`.perceptual`), parameters, MACs of one forward at 64x64
LR (PyTorch's ``FlopCounterMode``, which counts the operations actually executed, so the MoE head is counted at
its routed cost), median latency and peak memory of that forward on the current device, and the number of
training iterations of the weights where known. Bicubic (MATLAB ``imresize``) is always a row of every (test
set, scale, protocol) table. Outputs in ``--out``: ``bench.md`` (one table per protocol, test set and scale),
``bench.csv`` (the protocol in every row), ``bench_psnr_latency.png``, with ``--per-class``
``bench_per_class.csv``, and with ``--expert-maps`` the maps and usage CSV of every MoE model per test set
(:mod:`hmoe_arch.expert_maps`). A progress bar per model and test set goes to stderr (``progress``). A
``network_g`` that does not fit its checkpoint is refused in one line that says what differs (:mod:`.mismatch`).
An experiment folder whose training is running is refused, and no training of that name can start while bench
reads the folder (:func:`experiment_lock`).

Peak memory: on CUDA ``max_memory_allocated`` above what was allocated before the forward; on the CPU the
rise of the peak resident set (VmHWM, reset via ``/proc/self/clear_refs``) of a child process that fixes
glibc's mmap threshold at 64 KiB before anything is allocated, so freed tensors leave the resident set. Not
in this process: that setting makes every large allocation a fresh mmap, which slowed a paper-size CPU
forward 1.6-2.0x here (latency and evaluation would pay for it), and setting it late misreports the peak.
"""
import functools
import json
import os
import subprocess
import sys
import tempfile
from contextlib import ExitStack, contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence

import torch
from basicsr.utils import get_root_logger

from ...archs import MFGHMoEArch
from ...archs.config import check_network
from ...errors import ConfigError, OptionError
from ...loading import load_network
from ...locking import shared_lock
from ...options import read_option_file
from ...protocols import DEFAULT_PROTOCOL, protocol
from .cost import count_macs, fix_malloc_threshold, forward_latency, forward_peak_mib, peak_memory_mib
from .evaluation import TestSet, evaluate, folder_test_set, option_file_test_set
from .mismatch import mismatch_message
from .perceptual import OPTIONAL_METRICS, load_lpips
from .report import plot_psnr_latency, write_per_class, write_tables
from .rows import COLUMNS, REQUIRED_KEYS, BenchModel, BenchRow, columns

__all__ = ['COLUMNS', 'BenchModel', 'BenchRow', 'TestSet', 'build', 'columns', 'count_macs', 'evaluate',
           'fix_malloc_threshold', 'folder_test_set', 'forward_latency', 'forward_memory', 'forward_peak_mib',
           'experiment_lock', 'memory_child', 'model_from_source', 'peak_memory_mib', 'plot_psnr_latency', 'run_bench',
           'write_per_class', 'write_tables']


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
                          train_iters=None if iters is None else int(iters), source=str(source),
                          option_file=str(options[0]))
    opt = read_option_file(source, force_yml, required=REQUIRED_KEYS)
    path_opt = opt.get('path', {})
    weights = path_opt.get('pretrain_network_g')
    if not weights:
        raise OptionError(f'{source}: path.pretrain_network_g names no weights to evaluate')
    return BenchModel(name=opt.get('name', source.stem), scale=int(opt['scale']),
                      dataset_opt=_test_dataset(opt, source), network=dict(opt['network_g']), weights=str(weights),
                      param_key=path_opt.get('param_key_g', 'params'), strict=path_opt.get('strict_load_g', True),
                      tile=opt.get('tile'), source=str(source), option_file=str(source))


def build(model: BenchModel, device: torch.device, max_memory: Optional[float] = None) -> torch.nn.Module:
    """``model``'s network with its weights, in eval mode on ``device`` (``max_memory``: the limit in GiB on its
    estimated memory, :func:`hmoe_arch.loading.load_network`; None: the default).

    Raises:
        OptionError: one line; where ``network_g`` does not fit the checkpoint, naming the option file, the
            checkpoint, the options (or the first tensor) that differ and how to fix it (:mod:`.mismatch`); a
            ``network_g`` refused before it is built (:func:`hmoe_arch.archs.config.check_network`: its type, a
            file argument, its size) as it is, without building it for that comparison.
    """
    try:
        check_network(model.network, max_memory, where='')
    except ConfigError as error:
        raise OptionError(f'{model.source}: network_g: {error}') from None
    try:
        return load_network(Path(model.weights), model.network, device, param_key=model.param_key,
                            strict=model.strict, label=f'{model.source}: path.pretrain_network_g',
                            max_memory=max_memory)
    except OptionError:
        message = mismatch_message(model)
        if message is None:
            raise
        raise OptionError(message) from None


def forward_memory(model: BenchModel, net: torch.nn.Module, lr_size: int, device: torch.device,
                   max_memory: Optional[float] = None) -> float:
    """Peak MiB of one forward at ``lr_size``: on CUDA of ``net`` in this process, on the CPU of the same
    weights rebuilt in a child process (see the module docstring; ``max_memory`` as for :func:`build`)."""
    if device.type == 'cuda':
        return forward_peak_mib(net, lr_size, device)
    with tempfile.TemporaryDirectory() as tmp:
        request, answer = Path(tmp) / 'request.json', Path(tmp) / 'answer.json'
        request.write_text(json.dumps({'model': asdict(model), 'lr_size': lr_size, 'max_memory': max_memory}))
        child = subprocess.run([sys.executable, '-c', 'import sys; from hmoe_arch.commands.bench import memory_child; '
                                'memory_child(sys.argv[1], sys.argv[2])', str(request), str(answer)],
                               capture_output=True, text=True)
        if child.returncode:
            raise RuntimeError(f'{model.source}: measuring peak memory in a child process failed:\n'
                               f'{child.stderr[-3000:]}')
        return float(json.loads(answer.read_text())['peak_mib'])


def memory_child(request: str, answer: str) -> None:
    """Entry of the child process of :func:`forward_memory`: JSON ``{model, lr_size, max_memory}`` in ``request``,
    JSON ``{peak_mib}`` written to ``answer``."""
    fix_malloc_threshold()
    job = json.loads(Path(request).read_text())
    device = torch.device('cpu')
    net = build(BenchModel(**job['model']), device, job.get('max_memory')).eval()
    Path(answer).write_text(json.dumps({'peak_mib': forward_peak_mib(net, job['lr_size'], device)}))


def test_sets_of(model: BenchModel, folders: Sequence[Path]) -> List[TestSet]:
    """The ``--test-set`` folders at the model's scale, or the model's own test set when none are given."""
    if not folders:
        return [option_file_test_set(model)]
    return [folder_test_set(Path(folder), model.scale) for folder in folders]


@contextmanager
def experiment_lock(folder: Path) -> Iterator[None]:
    """Hold the experiment folder ``folder`` shared against its training for the ``with`` block: the lock file
    ``.<name>.lock`` beside it, which ``basicsr train`` holds exclusively while it runs
    (:func:`hmoe_arch.commands.pipeline.basicsr_pipeline`), so a new training of the same name (which would move
    the folder aside and start writing a new one) cannot start meanwhile.

    Raises:
        OptionError: when a training of that name is running, naming its PID.
    """
    absolute = Path(os.path.abspath(folder))
    lock = absolute.parent.resolve() / f'.{absolute.name}.lock'
    with shared_lock(lock, lambda holder: OptionError(
            f'{folder}: a training of this experiment is running ({holder}); its weights are not final, and a new '
            'training of this name moves the folder aside: bench it when the training has finished')):
        yield


def _holding_experiment_locks(bench: Callable[..., List[BenchRow]]) -> Callable[..., List[BenchRow]]:
    """``bench(sources, ...)`` holding :func:`experiment_lock` of every source that is a folder while it runs."""
    @functools.wraps(bench)
    def holding(sources: Sequence[Path], *args: Any, **kwargs: Any) -> List[BenchRow]:
        with ExitStack() as held:
            for source in sources:
                if Path(source).is_dir():
                    held.enter_context(experiment_lock(Path(source)))
            return bench(sources, *args, **kwargs)

    return holding


@_holding_experiment_locks
def run_bench(sources: Sequence[Path], out: Path, *, device: str = 'cpu', lr_size: int = 64, runs: int = 5,
              per_class: bool = False, expert_maps: bool = False, force_yml: Sequence[str] = (),
              protocols: Sequence[str] = (DEFAULT_PROTOCOL,), test_sets: Sequence[Path] = (),
              metrics: Sequence[str] = (), progress: bool = True, max_memory: Optional[float] = None
              ) -> List[BenchRow]:
    """Evaluate every source and write the tables; returns the rows (bicubic first in each table). Experiment
    folders are held against their training meanwhile (:func:`experiment_lock`).

    Args:
        protocols: Protocol names (:data:`hmoe_arch.protocols.PROTOCOLS`), one table block each.
        test_sets: Folders in ``basicsr prepare``'s layout to evaluate every model on instead of its option file's
            test set (one table block each).
        metrics: Optional metrics, ``niqe`` and/or ``lpips``.
        progress: A progress bar (images, with an ETA) on stderr for every model and bicubic on every test set.
        max_memory: The limit in GiB on each network's estimated memory (``--max-memory``; None: the default).
    """
    logger = get_root_logger()
    try:
        chosen = [protocol(name) for name in dict.fromkeys(protocols)]
    except ValueError as error:
        raise OptionError(f'--protocol: {error}') from None
    if not chosen:
        raise OptionError('--protocol: at least one protocol is needed')
    unknown = [m for m in metrics if m not in OPTIONAL_METRICS]
    if unknown:
        raise OptionError(f'unknown optional metric(s) {unknown}; known: {list(OPTIONAL_METRICS)}')
    optional = [m for m in OPTIONAL_METRICS if m in metrics]
    names = [Path(folder).name for folder in test_sets]
    if len(set(names)) != len(names):
        raise OptionError(f'--test-set: two folders share a name ({names}); the tables tell test sets apart by it')
    if device.startswith('cuda') and not torch.cuda.is_available():
        raise OptionError('--device cuda: no CUDA device is available')
    dev = torch.device(device)
    models = [model_from_source(Path(s), force_yml) for s in sources]
    plans = [(model, test_sets_of(model, test_sets)) for model in models]  # every folder checked before any work
    lpips = load_lpips(dev) if 'lpips' in optional else None
    rows: List[BenchRow] = []
    seen_sets = set()
    for model, model_sets in plans:
        net = build(model, dev, max_memory)
        cost = dict(params_m=sum(p.numel() for p in net.parameters()) / 1e6,
                    macs_g=count_macs(net, lr_size, dev) / 1e9,
                    latency_ms=forward_latency(net, lr_size, dev, runs) * 1e3,
                    peak_mib=forward_memory(model, net, lr_size, dev, max_memory))
        for test_set in model_sets:
            key = (test_set.dataset_opt.get('dataroot_gt'), test_set.dataset_opt.get('dataroot_lq'), model.scale)
            if key not in seen_sets:
                seen_sets.add(key)
                bicubic = BenchModel(name='Bicubic', scale=model.scale, dataset_opt=test_set.dataset_opt,
                                     source='imresize')
                for row in evaluate(bicubic, None, dev, test_set, chosen, with_niqe='niqe' in optional, lpips=lpips,
                                    progress=progress):
                    rows.append(row)
                    logger.info(f'bench: Bicubic on {row.test_set} x{model.scale} ({row.protocol}): '
                                f'{row.psnr:.4f} dB, {row.ssim:.4f}')
            moe = expert_maps and isinstance(net, MFGHMoEArch) and net.moe
            maps_dir = out / 'expert_maps' / model.name / test_set.name if moe else None
            for row in evaluate(model, net, dev, test_set, chosen, with_niqe='niqe' in optional, lpips=lpips,
                                maps_dir=maps_dir, progress=progress):
                for name, value in cost.items():
                    setattr(row, name, value)
                rows.append(row)
                logger.info(f'bench: {model.name} on {row.test_set} x{model.scale} ({row.protocol}): '
                            f'{row.psnr:.4f} dB, {row.ssim:.4f}')
    rows = ordered(rows)
    write_tables(rows, out, optional)
    plot_psnr_latency(rows, out / 'bench_psnr_latency.png')
    if per_class:
        write_per_class(rows, out / 'bench_per_class.csv')
    logger.info(f'bench: tables in {out}:\n' + (out / 'bench.md').read_text())
    return rows


def ordered(rows: List[BenchRow]) -> List[BenchRow]:
    """Rows grouped by protocol (in the order asked), then test set and scale (in order of first appearance);
    bicubic first in each group, the models in the order given."""
    protocols = list(dict.fromkeys(r.protocol for r in rows))
    tables = list(dict.fromkeys((r.test_set, r.model.scale) for r in rows))
    return sorted(rows, key=lambda r: (protocols.index(r.protocol), tables.index((r.test_set, r.model.scale)),
                                       r.model.name != 'Bicubic'))
