"""How the ``basicsr`` commands have glibc's allocator keep the memory of freed CPU tensors.

By default glibc gives memory back to the operating system as soon as more than 128 KiB lie free at the top of
its heap, and serves large blocks with fresh ``mmap`` pages. A training step or a forward frees and allocates
tensors of the same sizes again and again, so the kernel faults in and zeroes the same memory at every step.
With :func:`keep_freed_memory` glibc serves blocks below 32 MiB from its heap and keeps up to 1 GiB of free heap
for the next allocations: the resident set stays near the peak of the run instead of following every step. On
the 2-core machine of ``docs/performance.md`` a tiny training step took 0.90x (1 thread) / 0.94x (2 threads) and
a tiny forward of a 64x64 image 0.91x / 0.89x the time with glibc's defaults
(``benchmarks/bench_train.py --against glibc-defaults``, both sides alternating).

Where the environment sets any of glibc's ``MALLOC_*_`` variables (``MALLOC_TRIM_THRESHOLD_``,
``MALLOC_MMAP_THRESHOLD_``, ...), the user has chosen and nothing changes; other C libraries are left alone.
:func:`glibc_mallopt` is also what the memory measurements of ``basicsr bench`` use to fix the threshold.
"""
import ctypes
import os
from typing import Callable, Optional

M_TRIM_THRESHOLD = -1
"""``mallopt`` parameter: free memory at the heap's top above which glibc returns it to the system."""
M_MMAP_THRESHOLD = -3
"""``mallopt`` parameter: blocks at least this large get their own ``mmap`` (and go back to the system on free)."""
MMAP_THRESHOLD = 32 * 1024 * 1024
"""The largest value glibc accepts on 64-bit systems (half its heap size)."""
TRIM_THRESHOLD = 1024 ** 3
"""Free heap glibc keeps for reuse."""


def glibc_mallopt() -> Optional[Callable[[int, int], int]]:
    """glibc's ``mallopt(parameter, value)`` (it returns 1 when it accepted the value), or None where the process's
    C library is not glibc."""
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # only glibc has it
        return libc.mallopt
    except (OSError, AttributeError):
        return None


def keep_freed_memory() -> str:
    """Set glibc's thresholds to :data:`MMAP_THRESHOLD` and :data:`TRIM_THRESHOLD` unless the environment chose
    them; returns what was done, for the log."""
    chosen = sorted(name for name in os.environ if name.startswith('MALLOC_') and name.endswith('_'))
    if chosen:
        return f'glibc allocator as the environment sets it ({", ".join(chosen)})'
    mallopt = glibc_mallopt()
    if mallopt is None:
        return 'system allocator (not glibc), unchanged'
    if not (mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)):
        return 'glibc allocator unchanged (mallopt refused the thresholds)'
    return ('glibc keeps freed memory for reuse (blocks below 32 MiB from its heap, up to 1 GiB kept free; '
            'MALLOC_TRIM_THRESHOLD_ in the environment to choose)')
