"""The benchmark scripts run on CPU at small sizes and print their tables (they assert nothing themselves); the
helpers of bench_quality.py on hand-made logs."""
import csv
import importlib.util
import json
import math
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import List, Optional

import cv2
import numpy as np
import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / 'benchmarks'


def run(script: str, *args: str) -> str:
    result = subprocess.run([sys.executable, str(BENCHMARKS / script), *args], capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


@pytest.mark.slow  # runs the benchmark script
def test_bench_train_prints_every_row_with_ratios_against_hat() -> None:
    out = run('bench_train.py', '--batch', '1', '--size', '16', '--steps', '1', '--warmup', '1', '--modes',
              'fp32-plain', 'bf16', '--configs', 'hat', 'moe')
    rows = [line.strip('| ').split(' | ') for line in out.splitlines()
            if line.startswith('| ') and 'network' not in line and '---' not in line]
    assert [r[:3] for r in rows] == [['hat', 'fp32-plain', 'plain'], ['hat', 'bf16', 'sdpa'],
                                     ['moe', 'fp32-plain', 'plain'], ['moe', 'bf16', 'sdpa']]
    step = {(r[0], r[1]): float(r[3]) for r in rows}
    by_key = {(r[0], r[1]): r for r in rows}
    assert by_key['hat', 'fp32-plain'][4:6] == ['1.000x', '1.000x']
    # against the HAT fp32-plain row, and against the HAT row of the same mode
    moe_bf16 = by_key['moe', 'bf16']
    close = dict(rel=5e-3, abs=1e-3)  # the table rounds steps to 0.1 ms and ratios to 0.001
    assert float(moe_bf16[4].rstrip('x')) == pytest.approx(step['moe', 'bf16'] / step['hat', 'fp32-plain'], **close)
    assert float(moe_bf16[5].rstrip('x')) == pytest.approx(step['moe', 'bf16'] / step['hat', 'bf16'], **close)
    speedups = dict(item.split() for item in re.search(r'\(speed-up\): (.*)', out).group(1).split(', '))
    assert set(speedups) == {'hat', 'moe'}
    assert float(speedups['moe'].rstrip('x')) == pytest.approx(step['moe', 'fp32-plain'] / step['moe', 'bf16'],
                                                                rel=5e-3, abs=6e-3)


@pytest.mark.slow  # runs the benchmark script (four worker processes)
def test_bench_train_against_hat_code_and_a_release_alternates_and_reports_ratios(tmp_path: Path) -> None:
    hat = BENCHMARKS.parents[1] / 'shared' / 'peers' / 'HAT'
    if not (hat / 'hat' / 'archs' / 'hat_arch.py').is_file():
        pytest.skip(f'HAT peer code not available: {hat}/hat is missing (it ships in ../shared/peers)')
    out = run('bench_train.py', '--against', 'hat-code', 'release', 'glibc-defaults', '--release-tree',
              str(BENCHMARKS.parent), '--preset', 'tiny', '--threads', '1', '--rounds', '3', '--warmup-rounds', '1')
    assert 'batch 4 x 16^2 LR' in out and '3 rounds after 1, all sides alternating' in out
    rows = {row[1]: row for row in (line.strip('| ').split(' | ') for line in out.splitlines()
                                    if line.startswith('| 1 |'))}
    assert list(rows) == ["HAT's own code", 'release', "ours with glibc's defaults"], out
    for row in rows.values():
        ours, theirs, ratio = float(row[2]), float(row[3]), float(row[4].rstrip('x'))
        low, high = (float(v.rstrip('x')) for v in row[5].split(' - '))
        assert ours > 0 and theirs > 0 and low <= ratio <= high, row
    assert len({row[2] for row in rows.values()}) == 1  # one "ours" worker for all
    # our model's optimiser is fused Adam; HAT's (SRModel's) is not; a release of this checkout is ours, and keeps
    # freed memory as its commands do, which HAT's code and glibc's defaults do not
    assert rows["HAT's own code"][6:] == ['True', 'False', 'True', 'False']
    assert rows['release'][6:] == ['True', 'True', 'True', 'True']
    assert rows["ours with glibc's defaults"][6:] == ['True', 'True', 'True', 'False']
    out = run('bench_train.py', '--against', 'glibc-defaults', '--measure', 'infer', '--preset', 'tiny', '--threads',
              '1', '--rounds', '2', '--warmup-rounds', '1')
    assert out.startswith('inference (eval forward without autograd) of one 64^2 LR image, tiny network')
    assert len([line for line in out.splitlines() if line.startswith("| 1 | ours with glibc's defaults |")]) == 1
    result = subprocess.run([sys.executable, str(BENCHMARKS / 'bench_train.py'), '--against', 'release',
                             '--release-tree', str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert result.stderr.strip().endswith(f'{tmp_path}/hmoe_arch/__init__.py is missing: --release-tree {tmp_path} '
                                          'is not such a checkout')


@pytest.mark.slow  # runs the benchmark script
def test_profile_train_times_every_piece_of_a_basicsr_iteration(workdir: Path) -> None:
    out = run('profile_train.py', '--data', str(workdir / 'datasets' / 'UCMerced'), '--iters', '3', '--warmup', '1',
              '--profile-iters', '1', '--top', '3', '--val-every', '40', '--log-every', '10')
    iteration, run_table = out.split('Over a run that logs every 10 and validates every 40 iterations')

    def table(text: str) -> dict:
        return {line.strip('| ').split(' | ')[0]: line.strip('| ').split(' | ') for line in text.splitlines()
                if line.startswith('| ') and '---' not in line and 'piece' not in line}

    rows = table(iteration)
    assert list(rows) == ['data', 'feed_data', 'forward', '(of which the upsampler, MoEUpsampler)', 'loss and checks',
                          'backward', 'optimiser step', 'routing record', 'learning rate', 'rest of the loop']
    mean = float(re.search(r'mean (\d+\.\d) ms', out).group(1))
    assert abs(float(rows['rest of the loop'][1])) < 0.1 * mean  # the timed pieces account for the iteration
    assert float(rows['forward'][1]) > float(rows['(of which the upsampler, MoEUpsampler)'][1]) > 0
    assert 'Self CPU time total' in out
    # what the run does now and then, timed and spread over the iterations between
    runs = table(run_table.split('Top operators')[0])
    names = list(runs)
    assert names[0] == 'training iteration (above)' and names[-1] == 'in all' and len(names) == 4, names
    assert float(runs[names[0]][1]) == pytest.approx(mean, abs=0.05)
    logged = re.fullmatch(r'logging: (\d+\.\d\d) ms every 10 \(the log line\)', names[1])
    validated = re.fullmatch(r'validation: (\d+\.\d\d) ms every 40 \((\d+) images, without the progress bar\)',
                             names[2])
    assert logged and validated, names
    assert int(validated.group(2)) == len(list((workdir / 'datasets' / 'UCMerced' / 'Test_HR').iterdir()))
    assert float(runs[names[2]][1]) == pytest.approx(float(validated.group(1)) / 40, abs=0.01)
    assert float(runs[names[1]][1]) == pytest.approx(float(logged.group(1)) / 10, abs=0.01)
    assert float(validated.group(1)) > 0
    total = mean + sum(float(runs[name][1]) for name in names[1:3])
    assert float(runs['in all'][1]) == pytest.approx(total, abs=0.15)
    refused = subprocess.run([sys.executable, str(BENCHMARKS / 'profile_train.py'), '--data',
                              str(workdir / 'datasets' / 'UCMerced'), '--val-runs', '0'],
                             capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and '--val-runs at least 1' in refused.stderr


@pytest.mark.slow  # runs the benchmark script
def test_bench_attention_path_alternates_both_sides_and_prints_their_ratio() -> None:
    out = run('bench_attention_path.py', '--rounds', '4', '--batch', '1')
    before, after = (float(re.search(rf'{side}\s+median step\s+(\d+\.\d) ms', out).group(1))
                     for side in ('before', 'after'))
    ratio = float(re.search(r'after / before: (\d\.\d{3})', out).group(1))
    # the ratio of the two medians, which are printed to 0.1 ms (a step of this size takes some 20-40 ms) and the
    # ratio to 0.001: the printed steps bound it only to that rounding
    low, high = (after - 0.05) / (before + 0.05) - 5e-4, (after + 0.05) / (before - 0.05) + 5e-4
    assert low <= ratio <= high, (ratio, after, before)
    assert '2 rounds after 2 warm-up' in out


@pytest.mark.slow  # runs the benchmark script
def test_bench_dispatch_times_sparse_and_dense_heads_per_size() -> None:
    out = run('bench_dispatch.py', '--sizes', '2', '4', '--batch', '2', '--rounds', '1', '--warmup', '0')
    assert 'every pixel routed to the 3x3 group; batch 2' in out and '8 x 1x1, 8 x 3x3' in out
    rows = [line.strip('| ').split(' | ') for line in out.splitlines() if re.match(r'\| \d+x\d+ \|', line)]
    assert [row[:2] for row in rows] == [['2x2', '8'], ['4x4', '32']]
    for row in rows:
        assert 1 <= int(row[2]) <= 8  # the 3x3 experts the forced routing reaches
        assert float(row[3]) < 1e-4  # sparse and dense heads give the same output
        for sparse, dense, ratio in ((row[4], row[5], row[6]), (row[7], row[8], row[9])):
            value = float(ratio.split('x')[0])
            low, high = (float(v) for v in ratio.split('(')[1].rstrip(')').split(' - '))
            assert low == high == pytest.approx(value, abs=0.01)  # one round: one ratio
            assert value == pytest.approx(float(dense) / float(sparse), rel=0.05, abs=0.02)


@pytest.mark.slow  # runs the benchmark script
def test_bench_tiling_reports_sizes_and_seam_error() -> None:
    out = run('bench_tiling.py', '--sizes', '32', '64', '--tile', '16', '--tile-pad', '8', '--seam-size', '32',
              '--scale', '2', '--infer-sizes', '64')
    assert '| 32x32 |' in out and '| 64x64 |' in out
    assert 'seam error on 32x32 LR' in out
    infer_row = re.search(r'\| 64x64 \| (\S+) \| (\S+) \| (\S+) \|\n*$', out)
    assert infer_row and float(infer_row.group(2)) == pytest.approx(128 * 128 * 3 / 2**20, abs=0.05)


@pytest.mark.slow  # runs the benchmark script
def test_bench_arch_prints_the_ratio_table() -> None:
    out = run('bench_arch.py', '--size', '16', '--runs', '1', '--warmup', '0')
    for measure in ('full forward (s)', 'MoE head vs upsampler (ms)', 'peak memory of a forward (MiB)'):
        assert f'| {measure} |' in out
    # the authors' dense head runs on the same weights as the sparse one, so their outputs agree
    assert float(re.search(r'dense vs sparse max \|diff\| (\S+)', out).group(1)) < 1e-4


@pytest.mark.slow  # runs the benchmark script
def test_bench_onnx_prints_both_runtimes_and_the_ratio() -> None:
    pytest.importorskip('onnxruntime', reason='onnxruntime is not installed (pip install -e .[export])')
    out = run('bench_onnx.py', '--tiny', '--size', '16', '--runs', '1')
    assert '| PyTorch eager (sparse experts) |' in out and '| onnxruntime (dense experts) |' in out
    assert re.search(r'ONNX / PyTorch: \d+\.\d\dx', out)


@pytest.mark.slow  # runs the benchmark script
def test_bench_quality_trains_every_configuration_and_resumes(workdir: Path, tmp_path: Path) -> None:
    args = ['--data', str(workdir / 'datasets' / 'UCMerced'), '--out', str(tmp_path / 'q'), '--iters', '4',
            '--val-every', '2', '--budgets', '2', '4', '--seeds', '0', '1', '--configs', 'hat', 'authors', 'slow',
            '--define', 'slow', 'network_g:routing_grad=isolated', 'train:routing_lr_scale=0.1',
            '--preset', 'tiny', '--base', str(BENCHMARKS.parent / 'options' / 'train_ucm_x4.yml')]
    out = run('bench_quality.py', *args, '--jobs', '2')
    assert '0 of 6 runs already done; 6 to go, 2 at a time' in out
    assert re.search(r'\[slow seed 1\] iteration 4/4: PSNR \d+\.\d{3} dB', out)
    table = (tmp_path / 'q' / 'quality.md').read_text()
    rows = {line.split(' | ')[0].strip('| '): line for line in table.splitlines() if line.startswith('| ')}
    assert set(rows) >= {'hat', 'authors', 'slow'} and '2 it: vs authors (paired)' in table
    csv_rows = (tmp_path / 'q' / 'quality.csv').read_text().splitlines()
    assert len(csv_rows) == 1 + 3 * 2 * 2 + 1 and csv_rows[-1].startswith('bicubic,')
    assert (tmp_path / 'q' / 'quality.png').stat().st_size > 1000
    # the routing each MoE run logged at every validation (none for HAT; nothing rerouted-since at the first)
    with open(tmp_path / 'q' / 'quality.csv') as f:
        rows_by_run = {(r['config'], r['seed'], r['iteration']): r for r in csv.DictReader(f)}
    assert rows_by_run['hat', '0', '2']['experts_1pct'] == ''
    assert 1 <= int(rows_by_run['authors', '1', '4']['experts_1pct']) <= 16
    assert rows_by_run['slow', '0', '2']['rerouted'] == ''
    assert 0 <= float(rows_by_run['slow', '0', '4']['rerouted']) <= 1
    assert re.search(r'\| authors \| \d+\.\d of 16 \| \d\.\d\d \| - \| \d+\.\d of 16 \| \d\.\d\d \| \d+\.\d % \|',
                     table)
    assert (tmp_path / 'q' / 'quality_usage.png').stat().st_size > 1000
    assert '6 of 6 runs already done' in run('bench_quality.py', *args)


@pytest.mark.slow  # runs the benchmark script
def test_diagnose_routing_reports_each_mode(workdir: Path, tmp_path: Path) -> None:
    run('diagnose_routing.py', '--data', str(workdir / 'datasets' / 'UCMerced'), '--out', str(tmp_path / 'd'),
              '--iters', '4', '--every', '2', '--modes', 'none', 'straight_through')
    rows = [line for line in (tmp_path / 'd' / 'diagnose.md').read_text().splitlines() if line.startswith('| none')
            or line.startswith('| straight_through')]
    assert len(rows) == 6  # iterations 1, 2 and 4 of each mode
    assert all(line.split(' | ')[5] == '0' for line in rows if line.startswith('| none'))  # backbone shift


@pytest.mark.slow  # runs the benchmark script
def test_bench_threads_prints_both_thread_counts_and_their_ratio() -> None:
    out = run('bench_threads.py', '--workloads', 'tiny_step', '--repeats', '1', '--warmup', '0', '--busy', '1',
              '--busy-limit', '60')
    rows = [line.strip('| ').split(' | ') for line in out.splitlines() if line.startswith('| tiny_step')]
    assert [r[:2] for r in rows] == [['tiny_step', '1'], ['tiny_step', '2']]
    times = [float(r[2]) for r in rows]
    ratio = float(re.search(r'tiny_step (\d+\.\d+)x', out).group(1))
    assert ratio == pytest.approx(times[0] / times[1], rel=0.01, abs=0.01)
    assert '1 kept busy by this script' in out


@pytest.mark.slow  # runs the benchmark script
def test_bench_startup_prints_each_command_against_the_baseline() -> None:
    out = run('bench_startup.py', '--baseline', str(BENCHMARKS.parent), '--repeats', '1')
    rows = {line.strip('| ').split(' | ')[0]: line.strip('| ').split(' | ') for line in out.splitlines()
            if line.startswith('| ') and '---' not in line and 'command' not in line}
    assert set(rows) == {'basicsr --help', 'refused option file', 'import hmoe_arch'}
    for row in rows.values():
        this, baseline = (float(cell.split()[0]) for cell in row[1:3])
        assert float(row[3].rstrip('x')) == pytest.approx(this / baseline, rel=0.02, abs=0.006)


def load_bench_quality() -> ModuleType:
    """benchmarks/bench_quality.py as a module (a script, not a package)."""
    spec = importlib.util.spec_from_file_location('bench_quality', BENCHMARKS / 'bench_quality.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def validation_log(psnr: float, routing: Optional[str] = None, shares: Optional[str] = None) -> List[str]:
    """The lines ``basicsr train`` logs for one validation of the set ``UCM``."""
    lines = ['2026-01-01 10:00:00,000 INFO: Validation UCM\n', f'\t # psnr: {psnr:.4f}\tBest: {psnr:.4f} @ 2 iter\n',
             '\n']
    if routing is not None:
        lines += [f'2026-01-01 10:00:00,001 INFO: routing on UCM: {routing}\n',
                  f'2026-01-01 10:00:00,001 INFO: routing on UCM, % of LR pixels per expert: {shares}\n']
    return lines


def parsed_run(bench, config: str, seed: int, folder: Path, experts_1pct: List[int], entropy: List[float],
               rerouted: List[Optional[float]], shares: List[str], seconds: float = 600.0):
    """A Run of 2 validations (every 250 of 500 iterations) fed a hand-made log; ``experts_1pct`` empty: no MoE."""
    run = bench.Run(config, seed, folder, {'val': {'val_freq': 250}, 'train': {'total_iter': 500}}, 1)
    for k in range(2):
        routing = None
        if experts_1pct:
            routing = (f'{experts_1pct[k]} of 4 experts serve >= 1% of LR pixels, entropy {entropy[k]:.3f} nats, '
                       'groups g0 60% g1 40%')
            if rerouted[k] is not None:
                routing += f', {100 * rerouted[k]:.2f}% of pixels rerouted since iteration {250 * k}'
        for line in validation_log(27.0 + k + seed / 10, routing, shares[k] if experts_1pct else None):
            run.parse(line)
    run.seconds = seconds
    return run


def test_bench_quality_reads_each_validations_psnr_and_routing_from_the_log(tmp_path: Path) -> None:
    bench = load_bench_quality()
    run = parsed_run(bench, 'bias', 0, tmp_path, [3, 4], [1.234, 1.386], [None, 0.0321],
                     ['g0 [60.00 0.00] g1 [39.00 1.00]', 'g0 [25.00 25.00] g1 [25.00 25.00]'])
    assert run.curve == [(250, 27.0), (500, 28.0)]
    assert run.routing == {
        250: {'experts_1pct': 3, 'experts': 4, 'entropy': 1.234, 'rerouted': None,
              'share': [[0.6, 0.0], [0.39, 0.01]]},
        500: {'experts_1pct': 4, 'experts': 4, 'entropy': 1.386, 'rerouted': pytest.approx(0.0321),
              'share': [[0.25, 0.25], [0.25, 0.25]]}}
    for line in validation_log(29.0, '1 of 4 experts serve >= 1% of LR pixels, entropy 0.000 nats, groups g0 100% '
                                     'g1 0%', 'g0 [100.00 0.00] g1 [0.00 0.00]'):  # BasicSR's repeat at the end
        assert run.parse(line) is None
    assert run.curve[-1] == (500, 28.0) and run.routing[500]['experts_1pct'] == 4
    hat = parsed_run(bench, 'hat', 0, tmp_path, [], [], [], [])
    assert hat.routing == {} and len(hat.curve) == 2


def test_bench_quality_resumes_runs_measured_with_routing_and_retrains_older_ones(tmp_path: Path) -> None:
    bench = load_bench_quality()
    opt = {'val': {'val_freq': 250}, 'train': {'total_iter': 500}}
    routing = {'500': {'experts_1pct': 2, 'experts': 4, 'entropy': 0.5, 'rerouted': 0.1, 'share': [[0.5, 0.5], [0, 0]]}}
    (tmp_path / 'new').mkdir()
    (tmp_path / 'new' / 'result.json').write_text(json.dumps({'opt': opt, 'curve': [[500, 27.0]], 'routing': routing,
                                                              'seconds': 60.0}))
    resumed = bench.Run('bias', 0, tmp_path / 'new', opt, 1)
    assert resumed.finished() and resumed.routing == {500: routing['500']} and resumed.curve == [(500, 27.0)]
    (tmp_path / 'old').mkdir()
    (tmp_path / 'old' / 'result.json').write_text(json.dumps({'opt': opt, 'curve': [[500, 27.0]], 'seconds': 60.0}))
    old = bench.Run('bias', 0, tmp_path / 'old', opt, 1)
    assert not old.finished() and old.unmeasured
    other = bench.Run('bias', 0, tmp_path / 'new', {**opt, 'train': {'total_iter': 1000}}, 1)
    assert not other.finished() and not other.unmeasured


def study(bench, folder: Path) -> list:
    """hat (no MoE) and two MoE configurations, 2 seeds, validated at 250 and 500 iterations."""
    uniform = 'g0 [25.00 25.00] g1 [25.00 25.00]'
    return [parsed_run(bench, 'hat', 0, folder, [], [], [], [], 300),
            parsed_run(bench, 'hat', 1, folder, [], [], [], [], 420),
            parsed_run(bench, 'authors', 0, folder, [2, 2], [0.5, 0.6], [None, 0.02],
                       ['g0 [90.00 0.00] g1 [10.00 0.00]', 'g0 [90.00 0.00] g1 [10.00 0.00]'], 600),
            parsed_run(bench, 'authors', 1, folder, [2, 3], [0.7, 0.8], [None, 0.04],
                       ['g0 [80.00 0.00] g1 [10.00 10.00]', 'g0 [70.00 0.00] g1 [20.00 10.00]'], 660),
            parsed_run(bench, 'bias', 0, folder, [4, 4], [1.386, 1.386], [None, 0.5], [uniform, uniform], 900),
            parsed_run(bench, 'bias', 1, folder, [4, 4], [1.386, 1.386], [None, 0.3], [uniform, uniform], 900)]


def test_bench_quality_table_and_csv_carry_the_routing_and_the_run_time(tmp_path: Path) -> None:
    bench = load_bench_quality()
    runs = study(bench, tmp_path)
    report = bench.summarise(runs, [250, 500], 'authors', 26.5, 'settings')
    rows = [line.strip('| ').split(' | ') for line in report.splitlines() if line.startswith('| ')
            and not line.startswith('| ---')]
    assert rows[0][-1] == 'run time (min, mean)' and rows[1][-1] == '6.0' and rows[2][-1] == '10.5'  # hat, authors
    routing = rows[rows.index(['configuration'] + [f'{b} it: {what}' for b in (250, 500)
                                                   for what in ('experts >= 1 %', 'entropy', 'rerouted')]):]
    assert routing[1:] == [['authors', '2.0 of 4', '0.60', '-', '2.5 of 4', '0.70', '3.0 %'],
                           ['bias', '4.0 of 4', '1.39', '-', '4.0 of 4', '1.39', '40.0 %']]  # hat has no routing
    bench.write_csv(runs, 26.5, tmp_path / 'quality.csv')
    with open(tmp_path / 'quality.csv') as f:
        table = list(csv.reader(f))
    assert table[0] == ['config', 'seed', 'iteration', 'psnr_y', 'run_seconds', 'experts_1pct', 'entropy', 'rerouted']
    assert table[1] == ['hat', '0', '250', '27.0000', '300', '', '', '']
    assert table[7] == ['authors', '1', '250', '27.1000', '660', '2', '0.7000', '']
    assert table[8] == ['authors', '1', '500', '28.1000', '660', '3', '0.8000', '0.0400']
    assert table[-1] == ['bicubic', '', '', '26.5000', '', '', '', '']


def test_bench_quality_usage_plot_draws_each_experts_mean_share(tmp_path: Path) -> None:
    bench = load_bench_quality()
    from hmoe_arch.expert_maps import expert_palette
    runs = study(bench, tmp_path)
    usage = bench.last_usage(runs)
    assert list(usage) == ['authors', 'bias']  # hat routes nothing
    assert usage['authors']['iteration'] == 500 and usage['authors']['seeds'] == 2
    np.testing.assert_allclose(usage['authors']['share'], [[0.8, 0.0], [0.15, 0.05]])
    assert usage['authors']['experts_1pct'] == 2.5 and usage['authors']['entropy'] == pytest.approx(0.7)
    path = tmp_path / 'usage.png'
    texts = bench.plot_usage(runs, path, 'a title ' * 30)
    image = cv2.imread(str(path))
    height, width = image.shape[:2]
    drawn = [t.text for t in texts]
    assert 'authors at iteration 500 (mean of 2 seeds): 2.5 experts serve >= 1 %, entropy 0.70 nats' in drawn
    assert drawn.count('80.0') == 1 and drawn.count('25.0') == 4 and drawn.count('group 1') == 2
    assert drawn.count('0') == 1  # the authors' expert 1, which no pixel chose
    for text in texts:  # OpenCV's extent of every text lies inside the image, and no ink reaches its edge
        left, top, right, bottom = text.box()
        assert 0 <= left and right < width and 0 <= top and bottom < height, (text, width, height)
    edges = np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]])
    assert (edges == 255).all()
    # the first expert's bars in its expert-map colour: 80 % (authors) and 25 % (bias) of 100 pixels
    inside = np.all(image == expert_palette([2, 2])[0], axis=-1)
    runs_down = [len(part) for column in inside.T for part in ''.join('1' if v else ' ' for v in column).split()]
    assert math.isclose(max(runs_down), 80, abs_tol=1) and any(math.isclose(n, 25, abs_tol=1) for n in runs_down)
    assert bench.plot_usage(runs[:2], tmp_path / 'none.png', 'hat only') == []
    assert not (tmp_path / 'none.png').exists()


def test_bench_quality_study_changes_apply_to_every_run_and_configurations_still_win(tmp_path: Path) -> None:
    bench = load_bench_quality()
    study = bench.parse_changes(['train:ema_decay=0.999', 'network_g:balance_rate=0.01'], '--set')
    assert study == {'train:ema_decay': 0.999, 'network_g:balance_rate': 0.01}
    base = BENCHMARKS.parent / 'options' / 'train_ucm_x4.yml'
    common = dict(data=tmp_path, seed=3, iters=80, val_every=20, scale=4)
    plain = bench.option_for(base, 'tiny', bench.CONFIGS['authors'], **common)
    assert plain['train']['ema_decay'] == 0  # the tiny preset's
    ema = bench.option_for(base, 'tiny', {'network_g:balance_rate': 0.1}, study_changes=study, **common)
    assert ema['train']['ema_decay'] == 0.999 and ema['network_g']['balance_rate'] == 0.1
    assert ema['manual_seed'] == 3 and ema['train']['total_iter'] == 80
    with pytest.raises(SystemExit, match=r"--set: 'train:ema_decay' is not KEY=VALUE"):
        bench.parse_changes(['train:ema_decay'], '--set')


def test_bench_quality_tabulates_a_configuration_with_fewer_seeds_over_the_seeds_it_has(tmp_path: Path) -> None:
    bench = load_bench_quality()
    runs = [run for run in study(bench, tmp_path) if (run.config, run.seed) != ('bias', 1)]
    report = bench.summarise(runs, [250, 500], 'authors', 26.5, 'settings')
    rows = {}
    for line in report.splitlines():  # the PSNR table comes first, the routing table (same names) after it
        if line.startswith('| ') and not line.startswith('| ---'):
            rows.setdefault(line.strip('| ').split(' | ')[0], line.strip('| ').split(' | '))
    paired = '+0.000 (min +0.000, max +0.000) (n=1)'
    assert rows['bias'][1:6] == ['27.000 +- 0.000 (n=1)', '28.000 +- 0.000 (n=1)', paired, paired, '28.000, -']
    assert rows['hat'][1] == '27.050 +- 0.071' and rows['hat'][5] == '28.000, 28.100'


@pytest.mark.slow  # imports two benchmark scripts and what they import (seconds)
def test_bench_train_tiny_network_is_the_quality_studys(monkeypatch: pytest.MonkeyPatch) -> None:
    """bench_train.py's workers cannot import bench_quality.py (it puts this checkout first on the path, which
    would hide a release's code), so the tiny network is written twice: the two must agree."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location('bench_train_under_test', BENCHMARKS / 'bench_train.py')
    bench_train = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench_train)
    preset = load_bench_quality().PRESETS['tiny']
    study = {key.split(':', 1)[1]: value for key, value in preset.items() if key.startswith('network_g:')}
    assert bench_train.SIDE_NETWORKS['tiny'] == study
    assert bench_train.SIDE_BATCHES['tiny'] == (4, preset['datasets:train:gt_size'] // 4)
