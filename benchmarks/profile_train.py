"""Where a training iteration's time goes: BasicSR's own loop pieces (data loader, ``feed_data``,
``optimize_parameters``, learning-rate update) with the model's step split into forward, loss and checks,
backward, optimiser step and routing bookkeeping, then the operators that take the most time (``torch.profiler``).
It also times what a run does now and then, BasicSR's log line (``model.get_current_log()`` and the message logger
``basicsr train`` uses; every ``--log-every`` iterations) and a validation pass over the test images (BasicSR's
loop, without its progress bar; every ``--val-every``, default 250 for both, what ``bench_quality.py``'s study
does), and spreads them over the iterations: what one iteration of a run costs in all.

The model, data loader and options are the ones ``basicsr train`` builds from ``options/train_ucm_x4.yml`` with a
``bench_quality.py`` preset (``tiny``: the quality study's network and batch; ``paper``: the paper's network at
batch 4 x 48^2 LR) and a configuration (``hat`` / ``authors`` / any of ``bench_quality.CONFIGS``). The pieces are
timed by wrapping the model's own methods for the run (nothing in the library changes); the first ``--warmup``
iterations are not counted. Like the ``basicsr`` commands on the CPU, it has glibc keep freed memory
(:func:`hmoe_arch.allocator.keep_freed_memory`).

Usage (prepared data from ``basicsr prepare``)::

    OMP_NUM_THREADS=1 python benchmarks/profile_train.py --data datasets/UCMerced --preset tiny --config authors
    OMP_NUM_THREADS=2 python benchmarks/profile_train.py --data datasets/UCMerced --preset paper --config authors \
        --set use_amp=false datasets:train:batch_size_per_gpu=1 --iters 10 --warmup 2

Prints Markdown tables (milliseconds per iteration, share) and the top operators by self CPU time. It asserts
nothing.
"""
import argparse
import contextlib
import logging
import statistics
import sys
import tempfile
import time
import warnings
from collections import defaultdict
from pathlib import Path
from typing import Callable, Dict, List, Tuple

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from basicsr.data import build_dataloader, build_dataset  # noqa: E402
from basicsr.data.prefetch_dataloader import CPUPrefetcher  # noqa: E402
from basicsr.models import build_model  # noqa: E402
from basicsr.utils import get_root_logger  # noqa: E402
from bench_quality import CONFIGS, option_for  # noqa: E402

from hmoe_arch.allocator import keep_freed_memory  # noqa: E402
from hmoe_arch.commands.pipeline import parse_options  # noqa: E402
from hmoe_arch.training_log import TrainingMessageLogger  # noqa: E402

BASE = Path(__file__).resolve().parents[1] / 'options' / 'train_ucm_x4.yml'
PIECES = ('data', 'feed_data', 'forward', 'loss and checks', 'backward', 'optimiser step', 'routing record',
          'learning rate')


class Timer:
    """Seconds per named piece, summed over the counted iterations."""

    def __init__(self) -> None:
        self.seconds: Dict[str, List[float]] = defaultdict(list)
        self.counting = False

    @contextlib.contextmanager
    def piece(self, name: str):
        start = time.perf_counter()
        yield
        if self.counting:
            self.seconds[name].append(time.perf_counter() - start)

    def wrap(self, name: str, function: Callable) -> Callable:
        def timed(*args, **kwargs):
            with self.piece(name):
                return function(*args, **kwargs)
        return timed


def build(args: argparse.Namespace, folder: Path):
    """The model, training data loader and parsed options ``basicsr train`` would build."""
    changes = dict(change.split('=', 1) for change in args.set)
    opt = option_for(BASE, args.preset, CONFIGS[args.config], data=args.data.resolve(), seed=0, iters=10 ** 6,
                     val_every=10 ** 6, scale=4, study_changes={k: yaml.safe_load(v) for k, v in changes.items()})
    (folder / 'option.yml').write_text(yaml.safe_dump(opt, sort_keys=False))
    namespace = argparse.Namespace(opt=str(folder / 'option.yml'), force_yml=None, launcher='none',
                                   auto_resume=False, debug=False, local_rank=0)
    opt = parse_options(namespace, str(folder), True)
    train = opt['datasets']['train']
    loader = build_dataloader(build_dataset(train), train, num_gpu=0, dist=False, sampler=None, seed=0)
    return build_model(opt), loader, opt


