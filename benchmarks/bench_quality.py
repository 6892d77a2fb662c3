"""Quality study: train several configurations with the same data, budget and seeds, and compare learning curves.

Each (configuration, seed) is one ``basicsr train`` process (BasicSR's own pipeline) that validates every
``--val-every`` iterations on the test folder of a prepared UCMerced/AID tree (``basicsr prepare``). Runs go
``--jobs`` at a time; finished runs are kept in ``OUT/runs/<config>_seed<seed>/`` and skipped when the study
is started again with the same settings, so an interrupted study resumes where it stopped. Writes

- ``OUT/quality.csv``: one row per configuration, seed and validation (PSNR on Y, border = scale; the run's
  wall time; for MoE networks the routing of that validation: experts serving >= 1 % of the test images' LR
  pixels, usage entropy in nats, share of the LR pixels rerouted since the previous validation);
- ``OUT/quality.md``: mean +- std over seeds per configuration at each ``--budgets`` iteration count, the
  paired difference to ``--reference`` (same seed), the mean run time, bicubic, and the settings; then the routing
  at each budget (means over seeds);
- ``OUT/quality.png``: PSNR against iteration, the mean of each configuration with a band from the lowest to the
  highest seed, bicubic as a dashed line;
- ``OUT/quality_usage.png``: each MoE configuration's share of the LR pixels per expert at the last validation,
  the mean over seeds.

The routing values are those the model logs after each validation (``routing on <set>: ...``, see
``docs/training.md``), read from the run's log.

Configurations are named option changes on top of the preset (``--configs``, built-ins in :data:`CONFIGS`) or
defined on the command line (``--define NAME key:sub=value ...``, ``--force_yml`` syntax). The learning rate is
constant (the preset's milestones lie past the budget), so the curve at N iterations is the result of an
N-iteration run.

CPU example (the study in ``docs/does_it_learn.md``: 7 configurations x 3 seeds x 2000 iterations, about 2 hours
on 2 cores)::

    basicsr prepare ucmerced --source ../shared/data/UCMerced_mini --out datasets/UCMerced
    python benchmarks/bench_quality.py --data datasets/UCMerced --out results/quality

GPU (paper-size network, bf16)::

    python benchmarks/bench_quality.py --preset paper --data datasets/UCMerced --out results/quality_paper --jobs 1
"""
import argparse
import csv
import json
import math
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import cv2
import numpy as np
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import hmoe_arch  # noqa: E402,F401  (registers the plugin before basicsr is imported)
from hmoe_arch.archs.config import HAT_RGB_MEAN  # noqa: E402
from hmoe_arch.commands.bench.report import FONT, THICKNESS, PlotText, fit_text  # noqa: E402
from hmoe_arch.expert_maps import expert_palette  # noqa: E402
from hmoe_arch.options import apply_force_yml, read_option_file  # noqa: E402

PRESETS: Dict[str, Dict[str, object]] = {
    'tiny': {
        'network_g:embed_dim': 24, 'network_g:depths': [2, 2], 'network_g:num_heads': [4, 4],
        'network_g:window_size': 8, 'network_g:squeeze_factor': 8, 'datasets:train:gt_size': 64,
        'num_gpu': 0, 'train:ema_decay': 0,
    },
    'paper': {'datasets:train:gt_size': 192, 'use_amp': 'bf16', 'train:ema_decay': 0},
}
"""Changes to ``options/train_ucm_x4.yml`` per preset (batch 4, Adam 2e-4, L1 stay the paper's)."""

CONFIGS: Dict[str, Dict[str, object]] = {
    'hat': {'network_g:moe': False, 'network_g:mfa': False, 'network_g:rgb_mean': list(HAT_RGB_MEAN)},
    'authors': {'network_g:routing_grad': 'none'},
    'straight_through': {'network_g:routing_grad': 'straight_through'},
    'isolated': {'network_g:routing_grad': 'isolated'},
    'centered': {'network_g:routing_grad': 'centered'},
    'isolated_aux': {'network_g:routing_grad': 'isolated', 'train:aux_loss_weight': 0.01},
    'isolated_slow': {'network_g:routing_grad': 'isolated', 'train:routing_lr_scale': 0.1},
    'bias': {'network_g:balance': 'bias'},
    'center': {'network_g:routing_norm': 'center'},
    'bias_center': {'network_g:balance': 'bias', 'network_g:routing_norm': 'center'},
    'default': {},
}
"""Built-in configurations: the HAT configuration; MFG-HMoE with the authors' routing (no gradient to routers and
MFA); with the straight-through routing gradient reaching the backbone; stopped at the backbone; with a
batch-mean baseline; stopped at the backbone plus the load-balancing loss (0.01); stopped at the backbone with the
routing parameters at a tenth of the learning rate; the authors' routing with loss-free balancing biases
(``balance: bias``), with centred routing features (``routing_norm: center``) and with both; and MFGHMoEArch's
current defaults."""

