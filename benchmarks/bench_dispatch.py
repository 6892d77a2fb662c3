"""Sparse against dense expert evaluation of the DR-HMoE upsampler, by size: is there a crossover?

The upsampler (``MFGHMoEArch``'s default head: 64 features, x4, 8 experts 1x1 + 8 experts 3x3, dual routing, top-1)
runs on random features of ``--sizes`` LR squares (batch ``--batch``) two ways on the same weights: sparse
(``HeterogeneousMoE.dispatch``: each pixel by its expert only, this project's default) and dense (``dense = True``,
the authors' computation: all 16 experts on every pixel, masked). The routing is forced to the 3x3 group for every
pixel (its group router's bias), spread over that group's experts by their router: the dearest routing for the
sparse side, while the dense side costs the same whatever the routing. So where sparse wins here, it wins for every
routing. Both measures alternate in one process, the order reversed every round: ``infer`` (eval forward without
autograd) and ``train`` (forward and backward to the features and every parameter). Prints a Markdown table:
median milliseconds of each side, the median of the per-round ratios dense / sparse and their range. Outputs of the
two sides are compared first (largest difference printed). It asserts nothing.

    OMP_NUM_THREADS=1 python benchmarks/bench_dispatch.py --sizes 2 4 8 16 32 64 --rounds 7
"""
import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from hmoe_arch import MFGHMoEArch  # noqa: E402
from hmoe_arch.archs.experts import MoEUpsampler  # noqa: E402

from common import device_label  # noqa: E402

FORCED_LOGIT = 1e3
"""Group-router bias that sends every pixel to the 3x3 group."""


def default_upsampler(scale: int) -> MoEUpsampler:
    """The head ``MFGHMoEArch`` builds by default (a small backbone; only the head is used), with every pixel sent
    to the 3x3 group."""
    torch.manual_seed(0)
    net = MFGHMoEArch(upscale=scale, embed_dim=24, depths=[1], num_heads=[4], window_size=8, squeeze_factor=8)
    head = net.upsample
    groups = head.moe.expert_groups
    heavy = max(range(len(groups)), key=lambda g: groups[g][0])
    with torch.no_grad():
        bias = torch.full((len(groups),), -FORCED_LOGIT)
        bias[heavy] = FORCED_LOGIT
        head.moe.gate.w_group_gate.bias.copy_(bias)
    return head


def timed(step: Callable[[], None]) -> float:
    start = time.perf_counter()
    step()
    return time.perf_counter() - start


def measure(head: MoEUpsampler, size: int, batch: int, rounds: int, warmup: int) -> Dict[str, List[float]]:
    """Seconds per round of each side and measure at one LR size."""
    generator = torch.Generator().manual_seed(size)
    channels = head.moe.channels
    x = torch.randn(batch, channels, size, size, generator=generator)
    features = torch.randn(batch, channels, size, size, generator=generator)

    def infer(dense: bool) -> Callable[[], None]:
        def run() -> None:
            head.moe.dense = dense
            head.eval()
            with torch.no_grad():
                head(x, features)
        return run

    def train(dense: bool) -> Callable[[], None]:
        def run() -> None:
            head.moe.dense = dense
            head.train()
            inputs = x.detach().requires_grad_()
            head.zero_grad(set_to_none=True)
            head(inputs, features).square().mean().backward()
        return run

    steps = {('infer', 'sparse'): infer(False), ('infer', 'dense'): infer(True),
             ('train', 'sparse'): train(False), ('train', 'dense'): train(True)}
    times: Dict[str, List[float]] = {f'{what} {side}': [] for what, side in steps}
    order = list(steps.items())
    for r in range(rounds + warmup):
        for (what, side), step in (order if r % 2 == 0 else order[::-1]):
            seconds = timed(step)
            if r >= warmup:
                times[f'{what} {side}'].append(seconds)
    return times


def largest_difference(head: MoEUpsampler, size: int, batch: int) -> float:
    x = torch.randn(batch, head.moe.channels, size, size)
    features = torch.randn(batch, head.moe.channels, size, size)
    head.eval()
    with torch.no_grad():
        head.moe.dense = False
        sparse = head(x, features)
        head.moe.dense = True
        dense = head(x, features)
    head.moe.dense = False
    return float((sparse - dense).abs().max())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--sizes', type=int, nargs='+', default=[2, 4, 8, 16, 32, 64], help='LR sides')
    parser.add_argument('--batch', type=int, default=1)
    parser.add_argument('--scale', type=int, default=4)
    parser.add_argument('--rounds', type=int, default=7)
    parser.add_argument('--warmup', type=int, default=2, help='rounds not counted')
    args = parser.parse_args()
    if min(args.sizes) < 1 or args.batch < 1 or args.rounds < 1 or args.warmup < 0:
        parser.error('--sizes and --batch must be positive, --rounds at least 1, --warmup at least 0')
    head = default_upsampler(args.scale)
    groups = ', '.join(f'{count} x {k}x{k}' for k, count in head.moe.expert_groups)
    print(f'DR-HMoE upsampler ({head.moe.channels} features, x{args.scale}, experts {groups}), every pixel routed to '
          f'the 3x3 group; batch {args.batch}; {device_label("cpu")}, torch {torch.__version__}; {args.rounds} rounds '
          f'after {args.warmup}, sides alternating\n')
    print('| LR size | pixels | 3x3 experts used | largest difference | infer sparse (ms) | infer dense (ms) '
          '| infer dense / sparse (range) | train sparse (ms) | train dense (ms) | train dense / sparse (range) |')
    print('| --- | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: | --- |')
    for size in args.sizes:
        difference = largest_difference(head, size, args.batch)
        used = len(head.moe.last_routing.expert.unique())
        times = measure(head, size, args.batch, args.rounds, args.warmup)
        cells = []
        for what in ('infer', 'train'):
            sparse, dense = times[f'{what} sparse'], times[f'{what} dense']
            ratios = [d / s for d, s in zip(dense, sparse)]
            cells.append(f'{1e3 * statistics.median(sparse):.2f} | {1e3 * statistics.median(dense):.2f} | '
                         f'{statistics.median(ratios):.2f}x ({min(ratios):.2f} - {max(ratios):.2f})')
        print(f'| {size}x{size} | {args.batch * size * size} | {used} | {difference:.1e} | {cells[0]} | {cells[1]} |',
              flush=True)


if __name__ == '__main__':
    main()
