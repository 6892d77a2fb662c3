"""glibc's thresholds for the commands' CPU runs: set unless the environment chose, kept freed memory for real."""
import ctypes
import os
import subprocess
import sys
from typing import List, Tuple

import pytest

from hmoe_arch import allocator
from hmoe_arch.allocator import MMAP_THRESHOLD, TRIM_THRESHOLD, glibc_mallopt, keep_freed_memory
from hmoe_arch.commands.bench import fix_malloc_threshold


class FakeLibc:
    """Records ``mallopt`` calls; ``glibc`` decides whether it has ``gnu_get_libc_version``."""

    def __init__(self, glibc: bool = True, accepts: bool = True) -> None:
        self.calls: List[Tuple[int, int]] = []
        self.accepts = accepts
        if glibc:
            self.gnu_get_libc_version = lambda: b'2.39'

    def mallopt(self, parameter: int, value: int) -> int:
        self.calls.append((parameter, value))
        return int(self.accepts)


@pytest.fixture
def no_malloc_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in [n for n in os.environ if n.startswith('MALLOC_')]:
        monkeypatch.delenv(name)
    return monkeypatch


def test_glibc_gets_both_thresholds(no_malloc_env: pytest.MonkeyPatch) -> None:
    libc = FakeLibc()
    no_malloc_env.setattr(allocator.ctypes, 'CDLL', lambda name: libc)
    assert keep_freed_memory().startswith('glibc keeps freed memory for reuse (blocks below 32 MiB')
    assert libc.calls == [(-3, 32 * 1024 * 1024), (-1, 1024 ** 3)]
    assert (MMAP_THRESHOLD, TRIM_THRESHOLD) == (32 * 1024 * 1024, 1024 ** 3)
    # basicsr bench's memory measurement fixes the mmap threshold through the same glibc lookup
    fix_malloc_threshold()
    assert libc.calls[-1] == (-3, 65536)
    no_malloc_env.setattr(allocator.ctypes, 'CDLL', lambda name: FakeLibc(glibc=False))
    assert glibc_mallopt() is None
    fix_malloc_threshold()  # nothing to set, no error


def test_the_environments_choice_and_other_libraries_are_left_alone(no_malloc_env: pytest.MonkeyPatch) -> None:
    libc = FakeLibc()
    no_malloc_env.setattr(allocator.ctypes, 'CDLL', lambda name: libc)
    no_malloc_env.setenv('MALLOC_TRIM_THRESHOLD_', '131072')
    no_malloc_env.setenv('MALLOC_ARENA_MAX', '2')  # not a threshold variable: glibc's names end in _
    assert keep_freed_memory() == 'glibc allocator as the environment sets it (MALLOC_TRIM_THRESHOLD_)'
    assert libc.calls == []
    no_malloc_env.delenv('MALLOC_TRIM_THRESHOLD_')
    no_malloc_env.setattr(allocator.ctypes, 'CDLL', lambda name: FakeLibc(glibc=False))
    assert keep_freed_memory() == 'system allocator (not glibc), unchanged'

    def missing(name):
        raise OSError('no C library')

    no_malloc_env.setattr(allocator.ctypes, 'CDLL', missing)
    assert keep_freed_memory() == 'system allocator (not glibc), unchanged'
    refusing = FakeLibc(accepts=False)
    no_malloc_env.setattr(allocator.ctypes, 'CDLL', lambda name: refusing)
    assert keep_freed_memory() == 'glibc allocator unchanged (mallopt refused the thresholds)'


KEEPS = """
import sys
from hmoe_arch.allocator import keep_freed_memory

def resident_kib():
    with open('/proc/self/status') as f:
        return next(int(line.split()[1]) for line in f if line.startswith('VmRSS:'))

if sys.argv[1] == 'keep':
    keep_freed_memory()
blocks = [bytearray(4 * 1024 * 1024) for _ in range(25)]  # 100 MiB in blocks torch's activations are like
held = resident_kib()
del blocks
print(held - resident_kib())
"""


@pytest.mark.skipif(not sys.platform.startswith('linux'), reason='glibc and /proc/self/status: Linux only')
def test_freed_blocks_stay_with_the_process_only_when_kept(no_malloc_env: pytest.MonkeyPatch) -> None:
    try:
        ctypes.CDLL(None).gnu_get_libc_version
    except AttributeError:
        pytest.skip('the C library is not glibc')
    returned = {}
    for mode in ('default', 'keep'):
        done = subprocess.run([sys.executable, '-c', KEEPS, mode], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        returned[mode] = int(done.stdout)
    assert returned['default'] > 90 * 1024  # glibc unmapped the 4 MiB blocks at once
    assert returned['keep'] < 10 * 1024  # kept for the next allocations
