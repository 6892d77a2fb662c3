"""How many CPU threads torch uses in the ``basicsr`` commands (``--num-threads``, ``num_threads:``).

torch starts one intra-op thread per core. On a machine that other work is also using, threads that wait for
each other at every operation's barrier make small networks several times slower than one thread (measured in
``benchmarks/bench_threads.py``; numbers in docs/performance.md). ``auto`` therefore takes the cores the machine
has free when the command starts: the cores this process may use, less the one-minute load average, at least one;
where ``OMP_NUM_THREADS`` is set, torch's default (which follows it) is left as it is.
"""
import os
from typing import Callable, Optional, Tuple


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity where the platform tells it)."""
    if hasattr(os, 'sched_getaffinity'):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def load_average() -> float:
    """The one-minute load average (0 where the platform has none)."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return 0.0


def choose_num_threads(requested: Optional[int], on_cpu: bool = True, cores: Callable[[], int] = usable_cores,
                       load: Callable[[], float] = load_average) -> Optional[int]:
    """Threads for torch: ``requested`` when given; None (torch's own default) for GPU runs and where
    ``OMP_NUM_THREADS`` is set; on a CPU, the cores not busy with other work (``cores() - round(load())``), from 1 to
    ``cores()``."""
    if requested is not None:
        return requested
    if not on_cpu or os.environ.get('OMP_NUM_THREADS'):
        return None
    total = cores()
    return max(1, min(total, total - round(load())))


def apply_num_threads(requested: Optional[int], on_cpu: bool = True) -> Tuple[int, str]:
    """Set torch's intra-op threads by :func:`choose_num_threads`; returns the number in use and why (for the
    log)."""
    import torch

    cores, load = usable_cores(), load_average()  # read once: the decision and the log line agree
    chosen = choose_num_threads(requested, on_cpu, cores=lambda: cores, load=lambda: load)
    if chosen is not None:
        torch.set_num_threads(chosen)
    reason = ('asked for' if requested is not None else
              'torch default (GPU run)' if not on_cpu else
              f'OMP_NUM_THREADS={os.environ.get("OMP_NUM_THREADS")}' if chosen is None else
              f'auto: {cores} cores, load average {load:.1f}')
    return torch.get_num_threads(), reason
