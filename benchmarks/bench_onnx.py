"""ONNX (onnxruntime, CPU) against PyTorch eager for one forward of MFG-HMoE, paper size by default.

Exports the network the way ``basicsr export --format onnx`` does (dense expert evaluation, dynamic sizes), then
times both sides alternately in one process (``--runs`` pairs after one warm-up each) on the same random
``(1, 3, S, S)`` input and prints the medians, the spread and the ratio ONNX / PyTorch. Asserts nothing.

Usage: ``python benchmarks/bench_onnx.py [--size 64] [--runs 7] [--tiny]``
"""
import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from hmoe_arch import MFGHMoEArch
from hmoe_arch.commands.export import export_onnx

from common import TINY, network_label


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--size', type=int, default=64, help='LR side')
    parser.add_argument('--runs', type=int, default=7)
    parser.add_argument('--tiny', action='store_true', help='the small network of the other benchmarks')
    args = parser.parse_args()
    import onnxruntime

    torch.manual_seed(0)
    net = MFGHMoEArch(upscale=4, **(TINY if args.tiny else {})).eval()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / 'model.onnx'
        check = export_onnx(net, net.window_size, path)
        session = onnxruntime.InferenceSession(str(path), providers=['CPUExecutionProvider'])
    x = torch.rand(1, 3, args.size, args.size)
    feed = {'lr': x.numpy()}

    def eager() -> None:
        with torch.no_grad():
            net(x)

    def onnx() -> None:
        session.run(None, feed)

    times = {'PyTorch eager (sparse experts)': [], 'onnxruntime (dense experts)': []}
    for fn in (eager, onnx):
        fn()
    for _ in range(args.runs):
        for name, fn in zip(times, (eager, onnx)):
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    print(f'one forward, {network_label(args.tiny)}, 1x3x{args.size}x{args.size} LR, x4, CPU, '
          f'{torch.get_num_threads()} threads, torch {torch.__version__}, onnxruntime {onnxruntime.__version__}; '
          f'export {check}')
    print()
    print('| runtime | median (s) | min - max (s) |')
    print('| --- | --- | --- |')
    for name, values in times.items():
        print(f'| {name} | {statistics.median(values):.3f} | {min(values):.3f} - {max(values):.3f} |')
    medians = [statistics.median(v) for v in times.values()]
    print()
    print(f'ONNX / PyTorch: {medians[1] / medians[0]:.2f}x')


if __name__ == '__main__':
    main()
