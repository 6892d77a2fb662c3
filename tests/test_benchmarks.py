"""The benchmark scripts run on CPU at small sizes and print their tables (they assert nothing themselves)."""
import re
import subprocess
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / 'benchmarks'


def run(script: str, *args: str) -> str:
    result = subprocess.run([sys.executable, str(BENCHMARKS / script), *args], capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_bench_train_prints_every_row_with_ratios_against_hat() -> None:
    out = run('bench_train.py', '--batch', '1', '--size', '16', '--steps', '1', '--warmup', '1', '--modes', 'fp32',
              'bf16')
    rows = [line for line in out.splitlines() if line.startswith('| ') and 'network' not in line and '---' not in line]
    assert [tuple(r.split(' | ')[0:2]) for r in rows] == [('| hat', 'fp32'), ('| hat', 'bf16'), ('| moe', 'fp32'),
                                                           ('| moe', 'bf16'), ('| moe_dense', 'fp32'),
                                                           ('| moe_dense', 'bf16')]
    assert rows[0].split(' | ')[3] == '1.000x'


def test_bench_tiling_reports_sizes_and_seam_error() -> None:
    out = run('bench_tiling.py', '--sizes', '32', '64', '--tile', '16', '--tile-pad', '8', '--seam-size', '32',
              '--scale', '2')
    assert '| 32x32 |' in out and '| 64x64 |' in out
    assert 'seam error on 32x32 LR' in out


def test_bench_arch_prints_the_ratio_table() -> None:
    out = run('bench_arch.py', '--size', '16', '--runs', '1', '--warmup', '0')
    for measure in ('full forward (s)', 'MoE head vs upsampler (ms)', 'peak memory of a forward (MiB)'):
        assert f'| {measure} |' in out
    # the authors' dense head runs on the same weights as the sparse one, so their outputs agree
    assert float(re.search(r'dense vs sparse max \|diff\| (\S+)', out).group(1)) < 1e-4
