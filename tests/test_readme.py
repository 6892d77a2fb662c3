"""The README's quick start, run literally as a new user would (slow: prepares, trains 200 iterations, infers), and
the README's statements about it checked against what the commands do."""
import re
import shlex
import subprocess
from pathlib import Path

import cv2
import pytest

from util import docs_block

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / 'shared'


def quick_start_commands() -> list:
    """The commands of the README's quick-start block, in order."""
    block = docs_block('../README.md', 'bash', '../shared/data/UCMerced_mini --out')
    return [line for line in block.splitlines() if line.strip()]


@pytest.mark.slow
def test_quick_start_runs_literally_and_does_what_the_readme_says(tmp_path: Path) -> None:
    if not (SHARED / 'data' / 'UCMerced_mini' / 'Images').is_dir():
        pytest.skip(f'the UCMerced subset is not at {SHARED / "data" / "UCMerced_mini"}')
    work = tmp_path / 'clone'  # a checkout's layout: options/ here, ../shared beside it
    work.mkdir()
    (work / 'options').symlink_to(ROOT / 'options')
    (tmp_path / 'shared').symlink_to(SHARED)
    logs = []
    for line in quick_start_commands():
        result = subprocess.run(shlex.split(line), cwd=work, capture_output=True, text=True, timeout=1800)
        assert result.returncode == 0, (line, result.stderr[-3000:])
        logs.append(result.stderr)
    prepared = work / 'datasets' / 'UCMerced'
    train = (prepared / 'train.txt').read_text().split()
    test = (prepared / 'test.txt').read_text().split()
    readme = (ROOT / 'README.md').read_text()
    said = re.search(r'splits the (\d+) images \((\d+) per class: (\d+) train, (\d+) test\)', readme)
    assert said is not None, 'the README no longer says how prepare splits the subset'
    assert [int(n) for n in said.groups()] == [len(train) + len(test), (len(train) + len(test)) // 21, len(train),
                                               len(test)]
    validations = re.findall(r'Validation (\S+)', logs[1])
    assert len(validations) == 1, logs[1][-3000:]  # "validates once"
    assert re.search(r'\| 63/63 \[', logs[1]), 'no progress bar in the validation'  # "with a progress bar"
    assert 'eta: -' not in logs[1]
    output = cv2.imread(str(work / 'airplane00_x4.png'))
    assert output.shape == (1024, 1024, 3)
