"""The training log: the short log line with the expert summary, a non-negative eta, the early run estimate."""
import logging
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Tuple

import pytest
from basicsr.utils.logger import MessageLogger

from hmoe_arch.training_log import CPU_ADVICE, RunEstimate, TrainingMessageLogger, routing_summary

DOCS = Path(__file__).resolve().parents[1] / 'docs'


class FakeTensorBoard:
    """Records add_scalar calls as SummaryWriter receives them."""

    def __init__(self) -> None:
        self.scalars: Dict[str, Tuple[float, int]] = {}

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        self.scalars[tag] = (value, step)


class FakeClock:
    """Returns the given times one after the other (seconds)."""

    def __init__(self, times: Iterable[float]) -> None:
        self.times = iter(times)

    def __call__(self) -> float:
        return next(self.times)


def logger_options(total_iter: int = 100000, tensorboard: bool = True) -> dict:
    return {'name': 'train_MFGHMoE_UCMerced_x4', 'logger': {'print_freq': 100, 'use_tb_logger': tensorboard},
            'train': {'total_iter': total_iter}}


def sixteen_experts(used: Dict[int, float]) -> Dict[str, float]:
    """Routing values of 16 experts (two groups of 8) as MFGHMoEModel.get_current_log writes them."""
    values = {f'routing/group_{g}': sum(used.get(e, 0.0) for e in range(8 * g, 8 * g + 8)) for g in range(2)}
    values.update({f'routing/expert_{e:02d}': used.get(e, 0.0) for e in range(16)})
    values['routing/entropy'] = 0.7712
    return values


def log_vars(current_iter: int, **values: float) -> dict:
    return {'epoch': 3, 'iter': current_iter, 'lrs': [2e-4], 'time': 0.512, 'data_time': 0.004, **values}


def test_line_summarises_sixteen_experts_and_tensorboard_gets_every_value(basicsr_records) -> None:
    tb = FakeTensorBoard()
    logger = TrainingMessageLogger(logger_options(), 0, tb, clock=FakeClock([0.0, 10.0, 1010.0]))
    logger.reset_start_time()
    routing = sixteen_experts({3: 0.71, 9: 0.22, 0: 0.07})
    logger(log_vars(101, l_pix=0.0123, **routing))
    (level, line), = basicsr_records
    assert level == logging.INFO
    assert line == ('[train..][epoch:  3, iter:     101, lr:(2.000e-04,)] [eta: 11 days, 13:29:50, time (data): '
                    '0.512 (0.004)] l_pix: 1.2300e-02 experts: e3 71%, e9 22%, e0 7.0% (13 unused) '
                    'groups: g0 78%, g1 22% entropy: 0.771')
    assert len(line) < 220
    # the text line BasicSR's own logger writes for the same values: every fraction, 678 characters
    MessageLogger(logger_options(tensorboard=False), 0)(log_vars(101, l_pix=0.0123, **routing))
    assert 'routing/expert_15: 0.0000e+00' in basicsr_records[-1][1] and len(basicsr_records[-1][1]) > 3 * len(line)
    assert tb.scalars == {'losses/l_pix': (0.0123, 101), **{key: (value, 101) for key, value in routing.items()}}


def test_summary_counts_the_used_experts_it_does_not_show() -> None:
    shares = {3: 0.50, 9: 0.20, 0: 0.20, 12: 0.0996, 5: 0.0004}
    summary = routing_summary(sixteen_experts(shares))
    assert summary.startswith('experts: e3 50%, e0 20%, e9 20% (+2 more; 11 unused) groups: g0 70%, g1 30%')
    assert routing_summary({'routing/expert_00': 0.9995, 'routing/expert_01': 0.0006}) == \
        'experts: e0 100%, e1 0.1%'
    assert routing_summary({'routing/expert_00': 0.0004}) == 'experts: e0 <0.1%'
    assert routing_summary({'l_pix': 0.1}) == ''


def test_constructed_as_basicsr_train_does_without_tensorboard(basicsr_records) -> None:
    logger = TrainingMessageLogger(logger_options(tensorboard=False), 5, None)
    logger({'epoch': 0, 'iter': 6, 'lrs': [1e-4, 2e-5], 'l_pix': 0.5})
    assert basicsr_records[-1] == (logging.INFO, '[train..][epoch:  0, iter:       6, lr:(1.000e-04,2.000e-05,)] '
                                         'l_pix: 5.0000e-01')