VALIDATION = re.compile(r'# psnr: ([-+0-9.eE]+|nan|inf)')
ROUTING = re.compile(r'routing on .+?: (\d+) of (\d+) experts serve >= 1% of LR pixels, entropy ([0-9.]+) nats, '
                     r'groups ((?:g\d+ \d+% ?)+)(?:, ([0-9.]+)% of pixels rerouted since iteration \S+)?\s*$')
"""The model's routing summary after a validation (:meth:`hmoe_arch.expert_maps.RoutingSummary.lines`)."""
EXPERT_SHARES = re.compile(r'routing on .+?, % of LR pixels per expert: (.*)$')
"""Its second line: every expert's share in percent, ``g0 [..] g1 [..]``."""
ROUTING_KEYS = ('experts_1pct', 'entropy', 'rerouted')
"""Routing values of a validation in the CSV (``rerouted`` is absent at a run's first validation)."""


def option_for(base: Path, preset: str, changes: Dict[str, object], *, data: Path, seed: int, iters: int,
               val_every: int, scale: int, study_changes: Optional[Dict[str, object]] = None) -> Dict[str, object]:
    """The option dict of one run: the base file, the preset's changes, the study's data, seed, budget and
    validation schedule, the changes every run of the study shares (``--set``), then the configuration's."""
    opt = read_option_file(base)
    study = {
        'name': 'run', 'manual_seed': seed, 'scale': scale, 'network_g:upscale': scale,
        'datasets:train:dataroot_gt': str(data / 'Train'), 'datasets:train:split_file': str(data / 'train.txt'),
        'datasets:train:num_worker_per_gpu': 0, 'datasets:train:batch_size_per_gpu': 4,
        'datasets:val:dataroot_gt': str(data / 'Test_HR'), 'datasets:val:dataroot_lq': str(data / f'Test_LR_x{scale}'),
        'train:total_iter': iters, 'train:scheduler:milestones': [10 * iters],
        'val:val_freq': val_every, 'val:metrics': {'psnr': {'type': 'calculate_psnr', 'crop_border': scale,
                                                            'test_y_channel': True}},
        'logger:print_freq': val_every, 'logger:save_checkpoint_freq': 10 * iters, 'logger:use_tb_logger': False,
    }
    for key, value in {**PRESETS[preset], **study, **(study_changes or {}), **changes}.items():
        apply_force_yml(opt, f'{key}={json.dumps(value)}')
    return json.loads(json.dumps(opt))  # plain dicts, in order


