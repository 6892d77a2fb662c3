"""CPU threads of the commands: --num-threads / num_threads, and the auto rule."""
import pytest
import torch

from hmoe_arch.threads import apply_num_threads, choose_num_threads


@pytest.mark.parametrize('cores, load, expected', [(2, 0.0, 2), (2, 0.4, 2), (2, 0.6, 1), (2, 7.5, 1), (16, 3.2, 13),
                                                   (1, 0.0, 1)])
def test_auto_takes_the_cores_the_machine_has_free(cores: int, load: float, expected: int, monkeypatch) -> None:
    monkeypatch.delenv('OMP_NUM_THREADS', raising=False)
    assert choose_num_threads(None, cores=lambda: cores, load=lambda: load) == expected


def test_a_request_wins_and_gpu_runs_and_omp_num_threads_keep_torchs_default(monkeypatch) -> None:
    monkeypatch.delenv('OMP_NUM_THREADS', raising=False)
    assert choose_num_threads(3, cores=lambda: 2, load=lambda: 9.0) == 3
    assert choose_num_threads(None, on_cpu=False, cores=lambda: 2, load=lambda: 0.0) is None
    monkeypatch.setenv('OMP_NUM_THREADS', '1')
    assert choose_num_threads(None, cores=lambda: 8, load=lambda: 0.0) is None
    assert choose_num_threads(2, cores=lambda: 8, load=lambda: 0.0) == 2


def test_apply_sets_torchs_threads_and_says_why(monkeypatch) -> None:
    before = torch.get_num_threads()
    try:
        assert apply_num_threads(1) == (1, 'asked for')
        assert torch.get_num_threads() == 1
        monkeypatch.setenv('OMP_NUM_THREADS', '1')
        torch.set_num_threads(2)
        assert apply_num_threads(None) == (2, 'OMP_NUM_THREADS=1')
    finally:
        torch.set_num_threads(before)
