"""Start-up time of the ``basicsr`` command as a user feels it: ``--help``, a refused option file, ``import
hmoe_arch``; each against a baseline checkout (e.g. the release before the lazy imports) in the same run.

Every command runs in a fresh interpreter (``python -m hmoe_arch ...`` from the side's checkout, so that its
``hmoe_arch`` is the one imported), the two sides alternating; the script prints the median and the range of each
and the ratio of the medians. It asserts nothing.

Usage::

    git worktree add /tmp/hmoe-base <commit before the change>
    python benchmarks/bench_startup.py --baseline /tmp/hmoe-base [--repeats 7]
"""
import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List

HERE = Path(__file__).resolve().parents[1]
BAD_YAML = 'name: [unclosed\n'


def commands(bad_option_file: Path) -> Dict[str, List[str]]:
    """Label -> arguments after ``python``."""
    return {
        'basicsr --help': ['-m', 'hmoe_arch', '--help'],
        'refused option file': ['-m', 'hmoe_arch', 'train', '-opt', str(bad_option_file)],
        'import hmoe_arch': ['-c', 'import hmoe_arch'],
    }


def seconds(arguments: List[str], checkout: Path) -> float:
    """Wall time of one ``python ARGUMENTS`` run from ``checkout``."""
    start = time.perf_counter()
    subprocess.run([sys.executable, *arguments], cwd=checkout, capture_output=True, timeout=600)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--baseline', type=Path, required=True, help='checkout of the version to compare with')
    parser.add_argument('--repeats', type=int, default=7)
    args = parser.parse_args()
    sides = {'this checkout': HERE, 'baseline': args.baseline.resolve()}
    with tempfile.TemporaryDirectory() as tmp:
        bad = Path(tmp) / 'bad.yml'
        bad.write_text(BAD_YAML)
        table = commands(bad)
        times: Dict[str, Dict[str, List[float]]] = {label: {side: [] for side in sides} for label in table}
        for _ in range(args.repeats):
            for label, arguments in table.items():
                for side, checkout in sides.items():
                    times[label][side].append(seconds(arguments, checkout))
    print(f'start-up, median of {args.repeats} alternating runs (range), Python {sys.version.split()[0]}; '
          f'baseline: {sides["baseline"]}\n')
    print('| command | this checkout (ms) | baseline (ms) | ratio |')
    print('| --- | --- | --- | --- |')
    for label, by_side in times.items():
        cells = [f'{1000 * statistics.median(v):.1f} ({1000 * min(v):.1f}-{1000 * max(v):.1f})'
                 for v in by_side.values()]
        ratio = statistics.median(by_side['this checkout']) / statistics.median(by_side['baseline'])
        print(f'| {label} | {cells[0]} | {cells[1]} | {ratio:.3f}x |')


if __name__ == '__main__':
    main()
