"""CPU training step with attention through ``scaled_dot_product_attention`` everywhere (before) against the
rule of :func:`hmoe_arch.archs.hat_blocks.fused_kernel_applies` (after: the explicit computation where the
relative position bias needs a gradient, since PyTorch's CPU kernel has no mask gradient and falls back to an
unfused path).

One process, one network, the same weights and batch for both sides; steps alternate before/after, so load on a
shared machine hits both alike. A step is forward, L1 loss, backward and an Adam step (the optimiser's state is
kept per side). Prints the median step of each side, the ratio of the medians and the spread of the per-round
ratios (min, median, max). The outputs and gradients of the two paths agree to float rounding
(``tests/test_hat_blocks.py``). It asserts nothing.

Usage::

    OMP_NUM_THREADS=1 python benchmarks/bench_attention_path.py --size tiny --rounds 30
    OMP_NUM_THREADS=2 python benchmarks/bench_attention_path.py --size paper --batch 1 --lr-size 64 --rounds 6
"""
import argparse
import copy
import statistics
import time
from typing import Callable, Dict, List

import torch
import torch.nn.functional as F

from hmoe_arch import MFGHMoEArch
from hmoe_arch.archs import hat_blocks

SIZES = {
    'tiny': dict(embed_dim=24, depths=[2, 2], num_heads=[4, 4], window_size=8, squeeze_factor=8),  # bench_quality
    'paper': {},
}
"""``tiny``: the quality study's network; ``paper``: MFGHMoEArch's defaults (the paper's)."""


def step_function(net: torch.nn.Module, lq: torch.Tensor, gt: torch.Tensor) -> Callable[[], float]:
    optimizer = torch.optim.Adam(net.parameters(), lr=2e-4)

    def step() -> float:
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        output = net(lq)
        F.l1_loss(output[0] if isinstance(output, tuple) else output, gt).backward()
        optimizer.step()
        return time.perf_counter() - start
    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--size', choices=sorted(SIZES), default='tiny')
    parser.add_argument('--batch', type=int, default=4)
    parser.add_argument('--lr-size', type=int, default=16, help='LR patch side (the study: 16 = 64 / 4)')
    parser.add_argument('--rounds', type=int, default=30, help='alternations; the first two are warm-up')
    parser.add_argument('--moe', choices=('moe', 'hat'), default='moe', help='MFG-HMoE or the HAT configuration')
    args = parser.parse_args()

    torch.manual_seed(0)
    options = dict(upscale=4, **SIZES[args.size])
    if args.moe == 'hat':
        options.update(moe=False, mfa=False)
    base = MFGHMoEArch(**options).train()
    nets = {'before': base, 'after': copy.deepcopy(base)}
    lq = torch.rand(args.batch, 3, args.lr_size, args.lr_size)
    gt = torch.rand(args.batch, 3, 4 * args.lr_size, 4 * args.lr_size)
    steps = {side: step_function(net, lq, gt) for side, net in nets.items()}
    rule = hat_blocks.fused_kernel_applies
    rules = {'before': lambda q, bias: True, 'after': rule}
    times: Dict[str, List[float]] = {side: [] for side in steps}
    try:
        for _ in range(args.rounds):
            for side, step in steps.items():
                hat_blocks.fused_kernel_applies = rules[side]
                times[side].append(step())
    finally:
        hat_blocks.fused_kernel_applies = rule
    kept = {side: values[2:] for side, values in times.items()}
    ratios = [a / b for a, b in zip(kept['after'], kept['before'])]
    print(f'{args.size} {args.moe}, batch {args.batch} x {args.lr_size}^2 LR, CPU {torch.get_num_threads()} '
          f'thread(s), {len(ratios)} rounds after 2 warm-up, torch {torch.__version__}')
    for side, values in kept.items():
        print(f'  {side:6s} median step {1000 * statistics.median(values):8.1f} ms')
    print(f'  after / before: {statistics.median(kept["after"]) / statistics.median(kept["before"]):.3f} '
          f'(per round: min {min(ratios):.3f}, median {statistics.median(ratios):.3f}, max {max(ratios):.3f})')


if __name__ == '__main__':
    main()