class Run:
    """One training process; its validations are parsed from its log as they come."""

    def __init__(self, config: str, seed: int, folder: Path, opt: Dict[str, object], threads: int) -> None:
        self.config, self.seed, self.folder, self.opt, self.threads = config, seed, folder, opt, threads
        self.val_every = int(opt['val']['val_freq'])
        self.total = int(opt['train']['total_iter'])
        self.curve: List[Tuple[int, float]] = []
        self.routing: Dict[int, Dict[str, object]] = {}
        """Iteration -> routing of that validation (MoE networks): ``experts_1pct``, ``experts``, ``entropy``,
        ``rerouted`` (share, ``None`` at the first validation) and ``share`` (per group, the share of each
        expert)."""
        self.seconds = math.nan
        self.unmeasured = False
        """Whether :meth:`finished` found this run done by a study from before the routing was measured."""

    @property
    def label(self) -> str:
        return f'{self.config} seed {self.seed}'

    def finished(self) -> bool:
        """Whether a previous study already ran exactly this option set to the end. A ``result.json`` written
        before the routing was measured (no ``routing`` entry) does not count: that run is trained again."""
        result = self.folder / 'result.json'
        if not result.is_file():
            return False
        saved = json.loads(result.read_text())
        self.unmeasured = saved.get('opt') == self.opt and 'routing' not in saved
        if saved.get('opt') != self.opt or self.unmeasured:
            return False
        self.curve = [tuple(point) for point in saved['curve']]
        self.routing = {int(iteration): values for iteration, values in saved['routing'].items()}
        self.seconds = saved['seconds']
        return True

    def parse(self, line: str) -> Optional[str]:
        """Take one line of the run's log: a validation's PSNR (the k-th is at ``k * val_every``; BasicSR validates
        again after the last iteration: that repeat is not recorded) or the routing the model logs after it.
        Returns the progress message of a recorded PSNR, else ``None``."""
        match = VALIDATION.search(line)
        if match and len(self.curve) < self.total // self.val_every:
            iteration = (len(self.curve) + 1) * self.val_every
            self.curve.append((iteration, float(match.group(1))))
            return f'[{self.label}] iteration {iteration}/{self.total}: PSNR {self.curve[-1][1]:.3f} dB'
        summary, shares = ROUTING.search(line), EXPERT_SHARES.search(line)
        if not self.curve or not (summary or shares):
            return None
        values = self.routing.get(self.curve[-1][0], {})  # the routing is logged after the validation's PSNR
        if summary and 'entropy' not in values:
            values.update(experts_1pct=int(summary.group(1)), experts=int(summary.group(2)),
                          entropy=float(summary.group(3)),
                          rerouted=None if summary.group(5) is None else float(summary.group(5)) / 100)
        if shares and 'share' not in values:
            values['share'] = [[float(v) / 100 for v in group.split()]
                               for group in re.findall(r'g\d+ \[([^\]]*)\]', shares.group(1))]
        self.routing[self.curve[-1][0]] = values
        return None

    def start(self) -> subprocess.Popen:
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / 'option.yml').write_text(yaml.safe_dump(self.opt, sort_keys=False))
        env = dict(os.environ, OMP_NUM_THREADS=str(self.threads), MKL_NUM_THREADS=str(self.threads),
                   PYTHONUNBUFFERED='1')
        command = [sys.executable, '-m', 'hmoe_arch', 'train', '-opt', 'option.yml']
        self.started = time.monotonic()
        self.log = open(self.folder / 'train.log', 'w')
        return subprocess.Popen(command, cwd=self.folder, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, bufsize=1)

    def follow(self, process: subprocess.Popen, report) -> None:
        """Read the process's log; the k-th validation is at ``k * val_every`` (BasicSR validates again after
        the last iteration: that repeat is not recorded)."""
        for line in process.stdout:
            self.log.write(line)
            message = self.parse(line)
            if message is not None:
                report(f'{message} ({time.monotonic() - self.started:.0f} s)')
        code = process.wait()
        self.log.close()
        self.seconds = time.monotonic() - self.started
        if code != 0 or len(self.curve) < self.total // self.val_every:
            raise RuntimeError(f'{self.label}: basicsr train exited with status {code} after {len(self.curve)} '
                               f'validations; see {self.folder / "train.log"}')
        (self.folder / 'result.json').write_text(json.dumps({'opt': self.opt, 'curve': self.curve,
                                                             'routing': self.routing, 'seconds': self.seconds}))


def run_all(runs: Sequence[Run], jobs: int) -> None:
    """Run what is not finished yet, ``jobs`` processes at a time, printing each validation."""
    lock = threading.Lock()

    def report(message: str) -> None:
        with lock:
            print(message, flush=True)

    pending = [run for run in runs if not run.finished()]
    report(f'{len(runs) - len(pending)} of {len(runs)} runs already done; {len(pending)} to go, {jobs} at a time')
    unmeasured = [run.label for run in pending if run.unmeasured]
    if unmeasured:
        report(f'{len(unmeasured)} of them finished before the routing was measured and are trained again: '
               + ', '.join(unmeasured))
    errors: List[BaseException] = []

    def worker() -> None:
        while True:
            with lock:
                if not pending or errors:
                    return
                run = pending.pop(0)
            try:
                run.follow(run.start(), report)
                report(f'[{run.label}] done in {run.seconds:.0f} s')
            except BaseException as error:  # surfaced after the other workers stop
                with lock:
                    errors.append(error)

    threads = [threading.Thread(target=worker) for _ in range(jobs)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]


