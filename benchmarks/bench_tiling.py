"""Bounded-memory inference: peak memory of tiled x4 inference against the LR size, and the seam error.

For each LR size (default 256, 512, 1024), one subprocess runs ``hmoe_arch.tiling.tiled_forward`` with a
fixed tile and reports its peak memory: on CUDA the device's ``max_memory_allocated`` above the model, with
the output assembled on the CPU, so only tiles live on the device; on the CPU the rise of the peak resident
set, shown with the output's own size subtracted (the working memory). Then, in this process, the seam
error: tiled vs whole-image output on an image that fits.

Then the host memory of ``basicsr infer`` on plain images (``--infer-sizes``, default 256 to 2048 LR): one
subprocess per size runs :func:`hmoe_arch.commands.infer.super_resolve_image` with infer's defaults (tile 256, pad 32,
block 1024) and reports the rise of its peak resident set against the size of the uint8 output it returns.

Usage: ``python benchmarks/bench_tiling.py [--device cuda] [--sizes 256 512 1024] [--tile 64]
[--tile-pad 16] [--tiny] [--infer-sizes 256 512 1024 2048]``. ``--tiny`` (the default on CPU) uses a small
network (embed 60, depths [2, 2], window 8) so that 1024^2 LR finishes in minutes; on CUDA the default is the
paper-size network. It asserts nothing.
"""
import argparse
import json
import subprocess
import sys

import torch

from hmoe_arch.commands.bench import fix_malloc_threshold, peak_memory_mib
from hmoe_arch.tiling import padded_forward, tiled_forward

from common import build, device_label, network_label


def worker(args: argparse.Namespace) -> dict:
    fix_malloc_threshold()
    device = torch.device(args.device)
    net = build('moe', args.scale, args.device, tiny=args.tiny).eval()
    x = torch.rand(1, 3, args.worker_size, args.worker_size, device=device)
    output_device = torch.device('cpu')

    def run() -> None:
        with torch.no_grad():
            tiled_forward(net, x, args.scale, net.window_size, args.tile, args.tile_pad, output_device)

    run_small = torch.rand(1, 3, args.tile, args.tile, device=device)
    with torch.no_grad():
        net(run_small)  # first-call allocations are not the tiling's
    peak = peak_memory_mib(run, device)
    output_mib = 3 * (args.worker_size * args.scale) ** 2 * 4 / 2**20
    return {'peak_mib': peak, 'output_mib': output_mib}


def infer_worker(args: argparse.Namespace) -> dict:
    import numpy as np

    from hmoe_arch.commands.infer import super_resolve_image
    fix_malloc_threshold()
    device = torch.device(args.device)
    net = build('moe', args.scale, args.device, tiny=args.tiny).eval()
    lr = np.random.default_rng(0).random((args.infer_worker_size, args.infer_worker_size, 3), dtype=np.float32)
    with torch.no_grad():
        net(torch.rand(1, 3, 64, 64, device=device))  # first-call allocations are not the assembly's
    result = {}

    def run() -> None:
        result['out'] = super_resolve_image(net, lr, scale=args.scale, window=net.window_size, tile=256, tile_pad=32,
                                            block=1024, device=device)

    peak = peak_memory_mib(run, torch.device('cpu'))
    return {'peak_mib': peak, 'output_mib': result['out'].nbytes / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--device', default='cpu')
    parser.add_argument('--scale', type=int, default=4)
    parser.add_argument('--sizes', type=int, nargs='+', default=[256, 512, 1024])
    parser.add_argument('--tile', type=int, default=64)
    parser.add_argument('--tile-pad', type=int, default=16)
    parser.add_argument('--tiny', action=argparse.BooleanOptionalAction, default=None,
                        help='small network (default on CPU)')
    parser.add_argument('--seam-size', type=int, default=128, help='LR side of the seam-error image')
    parser.add_argument('--worker-size', type=int, help=argparse.SUPPRESS)
    parser.add_argument('--infer-sizes', type=int, nargs='*', default=[256, 512, 1024, 2048],
                        help='LR sides for the host-memory table of basicsr infer (none: skip it)')
    parser.add_argument('--infer-worker-size', type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.tiny is None:
        args.tiny = not args.device.startswith('cuda')
    if args.worker_size:
        print(json.dumps(worker(args)))
        return
    if args.infer_worker_size:
        print(json.dumps(infer_worker(args)))
        return

    rows = []
    for size in args.sizes:
        command = [sys.executable, __file__, '--device', args.device, '--scale', str(args.scale), '--tile',
                   str(args.tile), '--tile-pad', str(args.tile_pad), '--worker-size', str(size),
                   '--tiny' if args.tiny else '--no-tiny']
        result = subprocess.run(command, capture_output=True, text=True, check=True)
        rows.append((size, json.loads(result.stdout.strip().splitlines()[-1])))

    net = build('moe', args.scale, args.device, tiny=args.tiny).eval()
    x = torch.rand(1, 3, args.seam_size, args.seam_size, device=args.device)
    with torch.no_grad():
        whole = padded_forward(net, x, args.scale, net.window_size)
        tiled = tiled_forward(net, x, args.scale, net.window_size, args.tile, args.tile_pad)
    gap = (whole - tiled).abs()

    print(f'tiled x{args.scale} inference, tile {args.tile} + pad {args.tile_pad}, {network_label(args.tiny)}, '
          f'{device_label(args.device)}, torch {torch.__version__}')
    print()
    print('| LR size | peak (MiB) | output (MiB) | peak - output (MiB) |')
    print('| --- | --- | --- | --- |')
    for size, row in rows:
        on_host = not args.device.startswith('cuda')
        working = row['peak_mib'] - row['output_mib'] if on_host else row['peak_mib']
        print(f'| {size}x{size} | {row["peak_mib"]:.1f} | {row["output_mib"]:.1f} | {working:.1f} |')
    print()
    print(f'seam error on {args.seam_size}x{args.seam_size} LR (tiled vs whole image, values in [0, 1]): mean '
          f'{gap.mean().item():.2e}, max {gap.max().item():.2e}')
    if not args.infer_sizes:
        return
    print()
    print(f'basicsr infer, plain images, x{args.scale} (tile 256, pad 32, block 1024): host memory')
    print()
    print('| LR size | peak rise (MiB) | uint8 output (MiB) | peak / output |')
    print('| --- | --- | --- | --- |')
    for size in args.infer_sizes:
        command = [sys.executable, __file__, '--device', args.device, '--scale', str(args.scale),
                   '--infer-worker-size', str(size), '--tiny' if args.tiny else '--no-tiny']
        result = subprocess.run(command, capture_output=True, text=True, check=True)
        row = json.loads(result.stdout.strip().splitlines()[-1])
        print(f'| {size}x{size} | {row["peak_mib"]:.1f} | {row["output_mib"]:.1f} | '
              f'{row["peak_mib"] / row["output_mib"]:.2f} |', flush=True)


if __name__ == '__main__':
    main()
