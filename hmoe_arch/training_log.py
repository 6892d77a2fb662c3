"""The training log: a short text line per ``print_freq`` iterations, and an early estimate of the run's duration.

- :class:`TrainingMessageLogger` is BasicSR's ``MessageLogger`` (same constructor and call) whose text line
  summarises the expert usage (the most used experts with their share, how many more were used and how many were
  unused) instead of printing every ``routing/expert_<e>`` fraction; TensorBoard (and wandb, which BasicSR syncs
  from TensorBoard) still receives every value. Its ``eta`` is never negative.
- :class:`RunEstimate` times the first iterations of a run (skipping the first, which includes the warm-up) and
  logs one line with the seconds per iteration, the loss so far and the time the remaining iterations take;
  a WARNING that points to the CPU advice of ``docs/training.md`` when that exceeds a day on a CPU.
  :meth:`MFGHMoEModel.optimize_parameters <hmoe_arch.models.MFGHMoEModel.optimize_parameters>` drives it.
"""
import datetime
import logging
import re
import time
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

from basicsr.utils import get_root_logger
from basicsr.utils.dist_util import master_only
from basicsr.utils.logger import MessageLogger

Clock = Callable[[], float]
"""A function returning seconds (only differences are used): :func:`time.perf_counter` unless a test injects one."""

EXPERT_KEY = re.compile(r'routing/expert_(\d+)$')
GROUP_KEY = re.compile(r'routing/group_(\d+)$')
ENTROPY_KEY = 'routing/entropy'
CPU_ADVICE = 'see "Training on a CPU" in docs/training.md'
"""Where the warning of :class:`RunEstimate` sends a user whose run would take more than a day on a CPU."""
DAY_SECONDS = 24 * 3600


def duration(seconds: float) -> str:
    """``H:MM:SS`` (``N days, H:MM:SS`` from a day on) of whole seconds; a negative time reads ``0:00:00``."""
    return str(datetime.timedelta(seconds=int(max(0.0, seconds))))


def percent(share: float) -> str:
    """A share in [0, 1] as a percentage: whole percent from 10%, one decimal below, ``<0.1%`` below 0.05%."""
    if share >= 0.0995:
        return f'{100 * share:.0f}%'
    if share >= 0.0005:
        return f'{100 * share:.1f}%'
    return '<0.1%'


def is_routing_key(key: str) -> bool:
    """Whether :func:`routing_summary` shows ``key`` (``routing/expert_<e>``, ``routing/group_<g>``,
    ``routing/entropy``, as :meth:`MFGHMoEModel.get_current_log` writes them)."""
    return bool(EXPERT_KEY.match(key) or GROUP_KEY.match(key)) or key == ENTROPY_KEY


def routing_summary(values: Mapping[str, float], top: int = 3) -> str:
    """The routing part of a log line, e.g. ``experts: e3 71%, e9 22%, e0 5.0% (+2 more; 11 unused) groups: g0 78%,
    g1 22% entropy: 0.851``: the ``top`` most used experts (largest share first, ties by index), how many more
    were used, how many got no pixel (share 0), the share of each group and the entropy of the usage in nats.
    Keys that are not :func:`is_routing_key` are left out; an empty string when there are none."""
    experts: List[Tuple[int, float]] = []
    groups: List[Tuple[int, float]] = []
    for key, value in values.items():
        expert, group = EXPERT_KEY.match(key), GROUP_KEY.match(key)
        if expert:
            experts.append((int(expert.group(1)), float(value)))
        elif group:
            groups.append((int(group.group(1)), float(value)))
    parts = []
    if experts:
        used = sorted(((e, share) for e, share in experts if share > 0), key=lambda item: (-item[1], item[0]))
        shown = ', '.join(f'e{e} {percent(share)}' for e, share in used[:top])
        notes = [f'+{len(used) - top} more'] if len(used) > top else []
        if len(used) < len(experts):
            notes.append(f'{len(experts) - len(used)} unused')
        parts.append(f'experts: {shown or "none used"}' + (f' ({"; ".join(notes)})' if notes else ''))
    if groups:
        parts.append('groups: ' + ', '.join(f'g{g} {percent(share)}' for g, share in sorted(groups)))
    if ENTROPY_KEY in values:
        parts.append(f'entropy: {float(values[ENTROPY_KEY]):.3f}')
    return ' '.join(parts)


