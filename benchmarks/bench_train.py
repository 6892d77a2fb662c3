"""Training step time and peak memory: exact HAT, MFGHMoEArch, and MFGHMoEArch with the authors' dense experts.

Each (configuration, mode) runs in its own process: one training step = forward, L1 loss, backward, Adam
step on a random batch. Modes: ``fp32`` (eager), ``bf16`` (autocast, routing in fp32) and ``compile``
(``torch.compile``, fp32). ``moe_dense`` replaces the sparse dispatch by the authors' evaluation (every expert
on every pixel, masked by the routing weights); it exists only in the benchmarks. Ratios are against the
HAT fp32 eager row of the same run.

Usage: ``python benchmarks/bench_train.py [--device cuda] [--batch 4] [--size 64] [--modes fp32 bf16 compile]``.
On CUDA the default is the paper-size network at 4x64^2 (x4); on the CPU a small one (``--tiny``: embed 60,
depths [2, 2], window 8) at 2x32^2 so that CI can run it. It asserts nothing.
"""
import argparse
import json
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from common import KINDS, build, device_label, network_label
from hmoe_arch.bench import fix_malloc_threshold, peak_memory_mib

MODES = ('fp32', 'bf16', 'compile')


def worker(config: str, mode: str, args: argparse.Namespace) -> dict:
    fix_malloc_threshold()
    device = torch.device(args.device)
    net = build(config, args.scale, args.device, tiny=args.tiny).train()
    runner = torch.compile(net) if mode == 'compile' else net
    optimizer = torch.optim.Adam(net.parameters(), lr=2e-4)
    lq = torch.rand(args.batch, 3, args.size, args.size, device=device)
    gt = torch.rand(args.batch, 3, args.size * args.scale, args.size * args.scale, device=device)
    amp = mode == 'bf16'

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=amp):
            out = runner(lq)
        F.l1_loss(out.float(), gt).backward()
        optimizer.step()

    for _ in range(args.warmup):
        step()
    times = []
    for _ in range(args.steps):
        if device.type == 'cuda':
            torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        if device.type == 'cuda':
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return {'step_s': statistics.median(times), 'peak_mib': peak_memory_mib(step, device)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--device', default='cpu')
    parser.add_argument('--batch', type=int)
    parser.add_argument('--size', type=int, help='LR patch side')
    parser.add_argument('--scale', type=int, default=4)
    parser.add_argument('--steps', type=int, default=5)
    parser.add_argument('--warmup', type=int, default=2)
    parser.add_argument('--configs', nargs='+', choices=KINDS, default=list(KINDS))
    parser.add_argument('--modes', nargs='+', choices=MODES, default=list(MODES))
    parser.add_argument('--tiny', action=argparse.BooleanOptionalAction, default=None,
                        help='small network (default on CPU)')
    parser.add_argument('--worker', nargs=2, metavar=('CONFIG', 'MODE'), help=argparse.SUPPRESS)
    args = parser.parse_args()
    cuda = args.device.startswith('cuda')
    if args.tiny is None:
        args.tiny = not cuda
    args.batch = args.batch or (4 if cuda else 2)
    args.size = args.size or (64 if cuda else 32)
    if args.worker:
        print(json.dumps(worker(*args.worker, args)))
        return

    results = {}
    for config in args.configs:
        for mode in args.modes:
            command = [sys.executable, __file__, '--worker', config, mode, '--device', args.device, '--batch',
                       str(args.batch), '--size', str(args.size), '--scale', str(args.scale), '--steps',
                       str(args.steps), '--warmup', str(args.warmup), '--tiny' if args.tiny else '--no-tiny']
            result = subprocess.run(command, capture_output=True, text=True)
            if result.returncode:
                raise SystemExit(f'{config} {mode} failed:\n{result.stderr[-3000:]}')
            results[config, mode] = json.loads(result.stdout.strip().splitlines()[-1])

    print(f'training step, batch {args.batch}x{args.size}^2 LR, x{args.scale}, {network_label(args.tiny)}, '
          f'{device_label(args.device)}, torch {torch.__version__}; median of {args.steps} steps after {args.warmup}')
    print()
    base = results.get(('hat', 'fp32'))
    print('| network | mode | step (ms) | time vs HAT fp32 | peak (MiB) | memory vs HAT fp32 |')
    print('| --- | --- | --- | --- | --- | --- |')
    for (config, mode), row in results.items():
        ratio_t = f'{row["step_s"] / base["step_s"]:.3f}x' if base else '-'
        ratio_m = f'{row["peak_mib"] / base["peak_mib"]:.3f}x' if base else '-'
        print(f'| {config} | {mode} | {row["step_s"] * 1e3:.1f} | {ratio_t} | {row["peak_mib"]:.1f} | {ratio_m} |')


if __name__ == '__main__':
    main()
