"""Files and folders that appear complete or not at all (hmoe_arch.atomic)."""
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from hmoe_arch.atomic import (
    atomic_path,
    partial_path,
    plain_file_mode,
    process_is_running,
    remove_dead_partials,
    staged_files,
    stale_partials,
)


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def umask_027():
    """The process umask 0o027 for the test; yields the mode ``open(path, 'w')`` then gives (0o640)."""
    previous = os.umask(0o027)
    yield 0o640
    os.umask(previous)


def test_the_partial_name_is_hidden_beside_the_target_and_keeps_its_suffix(tmp_path: Path) -> None:
    assert partial_path(tmp_path / 'scene_SR.png') == tmp_path / f'.scene_SR.partial-{os.getpid()}.png'
    assert partial_path(tmp_path / 'out') == tmp_path / f'.out.partial-{os.getpid()}'
    assert partial_path(str(tmp_path / 'Train.lmdb')) == tmp_path / f'.Train.partial-{os.getpid()}.lmdb'


def test_a_written_file_is_moved_into_place_with_the_mode_a_plain_open_gives(tmp_path: Path, umask_027: int) -> None:
    target = tmp_path / 'a.txt'
    with atomic_path(target) as partial:
        assert partial == partial_path(target)
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT, 0o600)  # as a private temporary file is created
        os.write(fd, b'new')
        os.close(fd)
        assert not target.exists()
    assert target.read_bytes() == b'new'
    assert mode_of(target) == umask_027 == plain_file_mode()
    assert sorted(p.name for p in tmp_path.iterdir()) == ['a.txt']


@pytest.mark.parametrize('error', [RuntimeError('writer failed'), KeyboardInterrupt()])
def test_a_failed_write_leaves_the_old_target_and_no_partial(tmp_path: Path, error: BaseException) -> None:
    target = tmp_path / 'a.txt'
    target.write_text('old')
    with pytest.raises(type(error)):
        with atomic_path(target) as partial:
            partial.write_text('half')
            raise error
    assert target.read_text() == 'old'
    assert sorted(p.name for p in tmp_path.iterdir()) == ['a.txt']


def test_a_failed_move_removes_the_partial(tmp_path: Path) -> None:
    target = tmp_path / 'taken'
    (target / 'inside').mkdir(parents=True)
    with pytest.raises(OSError):
        with atomic_path(target) as partial:
            partial.write_text('a file cannot replace a folder')
    assert sorted(p.name for p in tmp_path.iterdir()) == ['taken'] and (target / 'inside').is_dir()