def profile(args: argparse.Namespace) -> None:
    allocator = keep_freed_memory()  # what the basicsr commands do on the CPU
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as folder:
        model, loader, opt = build(args, Path(folder))
    warnings.filterwarnings('ignore', message='Seems like `optimizer.step\\(\\)` has been overridden')  # our timer
    timer = Timer()
    model.feed_data = timer.wrap('feed_data', model.feed_data)
    model.net_g.forward = timer.wrap('forward', model.net_g.forward)
    model.net_g.upsample.forward = timer.wrap('upsampler forward', model.net_g.upsample.forward)
    model.optimizer_g.step = timer.wrap('optimiser step', model.optimizer_g.step)
    model._record_routing = timer.wrap('routing record', model._record_routing)
    backward = torch.Tensor.backward
    torch.Tensor.backward = lambda tensor, *a, **k: timer.wrap('backward', backward)(tensor, *a, **k)
    prefetcher = CPUPrefetcher(loader)

    def iteration(step: int) -> None:
        with timer.piece('data'):
            data = prefetcher.next()
            if data is None:
                prefetcher.reset()
                data = prefetcher.next()
        model.feed_data(data)
        with timer.piece('optimize_parameters'):
            model.optimize_parameters(step)
        with timer.piece('learning rate'):
            model.update_learning_rate(step, warmup_iter=-1)

    try:
        for step in range(1, args.warmup + 1):
            iteration(step)
        timer.counting = True
        start = time.perf_counter()
        for step in range(args.warmup + 1, args.warmup + args.iters + 1):
            with timer.piece('iteration'):
                iteration(step)
        wall = time.perf_counter() - start
        timer.counting = False
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                    record_shapes=args.shapes) as prof:
            for step in range(args.warmup + args.iters + 1, args.warmup + args.iters + 1 + args.profile_iters):
                iteration(step)
    finally:
        torch.Tensor.backward = backward
    last = args.warmup + args.iters + args.profile_iters
    periodic = every_n_iterations(args, model, opt, last) if args.val_every else {}
    report(args, timer, wall, prof, type(model.net_g.upsample).__name__, allocator, periodic)


def every_n_iterations(args: argparse.Namespace, model, opt: Dict, step: int) -> Dict[str, Tuple[float, int, str]]:
    """Seconds of what a run does now and then, each with how often and a few words on it: the log line
    (median of 5, built as BasicSR's loop builds it and written as ``basicsr train`` writes it, to a log file and
    stderr) and a validation pass at iteration ``step`` (median of ``--val-runs``; its routing lines are logged)."""
    logger = get_root_logger()
    level = logger.level
    logger.setLevel(logging.INFO)
    with tempfile.TemporaryDirectory() as folder:
        log_file = logging.FileHandler(Path(folder) / 'train.log')
        logger.addHandler(log_file)
        try:
            messages = TrainingMessageLogger(opt, step, None)
            lines = []
            for _ in range(5):
                start = time.perf_counter()
                log_vars = {'epoch': 0, 'iter': step, 'lrs': model.get_current_learning_rate(), 'time': 0.1,
                            'data_time': 0.001}
                log_vars.update(model.get_current_log())
                messages(log_vars)
                lines.append(time.perf_counter() - start)
            val = opt['datasets']['val']
            dataset = build_dataset(val)
            loader = build_dataloader(dataset, val, num_gpu=0, dist=False, sampler=None, seed=0)
            model.opt['val']['pbar'] = False
            passes = []
            for _ in range(args.val_runs):
                start = time.perf_counter()
                model.nondist_validation(loader, step, None, False)
                passes.append(time.perf_counter() - start)
        finally:
            logger.removeHandler(log_file)
            log_file.close()
            logger.setLevel(level)
    return {'logging': (statistics.median(lines), args.log_every, 'the log line'),
            'validation': (statistics.median(passes), args.val_every,
                           f'{len(dataset)} images, without the progress bar')}


