"""Training step time and peak memory: exact HAT, MFGHMoEArch, and MFGHMoEArch with the authors' dense experts.

Each (configuration, mode) runs in its own process (on the CPU two: one times the steps, one measures the
peak resident set with glibc's mmap threshold fixed, which slowed steps 1.6-2.0x here): one
training step = forward, L1 loss, backward, Adam step on a random batch. Modes (see :data:`MODES`):
``fp32-plain`` is HAT's own computation (fp32, eager, explicit attention that stores its probabilities);
``fp32`` swaps in fused attention (``scaled_dot_product_attention``; on the CPU, where the relative
position bias needs a gradient, the explicit computation: :func:`hmoe_arch.archs.hat_blocks.fused_kernel_applies`);
``bf16`` adds bf16 autocast (routing in fp32); ``compile`` is ``fp32`` under ``torch.compile``. ``moe_dense``
replaces the sparse dispatch by the authors' evaluation (every expert on every pixel, masked by the routing
weights); it exists only in the benchmarks.

Two ratios per row: against the HAT ``fp32-plain`` row (the speed-up of a mode) and against the HAT row of
the same mode (the cost of the MoE at equal settings). A last block prints each network's speed-up of
``bf16`` (fused attention + bf16) over its ``fp32-plain`` row.

Usage: ``python benchmarks/bench_train.py [--device cuda] [--batch 4] [--size 64] [--modes ...] [--configs ...]``.
On CUDA the default is the paper-size network at 4x64^2 (x4); on the CPU a small one (``--tiny``: embed 60,
depths [2, 2], window 8) at 2x32^2 so that CI can run it. It asserts nothing.
"""
import argparse
import json
import statistics
import subprocess
import sys
import time
from typing import Optional

import torch
import torch.nn.functional as F

from hmoe_arch.commands.bench import fix_malloc_threshold, peak_memory_mib

from common import KINDS, build, device_label, network_label

MODES = {
    'fp32-plain': dict(attention='plain', amp=False, compile=False),
    'fp32': dict(attention='sdpa', amp=False, compile=False),
    'bf16': dict(attention='sdpa', amp=True, compile=False),
    'compile': dict(attention='sdpa', amp=False, compile=True),
}
"""Mode name -> attention path, bf16 autocast, ``torch.compile``."""
BASELINE = ('hat', 'fp32-plain')


def worker(config: str, mode: str, measure: str, args: argparse.Namespace) -> dict:
    """Median step time (``measure`` ``time`` or ``both``) and/or peak memory of one step (``memory``,
    ``both``) after ``args.warmup`` steps, at least one (the first allocates Adam's state)."""
    if measure == 'memory':
        fix_malloc_threshold()  # needed for the CPU measure, but slows every large allocation: never when timing
    device = torch.device(args.device)
    setting = MODES[mode]
    net = build(config, args.scale, args.device, tiny=args.tiny, attention=setting['attention']).train()
    runner = torch.compile(net) if setting['compile'] else net
    optimizer = torch.optim.Adam(net.parameters(), lr=2e-4)
    lq = torch.rand(args.batch, 3, args.size, args.size, device=device)
    gt = torch.rand(args.batch, 3, args.size * args.scale, args.size * args.scale, device=device)
    amp = setting['amp']

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=amp):
            out = runner(lq)
        F.l1_loss(out.float(), gt).backward()
        optimizer.step()

    for _ in range(max(args.warmup, 1)):
        step()
    result = {}
    if measure in ('time', 'both'):
        times = []
        for _ in range(args.steps):
            if device.type == 'cuda':
                torch.cuda.synchronize()
            start = time.perf_counter()
            step()
            if device.type == 'cuda':
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        result['step_s'] = statistics.median(times)
    if measure in ('memory', 'both'):
        result['peak_mib'] = peak_memory_mib(step, device)
    return result


def run_worker(config: str, mode: str, measure: str, args: argparse.Namespace) -> dict:
    command = [sys.executable, __file__, '--worker', config, mode, measure, '--device', args.device, '--batch',
               str(args.batch), '--size', str(args.size), '--scale', str(args.scale), '--steps', str(args.steps),
               '--warmup', str(args.warmup), '--tiny' if args.tiny else '--no-tiny']
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode:
        raise SystemExit(f'{config} {mode} ({measure}) failed:\n{result.stderr[-3000:]}')
    return json.loads(result.stdout.strip().splitlines()[-1])


def ratio(value: float, base: Optional[float]) -> str:
    return f'{value / base:.3f}x' if base else '-'


def format_table(results: dict) -> str:
    """Markdown table of ``{(config, mode): {'step_s', 'peak_mib'}}`` with the ratios of the module docstring,
    then the ``bf16`` speed-up over ``fp32-plain`` of every network that ran both."""
    base = results.get(BASELINE, {})
    lines = ['| network | mode | attention | step (ms) | time vs HAT fp32-plain | time vs HAT same mode '
             '| peak (MiB) | memory vs HAT fp32-plain | memory vs HAT same mode |',
             '| --- | --- | --- | --- | --- | --- | --- | --- | --- |']
    for (config, mode), row in results.items():
        same = results.get(('hat', mode), {})
        lines.append(f'| {config} | {mode} | {MODES[mode]["attention"]} | {row["step_s"] * 1e3:.1f} '
                     f'| {ratio(row["step_s"], base.get("step_s"))} | {ratio(row["step_s"], same.get("step_s"))} '
                     f'| {row["peak_mib"]:.1f} | {ratio(row["peak_mib"], base.get("peak_mib"))} '
                     f'| {ratio(row["peak_mib"], same.get("peak_mib"))} |')
    speedups = [f'{config} {plain["step_s"] / results[config, "bf16"]["step_s"]:.2f}x'
                for (config, mode), plain in results.items()
                if mode == 'fp32-plain' and (config, 'bf16') in results]
    if speedups:
        lines += ['', 'bf16 + fused attention vs fp32 eager plain attention (speed-up): ' + ', '.join(speedups)]
    return '\n'.join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--device', default='cpu')
    parser.add_argument('--batch', type=int)
    parser.add_argument('--size', type=int, help='LR patch side')
    parser.add_argument('--scale', type=int, default=4)
    parser.add_argument('--steps', type=int, default=5)
    parser.add_argument('--warmup', type=int, default=2)
    parser.add_argument('--configs', nargs='+', choices=KINDS, default=list(KINDS))
    parser.add_argument('--modes', nargs='+', choices=list(MODES), default=list(MODES))
    parser.add_argument('--tiny', action=argparse.BooleanOptionalAction, default=None,
                        help='small network (default on CPU)')
    parser.add_argument('--worker', nargs=3, metavar=('CONFIG', 'MODE', 'MEASURE'), help=argparse.SUPPRESS)
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
            if cuda:  # CUDA's allocator statistics do not disturb the timing
                results[config, mode] = run_worker(config, mode, 'both', args)
            else:
                results[config, mode] = {**run_worker(config, mode, 'time', args),
                                         **run_worker(config, mode, 'memory', args)}

    print(f'training step, batch {args.batch}x{args.size}^2 LR, x{args.scale}, {network_label(args.tiny)}, '
          f'{device_label(args.device)}, torch {torch.__version__}; median of {args.steps} steps after {args.warmup}')
    print()
    print(format_table(results))


if __name__ == '__main__':
    main()
