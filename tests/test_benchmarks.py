"""The benchmark scripts run on CPU at small sizes and print their tables (they assert nothing themselves)."""
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # runs the benchmark scripts

BENCHMARKS = Path(__file__).resolve().parents[1] / 'benchmarks'


def run(script: str, *args: str) -> str:
    result = subprocess.run([sys.executable, str(BENCHMARKS / script), *args], capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_bench_train_prints_every_row_with_ratios_against_hat() -> None:
    out = run('bench_train.py', '--batch', '1', '--size', '16', '--steps', '1', '--warmup', '1', '--modes',
              'fp32-plain', 'bf16')
    rows = [line.strip('| ').split(' | ') for line in out.splitlines()
            if line.startswith('| ') and 'network' not in line and '---' not in line]
    assert [r[:3] for r in rows] == [['hat', 'fp32-plain', 'plain'], ['hat', 'bf16', 'sdpa'],
                                     ['moe', 'fp32-plain', 'plain'], ['moe', 'bf16', 'sdpa'],
                                     ['moe_dense', 'fp32-plain', 'plain'], ['moe_dense', 'bf16', 'sdpa']]
    step = {(r[0], r[1]): float(r[3]) for r in rows}
    by_key = {(r[0], r[1]): r for r in rows}
    assert by_key['hat', 'fp32-plain'][4:6] == ['1.000x', '1.000x']
    # against the HAT fp32-plain row, and against the HAT row of the same mode
    moe_bf16 = by_key['moe', 'bf16']
    close = dict(rel=5e-3, abs=1e-3)  # the table rounds steps to 0.1 ms and ratios to 0.001
    assert float(moe_bf16[4].rstrip('x')) == pytest.approx(step['moe', 'bf16'] / step['hat', 'fp32-plain'], **close)
    assert float(moe_bf16[5].rstrip('x')) == pytest.approx(step['moe', 'bf16'] / step['hat', 'bf16'], **close)
    speedups = dict(item.split() for item in re.search(r'\(speed-up\): (.*)', out).group(1).split(', '))
    assert set(speedups) == {'hat', 'moe', 'moe_dense'}
    assert float(speedups['moe'].rstrip('x')) == pytest.approx(step['moe', 'fp32-plain'] / step['moe', 'bf16'],
                                                                rel=5e-3, abs=6e-3)


def test_bench_tiling_reports_sizes_and_seam_error() -> None:
    out = run('bench_tiling.py', '--sizes', '32', '64', '--tile', '16', '--tile-pad', '8', '--seam-size', '32',
              '--scale', '2', '--infer-sizes', '64')
    assert '| 32x32 |' in out and '| 64x64 |' in out
    assert 'seam error on 32x32 LR' in out
    infer_row = re.search(r'\| 64x64 \| (\S+) \| (\S+) \| (\S+) \|\n*$', out)
    assert infer_row and float(infer_row.group(2)) == pytest.approx(128 * 128 * 3 / 2**20, abs=0.05)


def test_bench_arch_prints_the_ratio_table() -> None:
    out = run('bench_arch.py', '--size', '16', '--runs', '1', '--warmup', '0')
    for measure in ('full forward (s)', 'MoE head vs upsampler (ms)', 'peak memory of a forward (MiB)'):
        assert f'| {measure} |' in out
    # the authors' dense head runs on the same weights as the sparse one, so their outputs agree
    assert float(re.search(r'dense vs sparse max \|diff\| (\S+)', out).group(1)) < 1e-4


def test_bench_onnx_prints_both_runtimes_and_the_ratio() -> None:
    pytest.importorskip('onnxruntime', reason='onnxruntime is not installed (pip install -e .[export])')
    out = run('bench_onnx.py', '--tiny', '--size', '16', '--runs', '1')
    assert '| PyTorch eager (sparse experts) |' in out and '| onnxruntime (dense experts) |' in out
    assert re.search(r'ONNX / PyTorch: \d+\.\d\dx', out)


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
    assert '6 of 6 runs already done' in run('bench_quality.py', *args)


def test_diagnose_routing_reports_each_mode(workdir: Path, tmp_path: Path) -> None:
    run('diagnose_routing.py', '--data', str(workdir / 'datasets' / 'UCMerced'), '--out', str(tmp_path / 'd'),
              '--iters', '4', '--every', '2', '--modes', 'none', 'straight_through')
    rows = [line for line in (tmp_path / 'd' / 'diagnose.md').read_text().splitlines() if line.startswith('| none')
            or line.startswith('| straight_through')]
    assert len(rows) == 6  # iterations 1, 2 and 4 of each mode
    assert all(line.split(' | ')[5] == '0' for line in rows if line.startswith('| none'))  # backbone shift


def test_bench_threads_prints_both_thread_counts_and_their_ratio() -> None:
    out = run('bench_threads.py', '--workloads', 'tiny_step', '--repeats', '1', '--warmup', '0', '--busy', '1',
              '--busy-limit', '60')
    rows = [line.strip('| ').split(' | ') for line in out.splitlines() if line.startswith('| tiny_step')]
    assert [r[:2] for r in rows] == [['tiny_step', '1'], ['tiny_step', '2']]
    times = [float(r[2]) for r in rows]
    ratio = float(re.search(r'tiny_step (\d+\.\d+)x', out).group(1))
    assert ratio == pytest.approx(times[0] / times[1], rel=0.01, abs=0.01)
    assert '1 kept busy by this script' in out


def test_bench_startup_prints_each_command_against_the_baseline() -> None:
    out = run('bench_startup.py', '--baseline', str(BENCHMARKS.parent), '--repeats', '1')
    rows = {line.strip('| ').split(' | ')[0]: line.strip('| ').split(' | ') for line in out.splitlines()
            if line.startswith('| ') and '---' not in line and 'command' not in line}
    assert set(rows) == {'basicsr --help', 'refused option file', 'import hmoe_arch'}
    for row in rows.values():
        this, baseline = (float(cell.split()[0]) for cell in row[1:3])
        assert float(row[3].rstrip('x')) == pytest.approx(this / baseline, rel=0.02, abs=0.006)