def report(args: argparse.Namespace, timer: Timer, wall: float, prof, upsampler: str, allocator: str,
           periodic: Dict[str, Tuple[float, int, str]]) -> None:
    n = args.iters
    per = {name: sum(values) / n * 1000 for name, values in timer.seconds.items()}
    inside = sum(per.get(name, 0) for name in ('forward', 'backward', 'optimiser step', 'routing record'))
    per['loss and checks'] = per['optimize_parameters'] - inside
    total = statistics.median(timer.seconds['iteration']) * 1000
    mean = per['iteration']
    print(f'## {args.preset} preset, {args.config}, CPU {torch.get_num_threads()} thread(s), torch {torch.__version__}')
    print(f'CPU memory: {allocator}')
    print(f'{n} iterations after {args.warmup} warm-up: {wall:.1f} s, mean {mean:.1f} ms, median {total:.1f} ms\n')
    print('| piece | ms per iteration | share |\n|---|---:|---:|')
    for name in PIECES:
        print(f'| {name} | {per.get(name, 0):.1f} | {100 * per.get(name, 0) / mean:.1f} % |')
        if name == 'forward':
            up = per.get('upsampler forward', 0)
            print(f'| (of which the upsampler, {upsampler}) | {up:.1f} | '
                  f'{100 * up / mean:.1f} % |')
    rest = mean - sum(per.get(name, 0) for name in PIECES)
    print(f'| rest of the loop | {rest:.1f} | {100 * rest / mean:.1f} % |\n')
    if periodic:
        spread = {name: seconds * 1000 / every for name, (seconds, every, _) in periodic.items()}
        whole = mean + sum(spread.values())
        print(f'Over a run that logs every {args.log_every} and validates every {args.val_every} iterations '
              "(bench_quality's study: both 250):\n")
        print('| piece | ms per iteration | share |\n|---|---:|---:|')
        print(f'| training iteration (above) | {mean:.1f} | {100 * mean / whole:.1f} % |')
        for name, (seconds, every, what) in periodic.items():
            print(f'| {name}: {seconds * 1000:.2f} ms every {every} ({what}) | {spread[name]:.2f} | '
                  f'{100 * spread[name] / whole:.1f} % |')
        print(f'| in all | {whole:.1f} | |\n')
    print(f'Top operators by self CPU time ({args.profile_iters} profiled iterations):\n')
    table = prof.key_averages(group_by_input_shape=args.shapes)
    print(table.table(sort_by='self_cpu_time_total', row_limit=args.top, max_name_column_width=48,
                      max_shapes_column_width=80))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--data', type=Path, required=True, help='a tree from basicsr prepare')
    parser.add_argument('--preset', choices=('tiny', 'paper'), default='tiny')
    parser.add_argument('--config', choices=sorted(CONFIGS), default='authors')
    parser.add_argument('--iters', type=int, default=60, help='timed iterations')
    parser.add_argument('--warmup', type=int, default=10)
    parser.add_argument('--profile-iters', type=int, default=10, help='iterations under torch.profiler')
    parser.add_argument('--top', type=int, default=20, help='operators listed')
    parser.add_argument('--shapes', action='store_true', help='list the operators per input shape')
    parser.add_argument('--val-every', type=int, default=250,
                        help='also time the log line and a validation pass, spread over this many iterations '
                             '(0: neither)')
    parser.add_argument('--log-every', type=int, default=None,
                        help='iterations between log lines (default: --val-every, as in the study; '
                             'options/train_ucm_x4.yml: 100)')
    parser.add_argument('--val-runs', type=int, default=1, help='validation passes timed (median)')
    parser.add_argument('--set', nargs='+', default=[], metavar='KEY=VALUE',
                        help="option changes on top of the preset, e.g. use_amp=false (bench_quality's --set)")
    args = parser.parse_args()
    if args.log_every is None:
        args.log_every = args.val_every
    if args.val_every < 0 or (args.val_every and (args.log_every <= 0 or args.val_runs < 1)):
        parser.error('--val-every must be 0 (nothing timed) or a number of iterations, and then --log-every a '
                     'positive number of iterations and --val-runs at least 1')
    if not (args.data / 'Train').is_dir():
        parser.error(f'--data {args.data}: no Train folder (prepare it with basicsr prepare)')
    profile(args)


if __name__ == '__main__':
    main()
