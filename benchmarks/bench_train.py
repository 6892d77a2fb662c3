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

Against other code (``--against``), on the CPU, side by side: this checkout's MFG-HMoE training step and
another code's step, each in its own long-lived process (so both import what they need, and the two never run
at once), step after step in alternation (the order reversed every round), at each of ``--threads``; several
``--against`` sides alternate with ours in one run:

- ``--against hat-code``: HAT's own ``HAT`` network from ``--hat-code`` (default ``../shared/peers/HAT``, its
  ``hat/archs/hat_arch.py``), the paper-size configuration of HAT's x4 option files (``--preset paper``) or the
  quality study's tiny one, with BasicSR's ``SRModel`` optimiser (Adam, as HAT's ``HATModel`` builds it);
- ``--against release``: MFG-HMoE from another checkout of this project (``--release-tree``, e.g.
  ``git worktree add /tmp/release <commit>``), with that checkout's ``MFGHMoEModel`` optimiser;
- ``--against glibc-defaults``: this checkout with glibc's default allocator thresholds, i.e. without
  :func:`hmoe_arch.allocator.keep_freed_memory`.

Ours uses this checkout's ``MFGHMoEModel`` optimiser and, like the ``basicsr`` commands on the CPU,
:func:`hmoe_arch.allocator.keep_freed_memory`; a release does what its own commands do (the same where it has
``hmoe_arch.allocator``, glibc's defaults where it is older); HAT's code and ``glibc-defaults`` keep glibc's
defaults. The table says which sides keep freed memory. A step is forward, L1 loss,
backward and the optimiser step on a random batch (``tiny``: the quality study's 4 x 16^2 LR; ``paper``:
1 x 64^2 LR). Prints a Markdown table: median step of each side, the median of the per-round ratios ours /
theirs and their range.

    python benchmarks/bench_train.py --against hat-code --preset paper --threads 1 2 --rounds 8
    python benchmarks/bench_train.py --against release glibc-defaults --release-tree /tmp/release --preset tiny
"""
import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

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


REPO = Path(__file__).resolve().parents[1]
HAT_CODE = REPO.parent / 'shared' / 'peers' / 'HAT'
SIDE_NETWORKS = {
    'tiny': dict(embed_dim=24, depths=[2, 2], num_heads=[4, 4], window_size=8, squeeze_factor=8),
    'paper': dict(embed_dim=180, depths=[6] * 6, num_heads=[6] * 6, window_size=16, squeeze_factor=30),
}
"""``--against`` networks: the quality study's tiny preset (bench_quality.py) and the paper size; both x4 with
HAT's other settings (compress ratio 3, conv scale 0.01, overlap 0.5, MLP ratio 2, pixelshuffle, 1conv)."""
SIDE_BATCHES = {'tiny': (4, 16), 'paper': (1, 64)}
"""``--against`` batches: (images, LR side)."""
HAT_COMMON = dict(upscale=4, in_chans=3, img_size=64, compress_ratio=3, conv_scale=0.01, overlap_ratio=0.5,
                  img_range=1.0, mlp_ratio=2, upsampler='pixelshuffle', resi_connection='1conv')
"""HAT's x4 option files' network keys other than the size (``SIDE_NETWORKS``)."""
SIDE_NAMES = {'ours': 'ours (this checkout)', 'release': 'release', 'hat-code': "HAT's own code",
              'glibc-defaults': "ours with glibc's defaults"}


def side_network_and_optimizer(side: str, preset: str, code: Optional[Path]):
    """The network and optimiser of one side, built by that side's own code (the seed fixed)."""
    torch.manual_seed(0)
    options = {**HAT_COMMON, **SIDE_NETWORKS[preset]}
    if side == 'hat-code':
        from basicsr.models.sr_model import SRModel  # HATModel's optimiser is SRModel's
        spec = importlib.util.spec_from_file_location('hat_arch_of_hat', code / 'hat' / 'archs' / 'hat_arch.py')
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        net, model = module.HAT(**options), object.__new__(SRModel)
    else:  # this checkout or the release, whichever is first on the path
        from hmoe_arch import MFGHMoEArch
        from hmoe_arch.models.mfghmoe_model import MFGHMoEModel
        net, model = MFGHMoEArch(**options), object.__new__(MFGHMoEModel)
    net.train()
    optimizer = model.get_optimizer('Adam', [p for p in net.parameters() if p.requires_grad], 2e-4,
                                    weight_decay=0, betas=[0.9, 0.99])
    return net, optimizer


def keep_freed_memory_if_there() -> bool:
    """What the ``basicsr`` commands of the checkout first on the path do on the CPU: glibc keeps freed memory
    where that checkout has :func:`hmoe_arch.allocator.keep_freed_memory` (True), else its defaults stay (False)."""
    try:
        from hmoe_arch.allocator import keep_freed_memory
    except ImportError:
        return False
    keep_freed_memory()
    return True


def side_worker(side: str, preset: str, code: Optional[Path], measure: str = 'train') -> None:
    """Build, take one step (Adam's state), answer ``ready``; then time one step per ``step`` line on stdin. With
    ``measure`` ``infer`` a step is an eval-mode forward without autograd on one 64x64 LR image (what validation
    and ``basicsr infer`` do per image)."""
    kept = side in ('ours', 'release') and keep_freed_memory_if_there()
    net, optimizer = side_network_and_optimizer(side, preset, code)
    batch, size = SIDE_BATCHES[preset]
    generator = torch.Generator().manual_seed(1)
    lq = torch.rand(batch, 3, size, size, generator=generator)
    gt = torch.rand(batch, 3, 4 * size, 4 * size, generator=generator)
    image = torch.rand(1, 3, 64, 64, generator=generator)

    def train_step() -> float:
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        F.l1_loss(net(lq), gt).backward()
        optimizer.step()
        return time.perf_counter() - start

    def infer_step() -> float:
        start = time.perf_counter()
        with torch.no_grad():
            net(image)
        return time.perf_counter() - start

    train_step()  # Adam's state, also where only inference is timed
    if measure == 'infer':
        net.eval()
    step = infer_step if measure == 'infer' else train_step
    step()
    print(json.dumps({'ready': type(net).__module__, 'fused': bool(optimizer.defaults.get('fused')),
                      'kept': kept}), flush=True)
    for line in sys.stdin:
        if line.strip() != 'step':
            break
        print(json.dumps({'step_s': step()}), flush=True)


class Side:
    """A side's worker process; :meth:`start` launches it, :meth:`wait_ready` waits until it has built its network
    (so that several start at once)."""

    def __init__(self, side: str, preset: str, threads: int, code: Optional[Path], measure: str) -> None:
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
        path = str(code) if side == 'release' else str(REPO)
        env['PYTHONPATH'] = os.pathsep.join(p for p in (path, env.get('PYTHONPATH')) if p)
        command = [sys.executable, __file__, '--side-worker', side, '--preset', preset, '--measure', measure]
        if code is not None:
            command += ['--code', str(code)]
        self.name = side
        self.info: dict = {}
        self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env,
                                        cwd=REPO)

    def wait_ready(self) -> None:
        self.info = self._answer()

    def _answer(self) -> dict:
        line = self.process.stdout.readline()
        if not line:
            self.process.wait()
            raise SystemExit(f'{self.name} worker failed (exit status {self.process.returncode}); see its stderr '
                             'above')
        return json.loads(line)

    def step(self) -> float:
        self.process.stdin.write('step\n')
        self.process.stdin.flush()
        return self._answer()['step_s']

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait()


def alternate(sides: List[Side], rounds: int, warmup: int) -> Dict[str, List[float]]:
    """Step times per side over ``rounds`` rounds (one step of each side per round, the order reversed every
    round), the first ``warmup`` rounds dropped."""
    times: Dict[str, List[float]] = {side.name: [] for side in sides}
    for r in range(rounds):
        for side in (sides if r % 2 == 0 else sides[::-1]):
            seconds = side.step()
            if r >= warmup:
                times[side.name].append(seconds)
    return times


def check_code(other: str, code: Optional[Path]) -> None:
    """Exit with one line where ``--release-tree`` / ``--hat-code`` is missing or not such a checkout."""
    if other == 'release' and code is None:
        raise SystemExit('--against release needs --release-tree PATH (a checkout of the release, e.g. git '
                         'worktree add /tmp/release <commit>)')
    if code is None:
        return
    marker = code / ('hmoe_arch/__init__.py' if other == 'release' else 'hat/archs/hat_arch.py')
    if not marker.is_file():
        raise SystemExit(f'{marker} is missing: --{"release-tree" if other == "release" else "hat-code"} {code} '
                         'is not such a checkout')


def against(args: argparse.Namespace) -> None:
    codes = {other: {'release': args.release_tree, 'hat-code': args.hat_code}.get(other) for other in args.against}
    for other, code in codes.items():
        check_code(other, code)
    batch, size = SIDE_BATCHES[args.preset]
    named = ', '.join(SIDE_NAMES[other] + (f' ({code})' if code else '') for other, code in codes.items())
    what = (f'training step (forward, L1, backward, Adam), batch {batch} x {size}^2 LR' if args.measure == 'train'
            else 'inference (eval forward without autograd) of one 64^2 LR image')
    print(f'{what}, {args.preset} network, x4, '
          f'CPU, torch {torch.__version__}; ours vs {named}; {args.rounds} rounds after {args.warmup_rounds}, '
          'all sides alternating\n')
    print('| threads | against | ours (ms) | theirs (ms) | ours / theirs (median of rounds) | range of rounds '
          '| ours: Adam fused | theirs: Adam fused | ours: freed memory kept | theirs: freed memory kept |')
    print('| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |')
    for threads in args.threads:
        sides = [Side('ours', args.preset, threads, None, args.measure)]
        sides += [Side(other, args.preset, threads, code, args.measure) for other, code in codes.items()]
        try:
            for side in sides:
                side.wait_ready()
            times = alternate(sides, args.rounds + args.warmup_rounds, args.warmup_rounds)
        finally:
            for side in sides:
                side.close()
        ours = times['ours']
        for side in sides[1:]:
            theirs = times[side.name]
            ratios = [a / b for a, b in zip(ours, theirs)]
            print(f'| {threads} | {SIDE_NAMES[side.name]} | {1e3 * statistics.median(ours):.1f} '
                  f'| {1e3 * statistics.median(theirs):.1f} | {statistics.median(ratios):.3f}x '
                  f'| {min(ratios):.3f}x - {max(ratios):.3f}x | {sides[0].info["fused"]} | {side.info["fused"]} '
                  f'| {sides[0].info["kept"]} | {side.info["kept"]} |', flush=True)


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
    parser.add_argument('--against', nargs='+', choices=('hat-code', 'release', 'glibc-defaults'),
                        help="time ours against HAT's own code, a release and/or glibc's allocator defaults, all "
                             'sides alternating (see the module docstring)')
    parser.add_argument('--hat-code', type=Path, default=HAT_CODE, help='a HAT checkout (with --against hat-code)')
    parser.add_argument('--release-tree', type=Path, help='a checkout of the release (with --against release)')
    parser.add_argument('--preset', choices=sorted(SIDE_NETWORKS), default='paper', help='network of --against')
    parser.add_argument('--threads', type=int, nargs='+', default=[1, 2], help='CPU threads (with --against)')
    parser.add_argument('--rounds', type=int, default=10, help='timed rounds (with --against)')
    parser.add_argument('--warmup-rounds', type=int, default=2, help='rounds not counted (with --against)')
    parser.add_argument('--measure', choices=('train', 'infer'), default='train',
                        help='with --against: a training step, or an eval forward of one 64x64 LR image')
    parser.add_argument('--side-worker', choices=sorted(SIDE_NAMES), help=argparse.SUPPRESS)
    parser.add_argument('--code', type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side_worker:
        side_worker(args.side_worker, args.preset, args.code, args.measure)
        return
    if args.against:
        against(args)
        return
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
