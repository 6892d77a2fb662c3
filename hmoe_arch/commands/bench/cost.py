"""Cost of one forward: multiply-accumulates, median latency and peak memory (CUDA allocator or the CPU's peak
resident set). Also used by the scripts in ``benchmarks/``."""
import statistics
import time
from typing import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode

from ...allocator import M_MMAP_THRESHOLD, glibc_mallopt


def count_macs(net: torch.nn.Module, lr_size: int, device: torch.device) -> float:
    """Multiply-accumulates of one forward on a random ``(1, 3, lr_size, lr_size)`` input."""
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        net(torch.rand(1, 3, lr_size, lr_size, device=device))
    return counter.get_total_flops() / 2


def fix_malloc_threshold() -> None:
    """Make glibc serve allocations above 64 KiB with mmap and return them on free (no dynamic threshold), so
    the resident set follows the live tensors; nothing where the C library is not glibc."""
    mallopt = glibc_mallopt()
    if mallopt is not None:
        mallopt(M_MMAP_THRESHOLD, 65536)


def _status_kib(field_name: str) -> int:
    with open('/proc/self/status') as f:
        for line in f:
            if line.startswith(field_name + ':'):
                return int(line.split()[1])
    raise RuntimeError(f'/proc/self/status has no {field_name}')


def peak_memory_mib(fn: Callable[[], object], device: torch.device) -> float:
    """Peak memory that one call of ``fn`` adds: CUDA ``max_memory_allocated`` above the allocation before
    it, or on the CPU the rise of the peak resident set (VmHWM, reset via ``/proc/self/clear_refs``); NaN
    where neither is available."""
    if device.type == 'cuda':
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    try:
        with open('/proc/self/clear_refs', 'w') as f:
            f.write('5')
        base = _status_kib('VmRSS')
        fn()
        return (_status_kib('VmHWM') - base) / 1024
    except OSError:
        return float('nan')


def forward_latency(net: torch.nn.Module, lr_size: int, device: torch.device, runs: int) -> float:
    """Median seconds of one forward at ``lr_size`` (after one untimed forward)."""
    x = torch.rand(1, 3, lr_size, lr_size, device=device)
    cuda = device.type == 'cuda'
    times = []
    with torch.no_grad():
        net(x)
        for _ in range(runs):
            if cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            net(x)
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def forward_peak_mib(net: torch.nn.Module, lr_size: int, device: torch.device) -> float:
    """Peak MiB of one forward of ``net`` on a random ``(1, 3, lr_size, lr_size)`` input in this process (see
    :func:`peak_memory_mib`; on the CPU call :func:`fix_malloc_threshold` first, before anything large)."""
    x = torch.rand(1, 3, lr_size, lr_size, device=device)
    with torch.no_grad():
        net(x)  # first-call allocations (thread pools, kernels) are not the network's
        return peak_memory_mib(lambda: net(x), device)