def bicubic_psnr(opt: Dict[str, object]) -> float:
    """PSNR (Y, border = scale) of bicubic upsampling (MATLAB's kernel) on the study's test set."""
    from basicsr.data import build_dataset
    from basicsr.metrics import calculate_psnr
    from basicsr.utils import tensor2img
    from basicsr.utils.matlab_functions import imresize

    val = dict(opt['datasets']['val'], phase='val', scale=opt['scale'])
    dataset = build_dataset(val)
    values = []
    for index in range(len(dataset)):
        item = dataset[index]
        sr = imresize(item['lq'], opt['scale']).clamp(0, 1)
        values.append(calculate_psnr(tensor2img(sr), tensor2img(item['gt']), crop_border=opt['scale'],
                                     test_y_channel=True))
    return float(np.mean(values))


def csv_cell(value: object) -> str:
    """A routing value in the CSV: empty when missing, integers as they are, shares and entropies to 4 decimals."""
    if value is None:
        return ''
    return str(value) if isinstance(value, int) else f'{value:.4f}'


def write_csv(runs: Sequence[Run], bicubic: float, path: Path) -> None:
    """``quality.csv``: per run and validation the PSNR, the run's wall time and the routing values
    (:data:`ROUTING_KEYS`, empty where the network has no MoE or the value does not exist), then bicubic."""
    with open(path, 'w', newline='') as f:
        writer = csv.writer(f)
        writer.writerow(['config', 'seed', 'iteration', 'psnr_y', 'run_seconds', *ROUTING_KEYS])
        for run in runs:
            for iteration, psnr in run.curve:
                routing = run.routing.get(iteration, {})
                writer.writerow([run.config, run.seed, iteration, f'{psnr:.4f}', f'{run.seconds:.0f}',
                                 *(csv_cell(routing.get(key)) for key in ROUTING_KEYS)])
        writer.writerow(['bicubic', '', '', f'{bicubic:.4f}', ''] + [''] * len(ROUTING_KEYS))


def routing_mean(runs: Sequence[Run], iteration: int, key: str) -> Tuple[float, int]:
    """Mean over ``runs`` of routing value ``key`` at ``iteration``, and how many runs have it (nan, 0 if none)."""
    values = [run.routing[iteration][key] for run in runs
              if run.routing.get(iteration, {}).get(key) is not None]
    return (float(np.mean(values)) if values else math.nan), len(values)


def routing_table(runs: Sequence[Run], budgets: Sequence[int]) -> List[str]:
    """Markdown lines: per MoE configuration and budget, the means over seeds of the experts serving >= 1 % of
    the LR pixels, the usage entropy and the share rerouted since the previous validation (none without MoE)."""
    configs = [c for c in dict.fromkeys(run.config for run in runs)
               if any(run.routing for run in runs if run.config == c)]
    if not configs:
        return []
    lines = ['', 'Routing of the LR pixels of the test images, mean over seeds: experts serving >= 1 % of the pixels '
             '(of all experts), usage entropy in nats (log of the number of experts when balanced, 0 for one expert), '
             f'share of the pixels whose expert changed since the previous validation ({runs[0].val_every} '
             'iterations earlier; (n=k) where only k seeds have a value).', '',
             '| configuration | ' + ' | '.join(f'{b} it: experts >= 1 % | {b} it: entropy | {b} it: rerouted'
                                             for b in budgets) + ' |', '| --- ' * (1 + 3 * len(budgets)) + '|']
    for config in configs:
        group = [run for run in runs if run.config == config]
        cells = []
        for budget in budgets:
            experts = max((run.routing.get(budget, {}).get('experts', 0) for run in group), default=0)
            for key in ROUTING_KEYS:
                mean, count = routing_mean(group, budget, key)
                text = {'experts_1pct': f'{mean:.1f} of {experts}', 'entropy': f'{mean:.2f}',
                        'rerouted': f'{100 * mean:.1f} %'}[key]
                cells.append('-' if count == 0 else text + ('' if count == len(group) else f' (n={count})'))
        lines.append(f'| {config} | ' + ' | '.join(cells) + ' |')
    return lines