@pytest.mark.parametrize('start_iter, reset, times, current_iter, eta', [
    # new run: the clock restarts after iteration 1; iterations 2..5 took 40 s, 5 of 10 are left
    (0, True, [0.0, 100.0, 140.0], 5, '0:00:50'),
    # the last line of the run: nothing left (BasicSR's MessageLogger prints `-1 day, 23:59:59`)
    (0, True, [0.0, 100.0, 190.0], 10, '0:00:00'),
    # resumed at iteration 4 (no restart): iterations 5 and 6 took 30 s, 4 are left
    (4, False, [0.0, 30.0], 6, '0:01:00'),
])
def test_eta_is_the_time_left_and_never_negative(basicsr_records, start_iter: int, reset: bool, times: List[float],
                                                 current_iter: int, eta: str) -> None:
    logger = TrainingMessageLogger(logger_options(total_iter=10, tensorboard=False), start_iter, clock=FakeClock(times))
    if reset:
        logger.reset_start_time()
    logger(log_vars(current_iter, l_pix=0.1))
    assert f'[eta: {eta}, time (data)' in basicsr_records[-1][1]


def estimate(times: List[float], total_iter: int, on_cpu: bool = True,
             losses: Optional[List[float]] = None) -> List[Optional[str]]:
    """The return values of RunEstimate.step for iterations 1, 2, ... ending at the given times."""
    run = RunEstimate(total_iter, 'the CPU (2 threads)' if on_cpu else 'cuda:0', on_cpu, clock=FakeClock(times))
    losses = losses or [0.5] * len(times)
    return [run.step(i + 1, {'l_pix': loss}) for i, loss in enumerate(losses)]


def test_estimate_warns_when_a_cpu_run_takes_more_than_a_day(basicsr_records) -> None:
    # iteration 1 (warm-up) ends at 100 s, then 12 s per iteration
    lines = estimate([100.0, 112.0, 124.0, 136.0, 148.0], 100000, losses=[0.8, 0.6, 0.4, 0.2, 0.1])
    assert lines[:3] == [None, None, None] and lines[4] is None  # one line, at iteration 4
    assert basicsr_records == [(logging.WARNING, lines[3])]
    assert lines[3] == ('run estimate: 12.000 s per iteration on the CPU (2 threads) (iterations 2-4; iteration 1, '
                        'with the warm-up, not timed); loss so far (mean of 4 iterations): l_pix 5.0000e-01; the '
                        'remaining 99,996 of 100,000 iterations take about 13 days, 21:19:12 (validation and '
                        f'checkpoints not included). More than a day on a CPU: {CPU_ADVICE}')
    assert '## Training on a CPU' in (DOCS / 'training.md').read_text()  # the advice the warning points to


def test_estimate_is_information_on_a_gpu_or_under_a_day(basicsr_records) -> None:
    gpu = estimate([100.0, 112.0, 124.0, 136.0], 100000, on_cpu=False)[3]
    assert basicsr_records[-1] == (logging.INFO, gpu) and 'about 13 days, 21:19:12' in gpu and 'CPU' not in gpu
    short = estimate([100.0, 112.0, 124.0, 136.0], 7000)[3]  # 6996 x 12 s = 23.3 hours
    assert basicsr_records[-1] == (logging.INFO, short)
    assert 'about 23:19:12 (validation' in short and CPU_ADVICE not in short


def test_fast_iterations_are_timed_until_five_seconds_or_ten(basicsr_records) -> None:
    # 0.1 s per iteration: 10 timed iterations (1 s) end the measurement at iteration 11
    lines = estimate([10.0 + 0.1 * i for i in range(15)], 1000)
    assert [i + 1 for i, line in enumerate(lines) if line] == [11]
    assert 'run estimate: 0.100 s per iteration' in lines[10] and 'iterations 2-11;' in lines[10]
    assert 'the remaining 989 of 1,000 iterations take about 0:01:38' in lines[10]
    # 2 s per iteration: 3 iterations (6 s) are enough
    assert [i + 1 for i, line in enumerate(estimate([10.0 + 2 * i for i in range(6)], 1000)) if line] == [4]


def test_a_run_shorter_than_the_measurement_logs_at_its_last_iteration(basicsr_records) -> None:
    lines = estimate([5.0, 6.0, 7.0], 3)
    assert lines[:2] == [None, None]
    assert 'on the CPU (2 threads) (iterations 2-3;' in lines[2] and 'the remaining 0 of 3 iterations take about ' \
        '0:00:00' in lines[2]
    assert 'iteration 2;' in estimate([5.0, 6.5], 2)[1]
    assert estimate([5.0], 1) == [None]  # nothing was timed
