"""MFGHMoEArch against the exact HAT configuration on the same input, in one process.

Measures (eval mode, no grad, median of ``--runs`` after ``--warmup``, the models timed in alternation;
the heads at least 20 runs):

- full forward time of MFGHMoEArch (paper configuration) / HAT;
- MoE head (``upsample``: routers + sparse experts + PixelShuffle) / HAT's upsampler, both on the same
  ``conv_before_upsample`` features; the authors' dense evaluation of the same experts is shown for reference;
- peak memory of one forward, each model in its own subprocess: on CUDA ``max_memory_allocated``, on the CPU
  the rise of the process's peak resident set (VmHWM, reset through ``/proc/self/clear_refs``) over the
  resident set before the forward, with glibc's mmap threshold fixed at 64 KiB so that freed tensors leave
  the resident set (``hmoe_arch.commands.bench.peak_memory_mib``; repeatable to within 0.1 MiB).

Usage: ``python benchmarks/bench_arch.py [--device cuda] [--size 64] [--scale 4] [--runs 5]
[--attention sdpa|plain]``.
It prints a table of times and ratios; it asserts nothing.
"""
import argparse
import json
import statistics
import subprocess
import sys
import time
from typing import Callable, Dict

import torch

from hmoe_arch import MFGHMoEArch
from hmoe_arch.commands.bench import fix_malloc_threshold, forward_peak_mib

from common import build, device_label


def synchronize(device: str) -> None:
    if device.startswith('cuda'):
        torch.cuda.synchronize()


def paired_medians(fns: Dict[str, Callable[[], object]], device: str, runs: int, warmup: int
                   ) -> Dict[str, float]:
    """Median seconds of each function, timed in alternation so that drift of the machine hits all alike."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: Dict[str, list] = {name: [] for name in fns}
    for _ in range(runs):
        for name, fn in fns.items():
            synchronize(device)
            start = time.perf_counter()
            fn()
            synchronize(device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def head_inputs(net: MFGHMoEArch, x: torch.Tensor) -> Dict[str, torch.Tensor]:
    """The inputs the upsampler sees in a forward of ``net`` on ``x``."""
    seen: Dict[str, torch.Tensor] = {}

    def keep(module, inputs, output) -> None:
        seen['feat'] = inputs[0]
        if len(inputs) > 1:
            seen['routing'] = inputs[1]

    handle = net.upsample.register_forward_hook(keep)
    net(x)
    handle.remove()
    return seen


def memory_worker(kind: str, args: argparse.Namespace) -> Dict[str, float]:
    """Peak memory of one forward of ``kind`` in this process (MiB)."""
    fix_malloc_threshold()
    device = torch.device(args.device)
    net = build(kind, args.scale, args.device, attention=args.attention).eval()
    return {'peak_mib': forward_peak_mib(net, args.size, device)}


def measure_memory(kind: str, args: argparse.Namespace) -> float:
    command = [sys.executable, __file__, '--memory-worker', kind, '--device', args.device, '--size',
               str(args.size), '--scale', str(args.scale), '--attention', args.attention]
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])['peak_mib']


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--device', default='cpu')
    parser.add_argument('--size', type=int, default=64, help='LR height and width (multiple of 16)')
    parser.add_argument('--scale', type=int, default=4)
    parser.add_argument('--runs', type=int, default=5)
    parser.add_argument('--warmup', type=int, default=1)
    parser.add_argument('--attention', choices=['sdpa', 'plain'], default='sdpa', help='network_g.attention of both')
    parser.add_argument('--memory-worker', choices=['moe', 'hat'], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_worker:
        print(json.dumps(memory_worker(args.memory_worker, args)))
        return

    moe, hat, dense = (build(kind, args.scale, args.device, attention=args.attention).eval()
                       for kind in ('moe', 'hat', 'moe_dense'))
    x = torch.rand(1, 3, args.size, args.size, device=args.device)
    with torch.no_grad():
        full = paired_medians({'moe': lambda: moe(x), 'hat': lambda: hat(x)}, args.device, args.runs, args.warmup)
        moe_in, hat_in = head_inputs(moe, x), head_inputs(hat, x)
        groups = torch.bincount(moe.routing_maps()['group'].flatten(), minlength=2).tolist()
        head = paired_medians({
            'moe': lambda: moe.upsample(moe_in['feat'], moe_in['routing']),
            'hat': lambda: hat.upsample(hat_in['feat']),
        }, args.device, max(args.runs, 20), args.warmup)
        # timed apart: its large temporaries would slow whatever runs next
        head.update(paired_medians({'dense': lambda: dense.upsample(moe_in['feat'], moe_in['routing'])},
                                   args.device, args.runs, args.warmup))
        sparse_out = moe.upsample(moe_in['feat'], moe_in['routing'])
        dense_gap = (dense.upsample(moe_in['feat'], moe_in['routing']) - sparse_out).abs().max().item()
    m_moe, m_hat = measure_memory('moe', args), measure_memory('hat', args)

    print(f'MFGHMoEArch vs HAT: 1x3x{args.size}x{args.size}, x{args.scale}, embed 180, depths 6x6, window 16, '
          f'attention {args.attention}, eval, {device_label(args.device)}, torch {torch.__version__}; '
          f'median of {args.runs} runs')
    print(f'routing of this input: {groups} pixels per group (kernel sizes '
          f'{[k for k, _ in moe.upsample.moe.expert_groups]}); dense vs sparse max |diff| {dense_gap:.2e}')
    print()
    print('| measure | MFGHMoEArch | HAT | ratio | target |')
    print('| --- | --- | --- | --- | --- |')
    print(f'| full forward (s) | {full["moe"]:.4f} | {full["hat"]:.4f} | {full["moe"] / full["hat"]:.3f}x | '
          '<= 1.05x |')
    print(f'| MoE head vs upsampler (ms) | {head["moe"] * 1e3:.2f} | {head["hat"] * 1e3:.2f} | '
          f'{head["moe"] / head["hat"]:.3f}x | <= 1.0x |')
    print(f'| dense head, the authors\' way (ms) | {head["dense"] * 1e3:.2f} | {head["hat"] * 1e3:.2f} | '
          f'{head["dense"] / head["hat"]:.3f}x | (for reference) |')
    print(f'| peak memory of a forward (MiB) | {m_moe:.1f} | {m_hat:.1f} | {m_moe / m_hat:.3f}x | <= 1.10x |')


if __name__ == '__main__':
    main()