def summarise(runs: Sequence[Run], budgets: Sequence[int], reference: str, bicubic: float, settings: str) -> str:
    """The Markdown report: mean +- std over seeds at each budget, the paired difference to ``reference`` (over
    the seeds both have; ``(n=k)`` where a configuration has fewer seeds than the study) and the mean run time;
    then the routing at each budget (:func:`routing_table`)."""
    configs = list(dict.fromkeys(run.config for run in runs))
    value = {(run.config, run.seed, it): psnr for run in runs for it, psnr in run.curve}
    seeds = sorted({run.seed for run in runs})
    lines = [settings, '', f'Bicubic: {bicubic:.3f} dB.', '',
             '| configuration | ' + ' | '.join(f'{b} it: mean +- std' for b in budgets) + ' | '
             + ' | '.join(f'{b} it: vs {reference} (paired)' for b in budgets) + ' | per seed at ' + str(budgets[-1])
             + ' it | run time (min, mean) |', '| --- ' * (1 + 2 * len(budgets) + 2) + '|']
    for config in configs:
        cells = []
        for budget in budgets:
            values = [value[(config, s, budget)] for s in seeds if (config, s, budget) in value]
            cells.append(f'{np.mean(values):.3f} +- {np.std(values, ddof=1) if len(values) > 1 else 0:.3f}'
                         + (f' (n={len(values)})' if len(values) < len(seeds) else ''))
        for budget in budgets:
            paired = [s for s in seeds if (config, s, budget) in value and (reference, s, budget) in value]
            diffs = [value[(config, s, budget)] - value[(reference, s, budget)] for s in paired]
            if config == reference or not diffs:
                cells.append('-')
                continue
            sign = '+' if np.mean(diffs) >= 0 else ''
            cells.append(f'{sign}{np.mean(diffs):.3f} (min {min(diffs):+.3f}, max {max(diffs):+.3f})'
                         + (f' (n={len(diffs)})' if len(diffs) < len(seeds) else ''))
        per_seed = ', '.join(f'{value[(config, s, budgets[-1])]:.3f}' if (config, s, budgets[-1]) in value else '-'
                             for s in seeds)
        minutes = np.mean([run.seconds for run in runs if run.config == config]) / 60
        lines.append(f'| {config} | ' + ' | '.join(cells) + f' | {per_seed} | {minutes:.1f} |')
    lines += routing_table(runs, budgets)
    return '\n'.join(lines) + '\n'


COLOURS = [(200, 80, 0), (0, 140, 255), (40, 160, 40), (30, 30, 220), (160, 60, 160), (120, 120, 0), (0, 0, 0)]