class TrainingMessageLogger(MessageLogger):
    """BasicSR's ``MessageLogger`` with a short line and an ``eta`` that is never negative.

    Constructed and called as BasicSR's (``TrainingMessageLogger(opt, start_iter, tb_logger)``, then
    ``logger(log_vars)`` with ``epoch``, ``iter``, ``lrs``, optionally ``time`` and ``data_time``, and the values
    of ``model.get_current_log()``), so it can stand in for ``MessageLogger`` in BasicSR's ``train.py``. The line
    is BasicSR's with the routing values (:func:`is_routing_key`) replaced by :func:`routing_summary`;
    TensorBoard gets every value under BasicSR's tags (``losses/<key>`` for ``l_*`` keys, the key otherwise).

    ``eta``: the mean time per iteration since the clock started (at construction; BasicSR's ``train.py`` restarts
    it with :meth:`reset_start_time` after the first iteration of a new run, which is then not counted) times the
    iterations left, ``total_iter - iter`` (0 at the last line). ``clock`` replaces :func:`time.perf_counter`.
    """

    def __init__(self, opt: Dict[str, Any], start_iter: int = 1, tb_logger: Any = None, *,
                 clock: Clock = time.perf_counter) -> None:
        super().__init__(opt, start_iter, tb_logger)
        self.clock = clock
        self.start_time = clock()
        self.timed_from = start_iter
        """The iteration after which the clock started: iterations ``timed_from + 1 ..`` are in the mean."""

    def reset_start_time(self) -> None:
        """Restart the clock; BasicSR's ``train.py`` calls it after the first iteration of a new run."""
        self.start_time = self.clock()
        self.timed_from = self.start_iter + 1

    def eta_seconds(self, current_iter: int) -> float:
        """Seconds the iterations after ``current_iter`` take at the mean time per iteration so far; >= 0."""
        per_iter = (self.clock() - self.start_time) / max(1, current_iter - self.timed_from)
        return max(0.0, per_iter * (int(self.max_iters) - current_iter))

    @master_only
    def __call__(self, log_vars: Dict[str, Any]) -> None:
        """Log one line and write the values to TensorBoard (rank 0 only, as BasicSR's). ``log_vars`` is
        consumed as by BasicSR: ``epoch``, ``iter``, ``lrs``, ``time`` and ``data_time`` are popped from it."""
        epoch = log_vars.pop('epoch')
        current_iter = log_vars.pop('iter')
        lrs = log_vars.pop('lrs')
        message = f'[{self.exp_name[:5]}..][epoch:{epoch:3d}, iter:{current_iter:8,d}, lr:('
        message += ''.join(f'{v:.3e},' for v in lrs) + ')] '
        if 'time' in log_vars:
            iter_time = log_vars.pop('time')
            data_time = log_vars.pop('data_time')
            message += (f'[eta: {duration(self.eta_seconds(current_iter))}, '
                        f'time (data): {iter_time:.3f} ({data_time:.3f})] ')
        message += ''.join(f'{k}: {v:.4e} ' for k, v in log_vars.items() if not is_routing_key(k))
        message += routing_summary(log_vars)
        if self.use_tb_logger and 'debug' not in self.exp_name and self.tb_logger is not None:
            for key, value in log_vars.items():
                self.tb_logger.add_scalar(f'losses/{key}' if key.startswith('l_') else key, value, current_iter)
        self.logger.info(message.rstrip())


class RunEstimate:
    """One early log line per training run: seconds per iteration, the loss so far and the time left.

    :meth:`step` is called at the end of every training iteration with its number and its losses. The first call
    starts the clock (its iteration, with the warm-up: the optimizer's state, cuDNN's autotuning, the first
    batches, is not timed); the line is logged at the first later call where at least :attr:`MIN_ITERATIONS`
    iterations were timed and they took at least :attr:`MIN_SECONDS` in all or :attr:`MAX_ITERATIONS` were
    timed, or at the run's last iteration. Later calls do nothing (the cost during the first iterations is one
    clock reading and a few additions). The time per iteration spans everything between two calls (data loading
    included); validations and checkpoints after the timed iterations are not in the estimate.

    The line is a WARNING naming :data:`CPU_ADVICE` when the run is on a CPU and the remaining iterations take
    more than a day; INFO otherwise.
    """

    MIN_ITERATIONS = 3
    MIN_SECONDS = 5.0
    MAX_ITERATIONS = 10

    def __init__(self, total_iter: int, device: str, on_cpu: bool, clock: Clock = time.perf_counter) -> None:
        """``total_iter``: the run's last iteration (``train.total_iter``); ``device``: how the line names where
        it runs (e.g. ``the CPU (2 threads)``, ``cuda:0``); ``on_cpu``: whether the day limit applies."""
        self.total_iter = int(total_iter)
        self.device = device
        self.on_cpu = on_cpu
        self.clock = clock
        self.done = False
        self.first_iter: Optional[int] = None
        self.start = 0.0
        self.loss_sums: Dict[str, float] = {}
        self.loss_counts: Dict[str, int] = {}

    def step(self, current_iter: int, losses: Mapping[str, float]) -> Optional[str]:
        """Account for iteration ``current_iter`` (just finished) with its loss values; returns the line when this
        call logged it, else ``None``."""
        if self.done:
            return None
        now = self.clock()
        for key, value in losses.items():
            self.loss_sums[key] = self.loss_sums.get(key, 0.0) + float(value)
            self.loss_counts[key] = self.loss_counts.get(key, 0) + 1
        if self.first_iter is None:
            self.first_iter, self.start = current_iter, now
            return None
        timed, seconds = current_iter - self.first_iter, now - self.start
        ready = timed >= self.MIN_ITERATIONS and (seconds >= self.MIN_SECONDS or timed >= self.MAX_ITERATIONS)
        if not ready and current_iter < self.total_iter:
            return None
        self.done = True
        return self._log(current_iter, timed, seconds)

    def _log(self, current_iter: int, timed: int, seconds: float) -> str:
        per_iter = seconds / max(1, timed)
        left = max(0, self.total_iter - current_iter)
        remaining = per_iter * left
        losses = ', '.join(f'{key} {self.loss_sums[key] / self.loss_counts[key]:.4e}' for key in self.loss_sums)
        iterations = f'iteration {self.first_iter + 1}' if timed == 1 else \
            f'iterations {self.first_iter + 1}-{current_iter}'
        message = (f'run estimate: {per_iter:.3f} s per iteration on {self.device} ({iterations}; iteration '
                   f'{self.first_iter}, with the warm-up, not timed); loss so far (mean of '
                   f'{max(self.loss_counts.values(), default=0)} iterations): {losses or "none"}; the remaining '
                   f'{left:,d} of {self.total_iter:,d} iterations take about {duration(remaining)} '
                   '(validation and checkpoints not included)')
        level = logging.INFO
        if self.on_cpu and remaining > DAY_SECONDS:
            level = logging.WARNING
            message += f'. More than a day on a CPU: {CPU_ADVICE}'
        get_root_logger().log(level, message)
        return message
