"""Torch's CPU threads: the time of a tiny training step and of a paper-size forward at 1 and at 2 threads.

Both settings run in this one process, in alternation (each round times every workload at every thread count,
the order of the thread counts reversed every other round), so that they see the same machine; the table gives
the median and the spread (lowest to highest) over ``--repeats`` rounds after ``--warmup`` untimed ones, and the
ratios time at the first thread count / time at the second, per round (median and spread): above 1 the second
count is faster. Workloads (``--workloads``):

- ``tiny_step``: one training step (forward, L1 loss, backward, Adam step) of the network of
  ``benchmarks/bench_quality.py``'s ``tiny`` preset (``options/train_ucm_x4.yml`` with embed_dim 24, depths
  [2, 2], heads [4, 4], window 8) on its batch: 4 LR patches of 16x16 (GT 64x64), x4;
- ``paper_forward``: an eval-mode forward without gradients of the paper-size MFGHMoEArch on one
  ``--size``x``--size`` LR image, x4.

``--busy N`` imitates a loaded machine: N background processes each keep one core busy (a Python loop), started
before the first round and stopped after the last; each also ends by itself after ``--busy-limit`` seconds.
The one-minute load average is printed before and after.

Usage: ``python benchmarks/bench_threads.py [--repeats 7] [--warmup 1] [--busy N] [--threads 1 2] [--size 64]``.
It prints a table and the ratios; it asserts nothing.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from contextlib import contextmanager
from typing import Callable, Dict, Iterator, List, Tuple

import torch
import torch.nn.functional as F
from bench_quality import PRESETS, REPO

from hmoe_arch import MFGHMoEArch
from hmoe_arch.options import apply_force_yml, read_option_file

from common import build

WORKLOADS = ('tiny_step', 'paper_forward')
SPIN = 'import time\nend = time.monotonic() + {limit}\nwhile time.monotonic() < end:\n    pass\n'
"""The program of one ``--busy`` process: a busy loop that ends by itself after ``limit`` seconds."""


def tiny_step(scale: int) -> Tuple[Callable[[], None], str]:
    """One training step of the ``tiny`` preset's network on a random batch of the preset's size, and its
    description."""
    opt = read_option_file(REPO / 'options' / 'train_ucm_x4.yml')
    for key, value in PRESETS['tiny'].items():
        apply_force_yml(opt, f'{key}={json.dumps(value)}')
    network = {key: value for key, value in opt['network_g'].items() if key != 'type'}
    torch.manual_seed(0)
    net = MFGHMoEArch(**{**network, 'upscale': scale}).train()
    optimizer = torch.optim.Adam(net.parameters(), lr=2e-4)
    gt_size, batch = opt['datasets']['train']['gt_size'], opt['datasets']['train']['batch_size_per_gpu']
    lq = torch.rand(batch, 3, gt_size // scale, gt_size // scale)
    gt = torch.rand(batch, 3, gt_size, gt_size)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        F.l1_loss(net(lq), gt).backward()
        optimizer.step()

    return step, f'tiny_step: bench_quality tiny preset, {batch}x{gt_size // scale}^2 LR, x{scale}'


def paper_forward(size: int, scale: int) -> Tuple[Callable[[], None], str]:
    """An eval forward without gradients of the paper-size network on one ``size`` x ``size`` LR image, and its
    description."""
    net = build('moe', scale, 'cpu').eval()
    lq = torch.rand(1, 3, size, size)

    def forward() -> None:
        with torch.no_grad():
            net(lq)

    return forward, f'paper_forward: paper size, 1x{size}^2 LR, x{scale}'


@contextmanager
def busy_cores(count: int, limit: float) -> Iterator[None]:
    """``count`` processes that each keep a core busy, for at most ``limit`` seconds; stopped on exit."""
    processes = [subprocess.Popen([sys.executable, '-c', SPIN.format(limit=limit)]) for _ in range(count)]
    try:
        yield
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            process.wait()


def measure(workloads: Dict[str, Callable[[], None]], threads: Tuple[int, int], repeats: int,
            warmup: int) -> Dict[Tuple[str, int], List[float]]:
    """Seconds per call of every (workload, thread count), ``repeats`` rounds after ``warmup`` untimed ones."""
    times: Dict[Tuple[str, int], List[float]] = {(name, n): [] for name in workloads for n in threads}
    for round_index in range(warmup + repeats):
        order = threads if round_index % 2 == 0 else threads[::-1]
        for name, run in workloads.items():
            for n in order:
                torch.set_num_threads(n)
                start = time.perf_counter()
                run()
                elapsed = time.perf_counter() - start
                if round_index >= warmup:
                    times[name, n].append(elapsed)
    return times


def spread(values: List[float], unit: float = 1.0, digits: int = 1) -> str:
    return f'{min(values) * unit:.{digits}f}-{max(values) * unit:.{digits}f}'


def format_table(times: Dict[Tuple[str, int], List[float]], threads: Tuple[int, int]) -> str:
    """Markdown table (median and spread in ms per workload and thread count), then the per-round ratios."""
    lines = ['| workload | threads | median (ms) | lowest-highest (ms) |', '| --- | --- | --- | --- |']
    for (name, n), values in times.items():
        lines.append(f'| {name} | {n} | {statistics.median(values) * 1e3:.1f} | {spread(values, 1e3)} |')
    ratios = []
    for name in dict.fromkeys(name for name, _ in times):
        per_round = [a / b for a, b in zip(times[name, threads[0]], times[name, threads[1]])]
        ratios.append(f'{name} {statistics.median(per_round):.2f}x ({spread(per_round, digits=2)})')
    lines += ['', f'{threads[0]}-thread / {threads[1]}-thread time, median of the rounds (lowest-highest): '
              + ', '.join(ratios)]
    return '\n'.join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--repeats', type=int, default=7, help='timed rounds')
    parser.add_argument('--warmup', type=int, default=1, help='untimed rounds first')
    parser.add_argument('--threads', type=int, nargs=2, default=[1, 2], metavar=('A', 'B'),
                        help='the two thread counts compared (ratio: time at A / time at B)')
    parser.add_argument('--workloads', nargs='+', choices=WORKLOADS, default=list(WORKLOADS))
    parser.add_argument('--size', type=int, default=64, help='LR side of paper_forward')
    parser.add_argument('--scale', type=int, default=4)
    parser.add_argument('--busy', type=int, default=0, metavar='N', help='background processes keeping N cores busy')
    parser.add_argument('--busy-limit', type=float, default=600.0, metavar='S',
                        help='seconds after which each busy process ends by itself')
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.warmup < 0 or min(args.threads) < 1 or args.busy < 0 or args.busy_limit <= 0:
        parser.error('--repeats and --threads must be >= 1, --warmup and --busy >= 0, --busy-limit > 0')
    threads = tuple(args.threads)
    built = {name: tiny_step(args.scale) if name == 'tiny_step' else paper_forward(args.size, args.scale)
             for name in args.workloads}
    workloads = {name: run for name, (run, _) in built.items()}
    load_before = os.getloadavg()[0]
    with busy_cores(args.busy, args.busy_limit):
        times = measure(workloads, threads, args.repeats, args.warmup)
    load_after = os.getloadavg()[0]
    cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()
    print(f'CPU threads {threads[0]} vs {threads[1]}: {cores} usable cores, {args.busy} kept busy by this script, '
          f'load average {load_before:.1f} before and {load_after:.1f} after; '
          + '; '.join(label for _, label in built.values())
          + f'; torch {torch.__version__}; {args.repeats} rounds after {args.warmup}, in alternation')
    print()
    print(format_table(times, threads))


if __name__ == '__main__':
    main()