def test_a_block_that_writes_nothing_fails_and_leaves_nothing(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        with atomic_path(tmp_path / 'a.txt'):
            pass
    assert list(tmp_path.iterdir()) == []


def test_a_folder_target_appears_whole_or_not_at_all(tmp_path: Path) -> None:
    target = tmp_path / 'out'
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(target, folder=True) as partial:
            assert partial.is_dir() and list(partial.iterdir()) == []
            (partial / 'sub').mkdir()
            (partial / 'sub' / 'a.txt').write_text('half')
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []
    with atomic_path(target, folder=True) as partial:
        (partial / 'a.txt').write_text('done')
        assert not target.exists()
    assert (target / 'a.txt').read_text() == 'done'
    assert sorted(p.name for p in tmp_path.iterdir()) == ['out']
    with pytest.raises(OSError):  # a folder that is not empty is never replaced
        with atomic_path(target, folder=True) as partial:
            (partial / 'b.txt').write_text('other')
    assert sorted(p.name for p in target.iterdir()) == ['a.txt']
    assert sorted(p.name for p in tmp_path.iterdir()) == ['out']


def test_stale_partials_are_the_targets_temporary_names_of_any_process(tmp_path: Path) -> None:
    for name in ('.out.partial-12', '.out.partial-345', '.out.partial-x', 'out.partial-1', '.outer.partial-1',
                 '.out.partial-1.zip', 'out'):
        (tmp_path / name).mkdir()
    assert [p.name for p in stale_partials(tmp_path / 'out')] == ['.out.partial-12', '.out.partial-345']
    assert [p.name for p in stale_partials(tmp_path / 'out.zip')] == ['.out.partial-1.zip']
    assert stale_partials(tmp_path / 'missing' / 'out') == []


def dead_pid() -> int:
    """The PID of a process that has ended."""
    child = subprocess.Popen([sys.executable, '-c', 'pass'])
    child.wait()
    return child.pid


def test_process_is_running_tells_live_from_dead_pids() -> None:
    assert process_is_running(os.getpid()) and process_is_running(os.getppid())
    assert not process_is_running(dead_pid())
    assert not process_is_running(0) and not process_is_running(10 ** 30)


def test_a_write_removes_the_temporary_files_of_dead_processes_only(tmp_path: Path) -> None:
    target = tmp_path / 'scene_SR.png'
    dead = tmp_path / f'.scene_SR.partial-{dead_pid()}.png'
    dead.write_bytes(b'left by a run killed with -9')
    live = tmp_path / f'.scene_SR.partial-{os.getppid()}.png'
    live.write_bytes(b'being written by a running process')
    dead_folder = tmp_path / f'.scene_SR.partial-{dead_pid()}.png'
    dead_folder.mkdir()
    other_target = tmp_path / f'.other.partial-{dead_pid()}.png'
    other_target.write_bytes(b'another target')
    with atomic_path(target) as partial:
        assert not dead.exists()
        partial.write_bytes(b'new')
    assert target.read_bytes() == b'new'
    assert live.read_bytes() == b'being written by a running process'
    assert other_target.read_bytes() == b'another target'
    assert dead_folder.is_dir()  # folders are their writer's business (basicsr prepare checks its own)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [target.name, live.name, dead_folder.name, other_target.name])


def test_remove_dead_partials_returns_what_it_removed(tmp_path: Path) -> None:
    target = tmp_path / 'model.safetensors'
    dead = [tmp_path / f'.model.partial-{dead_pid()}.safetensors' for _ in range(2)]
    for path in dead:
        path.write_bytes(b'half')
    mine = partial_path(target)
    mine.write_bytes(b'this process')
    os.symlink(tmp_path / 'elsewhere', tmp_path / f'.model.partial-{dead_pid()}.safetensors')
    assert remove_dead_partials(target) == sorted(dead)
    assert mine.read_bytes() == b'this process'
    assert remove_dead_partials(tmp_path / 'missing' / 'model.safetensors') == []


def test_staged_files_are_moved_into_the_folder_under_their_names(tmp_path: Path, umask_027: int) -> None:
    folder = tmp_path / 'models'
    folder.mkdir()
    (folder / 'net_g_2.pth').write_text('old 2')
    (folder / 'net_g_4.pth').write_text('old 4')
    stale = tmp_path / '.models.partial-1'
    (stale / 'net_g_6.pth').parent.mkdir()
    (stale / 'net_g_6.pth').write_text('left by a killed run')
    with staged_files(folder) as staging:
        assert staging == partial_path(folder) and not stale.exists()
        (staging / 'net_g_4.pth').write_text('new 4')
        (staging / 'net_g_8.pth').write_text('new 8')
    assert {p.name: p.read_text() for p in folder.iterdir()} == {'net_g_2.pth': 'old 2', 'net_g_4.pth': 'new 4',
                                                               'net_g_8.pth': 'new 8'}
    assert mode_of(folder / 'net_g_8.pth') == umask_027
    assert sorted(p.name for p in tmp_path.iterdir()) == ['models']


def test_staged_files_move_nothing_when_the_writer_fails(tmp_path: Path) -> None:
    folder = tmp_path / 'states'
    with pytest.raises(KeyboardInterrupt):
        with staged_files(folder) as staging:
            (staging / '4.state').write_text('half')
            raise KeyboardInterrupt
    assert folder.is_dir() and list(folder.iterdir()) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ['states']


def test_staging_is_beside_the_real_folder_behind_a_link(tmp_path: Path) -> None:
    real = tmp_path / 'disk' / 'models'
    real.mkdir(parents=True)
    (tmp_path / 'run').mkdir()
    os.symlink(real, tmp_path / 'run' / 'models')
    with staged_files(tmp_path / 'run' / 'models') as staging:
        assert staging.parent == real.parent.resolve()
        (staging / 'a.pth').write_text('a')
    assert (real / 'a.pth').read_text() == 'a'
    assert sorted(p.name for p in (tmp_path / 'disk').iterdir()) == ['models']
    assert sorted(p.name for p in (tmp_path / 'run').iterdir()) == ['models']


@pytest.mark.slow
def test_the_module_imports_neither_torch_nor_basicsr() -> None:
    code = ('import sys, hmoe_arch.atomic; '
            'print(sorted(m for m in ("torch", "basicsr", "cv2") if m in sys.modules))')
    result = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=120, cwd='/')
    assert (result.returncode, result.stdout.strip()) == (0, '[]'), result.stderr