def plot_curves(runs: Sequence[Run], bicubic: float, path: Path, title: str) -> None:
    """PSNR against iteration: mean per configuration, band from the lowest to the highest seed."""
    configs = list(dict.fromkeys(run.config for run in runs))
    width, height, left, right, top, bottom = 960, 600, 80, 230, 40, 60
    canvas = np.full((height, width, 3), 255, np.uint8)
    iters = sorted({it for run in runs for it, _ in run.curve})
    values = [p for run in runs for _, p in run.curve] + [bicubic]
    # the axis starts 1.5 dB under bicubic: early collapses below it are drawn on the lower edge
    y_lo = max(math.floor(min(values) * 2) / 2, math.floor((bicubic - 1.5) * 2) / 2)
    y_hi = math.ceil(max(values) * 2) / 2 + 1e-9
    x_lo, x_hi = 0, max(iters)

    def position(x: float, y: float) -> Tuple[int, int]:
        y = max(y, y_lo)
        return (int(left + (x - x_lo) / (x_hi - x_lo) * (width - left - right)),
                int(height - bottom - (y - y_lo) / (y_hi - y_lo) * (height - top - bottom)))

    text = dict(fontFace=cv2.FONT_HERSHEY_SIMPLEX, fontScale=0.45, color=(0, 0, 0), thickness=1, lineType=cv2.LINE_AA)
    cv2.rectangle(canvas, position(x_lo, y_hi), position(x_hi, y_lo), (0, 0, 0), 1)
    cv2.putText(canvas, title, (left + 40, 25), **text)
    cv2.putText(canvas, 'iteration', (width // 2 - 60, height - 15), **text)
    cv2.putText(canvas, 'PSNR Y (dB)', (5, top - 10), **text)
    step = next(s for s in (0.1, 0.25, 0.5, 1.0, 2.0, 5.0) if (y_hi - y_lo) / s <= 12)
    for k in range(int((y_hi - y_lo) / step) + 1):
        y = y_lo + k * step
        cv2.line(canvas, position(x_lo, y), position(x_hi, y), (225, 225, 225), 1)
        cv2.putText(canvas, f'{y:.2f}', (left - 50, position(x_lo, y)[1] + 4), **text)
    for x in iters:
        cv2.putText(canvas, str(x), (position(x, y_lo)[0] - 12, height - bottom + 18), **text)
    (x0, y_bicubic), (x1, _) = position(x_lo, bicubic), position(x_hi, bicubic)
    for start in range(x0, x1, 14):  # dashed bicubic line
        cv2.line(canvas, (start, y_bicubic), (min(start + 7, x1), y_bicubic), (90, 90, 90), 1)
    legend = [('bicubic', (90, 90, 90))]
    for index, config in enumerate(configs):
        colour = COLOURS[index % len(COLOURS)]
        curves = [dict(run.curve) for run in runs if run.config == config]
        xs = [x for x in iters if all(x in c for c in curves)]
        low = [position(x, min(c[x] for c in curves)) for x in xs]
        high = [position(x, max(c[x] for c in curves)) for x in xs]
        band = canvas.copy()
        cv2.fillPoly(band, [np.array(low + high[::-1], np.int32)], colour)
        canvas[:] = cv2.addWeighted(band, 0.18, canvas, 0.82, 0)
        mean = [position(x, float(np.mean([c[x] for c in curves]))) for x in xs]
        cv2.polylines(canvas, [np.array(mean, np.int32)], False, colour, 2, cv2.LINE_AA)
        for point in mean:
            cv2.circle(canvas, point, 3, colour, -1, cv2.LINE_AA)
        legend.append((f'{config} (n={len(curves)})', colour))
    for row, (name, colour) in enumerate(legend):
        y = top + 20 + 22 * row
        cv2.line(canvas, (width - right + 15, y - 4), (width - right + 45, y - 4), colour, 2)
        cv2.putText(canvas, name, (width - right + 52, y), **text)
    if not cv2.imwrite(str(path), canvas):
        raise OSError(f'could not write {path}')


def last_usage(runs: Sequence[Run]) -> Dict[str, Dict[str, object]]:
    """Per MoE configuration, its routing at the last validation: ``iteration``, ``share`` (per group, each
    expert's share, the mean over the seeds that logged it), ``seeds`` (how many), and the means over them of
    ``experts_1pct`` and ``entropy``."""
    usage: Dict[str, Dict[str, object]] = {}
    for config in dict.fromkeys(run.config for run in runs):
        group = [run for run in runs if run.config == config and run.curve]
        if not group:
            continue
        iteration = max(run.curve[-1][0] for run in group)
        logged = [run for run in group if 'share' in run.routing.get(iteration, {})]
        if not logged:
            continue
        shares = [run.routing[iteration]['share'] for run in logged]
        usage[config] = {
            'iteration': iteration, 'seeds': len(logged),
            'share': [np.mean([s[g] for s in shares], axis=0).tolist() for g in range(len(shares[0]))],
            'experts_1pct': routing_mean(logged, iteration, 'experts_1pct')[0],
            'entropy': routing_mean(logged, iteration, 'entropy')[0]}
    return usage


def centred_text(text: str, x: int, y: int, scale: float, canvas: Tuple[int, int]) -> PlotText:
    """:func:`fit_text` centred on ``x``."""
    (width, _), _ = cv2.getTextSize(text, FONT, scale, THICKNESS)
    return fit_text(text, x - width // 2, y, scale, canvas)


def plot_usage(runs: Sequence[Run], path: Path, title: str) -> List[PlotText]:
    """One panel per MoE configuration: the share of the LR pixels each expert took at the last validation (mean
    over seeds; a bar per expert in its expert-map colour, groups apart, the value in percent above it: ``0`` for
    an expert no pixel chose, ``<0.1`` under 0.05 %). Writes
    ``path`` (PNG) unless no configuration logged its routing, and returns every text drawn (each lies inside the
    image)."""
    usage = last_usage(runs)
    if not usage:
        return []
    width, left, right, top, panel = 960, 60, 20, 40, 190
    height = top + panel * len(usage) + 10
    canvas = np.full((height, width, 3), 255, np.uint8)
    size = (height, width)
    texts = [fit_text(title, left, 24, 0.45, size)]
    for index, (config, values) in enumerate(usage.items()):
        y0 = top + panel * index
        bar_bottom = y0 + 144  # a bar of 100 % reaches y0 + 44
        texts.append(fit_text(f'{config} at iteration {values["iteration"]} (mean of {values["seeds"]} seed'
                              f'{"s" * (values["seeds"] != 1)}): {values["experts_1pct"]:.1f} experts serve >= 1 %, '
                              f'entropy {values["entropy"]:.2f} nats', left, y0 + 18, 0.45, size))
        for percent in (0, 50, 100):
            y = bar_bottom - percent
            cv2.line(canvas, (left, y), (width - right, y), (225, 225, 225) if percent else (0, 0, 0), 1)
            texts.append(fit_text(f'{percent} %', 8, y + 4, 0.35, size))
        sizes = [len(group) for group in values['share']]
        palette = expert_palette(sizes)
        slots = sum(sizes) + len(sizes) - 1  # a free slot between groups
        slot = (width - left - right) / slots
        expert = 0
        for g, shares in enumerate(values['share']):
            first = expert + g
            for e, share in enumerate(shares):
                x = left + (expert + g + 0.5) * slot
                colour = tuple(int(c) for c in palette[expert])
                cv2.rectangle(canvas, (int(x - 0.3 * slot), int(bar_bottom - 100 * share)),
                              (int(x + 0.3 * slot), bar_bottom), colour, -1)
                label = '0' if share == 0 else '<0.1' if share < 0.0005 else f'{100 * share:.1f}'  # 0: never chosen
                texts.append(centred_text(label, int(x), int(bar_bottom - 100 * share) - 4, 0.33, size))
                texts.append(centred_text(f'e{e}', int(x), bar_bottom + 14, 0.33, size))
                expert += 1
            middle = left + (first + expert + g) / 2 * slot
            texts.append(centred_text(f'group {g}', int(middle), bar_bottom + 32, 0.4, size))
    for text in texts:
        cv2.putText(canvas, text.text, text.org, FONT, text.scale, (0, 0, 0), THICKNESS, cv2.LINE_AA)
    if not cv2.imwrite(str(path), canvas):
        raise OSError(f'could not write {path}')
    return texts


def parse_changes(changes: Sequence[str], where: str) -> Dict[str, object]:
    """``KEY=VALUE`` arguments (``--force_yml`` syntax, the value read as YAML) as a dict."""
    parsed: Dict[str, object] = {}
    for change in changes:
        key, equals, text = change.partition('=')
        if not equals or not key:
            raise SystemExit(f'bench_quality: {where}: {change!r} is not KEY=VALUE (e.g. train:ema_decay=0.999)')
        parsed[key] = yaml.safe_load(text)
    return parsed


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--data', type=Path, default=Path('datasets/UCMerced'),
                        help='prepared tree (basicsr prepare): Train/, train.txt, Test_HR/, Test_LR_x<scale>/')
    parser.add_argument('--out', type=Path, default=Path('results/quality'))
    parser.add_argument('--preset', choices=sorted(PRESETS), default='tiny')
    parser.add_argument('--base', type=Path, default=REPO / 'options' / 'train_ucm_x4.yml',
                        help='option file the preset changes')
    parser.add_argument('--scale', type=int, default=4)
    parser.add_argument('--configs', nargs='+', default=['hat', 'authors', 'straight_through', 'isolated', 'centered',
                                                         'isolated_aux', 'isolated_slow'],
                        help=f'built-in configurations ({", ".join(CONFIGS)}) or names given with --define')
    parser.add_argument('--define', nargs='+', action='append', default=[], metavar=('NAME', 'KEY=VALUE'),
                        help='a configuration: NAME then option changes in --force_yml syntax, '
                             'e.g. --define st_aux network_g:routing_grad=straight_through train:aux_loss_weight=0.01')
    parser.add_argument('--set', nargs='+', default=[], metavar='KEY=VALUE', dest='study_changes',
                        help='option changes every run of the study shares, after the preset and before each '
                             'configuration\'s, e.g. --set train:ema_decay=0.999')
    parser.add_argument('--seeds', nargs='+', type=int, default=[0, 1, 2])
    parser.add_argument('--iters', type=int, default=2000)
    parser.add_argument('--val-every', type=int, default=250)
    parser.add_argument('--budgets', nargs='+', type=int, default=None,
                        help='iteration counts tabulated (validated ones; default 500 and --iters)')
    parser.add_argument('--reference', default='authors', help='configuration the paired differences are taken to')
    parser.add_argument('--jobs', type=int, default=2, help='training processes at once')
    parser.add_argument('--threads', type=int, default=1, help='CPU threads per training process')
    parser.add_argument('--report-only', action='store_true',
                        help='train nothing: tabulate the runs of OUT that finished with these settings and name the '
                             'others')
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    defined = dict(CONFIGS)
    for name, *changes in args.define:
        defined[name] = parse_changes(changes, f'--define {name}')
    study_changes = parse_changes(args.study_changes, '--set')
    unknown = [c for c in args.configs if c not in defined]
    if unknown:
        raise SystemExit(f'bench_quality: unknown configuration(s) {unknown}; built-in: {sorted(CONFIGS)}')
    if args.iters % args.val_every:
        raise SystemExit(f'bench_quality: --iters ({args.iters}) must be a multiple of --val-every ({args.val_every})')
    budgets = args.budgets or sorted({min(500, args.iters), args.iters})
    if any(b % args.val_every or b > args.iters for b in budgets):
        raise SystemExit(f'bench_quality: --budgets {budgets} must be validated iterations (multiples of '
                         f'--val-every up to --iters)')
    if args.reference not in args.configs:
        raise SystemExit(f'bench_quality: --reference {args.reference} is not among --configs')
    for folder in ('Train', 'Test_HR', f'Test_LR_x{args.scale}'):
        if not (args.data / folder).is_dir():
            raise SystemExit(f'bench_quality: {args.data / folder} not found; run basicsr prepare first')
    data = args.data.resolve()
    runs = [Run(config, seed, args.out / 'runs' / f'{config}_seed{seed}',
                option_for(args.base, args.preset, defined[config], data=data, seed=seed, iters=args.iters,
                           val_every=args.val_every, scale=args.scale, study_changes=study_changes), args.threads)
            for config in args.configs for seed in args.seeds]
    started = time.monotonic()
    if args.report_only:
        missing = [run.label for run in runs if not run.finished()]
        runs = [run for run in runs if run.curve]
        if not runs:
            raise SystemExit(f'bench_quality: --report-only: no run in {args.out / "runs"} finished with these '
                             'settings')
        if missing:
            print(f'not finished (left out of the report): {", ".join(missing)}')
    else:
        run_all(sorted(runs, key=lambda run: args.seeds.index(run.seed)), args.jobs)
    bicubic = bicubic_psnr(runs[0].opt)
    args.out.mkdir(parents=True, exist_ok=True)
    write_csv(runs, bicubic, args.out / 'quality.csv')
    network = runs[0].opt['network_g']
    settings = (f'Preset `{args.preset}` (embed_dim {network.get("embed_dim", 180)}, depths {network.get("depths")}, '
                f'window {network.get("window_size")}), x{args.scale}, {args.iters} iterations, seeds {args.seeds}, '
                f'validation every {args.val_every} on {data / "Test_HR"} (PSNR Y, border {args.scale}). '
                + (f'Every run: {study_changes}. ' if study_changes else '')
                + 'Configurations: ' + '; '.join(f'`{c}`: {defined[c] or "MFGHMoEArch defaults"}' for c in args.configs)
                + '.')
    report = summarise(runs, budgets, args.reference, bicubic, settings)
    (args.out / 'quality.md').write_text(report)
    plot_curves(runs, bicubic, args.out / 'quality.png', f'{args.preset} network, x{args.scale}, {len(args.seeds)} '
                f'seeds (line: mean; band: lowest to highest seed; values below the axis on its edge)')
    usage = plot_usage(runs, args.out / 'quality_usage.png', f'{args.preset} network, x{args.scale}: share of the '
                       'test images\' LR pixels per expert at the last validation (mean over seeds)')
    print(report)
    print(f'written {args.out / "quality.md"}, quality.csv, quality.png'
          + (', quality_usage.png' if usage else ' (no configuration routes: no quality_usage.png)')
          + f' ({(time.monotonic() - started) / 60:.1f} min)')
    return 0


if __name__ == '__main__':
    sys.exit(main())
