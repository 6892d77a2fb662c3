"""Files and folders that appear complete or not at all.

A writer writes under a temporary name beside its target (:func:`partial_path`: hidden,
``.<stem>.partial-<pid><suffix>``, the target's suffix kept for writers that choose the format by it, such as
``cv2.imwrite`` and ``LmdbMaker``), and the complete result is renamed onto the target, which is atomic on one file
system. :func:`atomic_path` does this for one file or folder, :func:`staged_files` for a writer that chooses the
names of the files it puts into a folder (BasicSR's checkpoint savers). A run killed while writing leaves its
temporary name behind; the next write of the same target removes such files of processes that are no longer
running (:func:`remove_dead_partials`). Nothing here imports torch.
"""
import os
import re
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, List, Union

PathLike = Union[str, os.PathLike]


def plain_file_mode() -> int:
    """The permission bits ``open(path, 'w')`` gives a new file: ``0o666 & ~umask`` (the umask read from
    ``/proc/self/status`` on Linux, else by setting it and setting it back at once)."""
    try:
        with open('/proc/self/status') as status:
            for line in status:
                if line.startswith('Umask:'):
                    return 0o666 & ~int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o077)
    os.umask(mask)
    return 0o666 & ~mask


def partial_path(target: PathLike) -> Path:
    """The temporary name this process writes ``target`` under: ``.<stem>.partial-<pid><suffix>`` in its folder."""
    target = Path(target)
    return target.with_name(f'.{target.stem}.partial-{os.getpid()}{target.suffix}')


def _partial_name(target: Path) -> re.Pattern:
    """The temporary names of ``target`` (:func:`partial_path`) of any process; group 1 is the PID."""
    return re.compile(rf'\.{re.escape(target.stem)}\.partial-(\d+){re.escape(target.suffix)}')


def stale_partials(target: PathLike) -> List[Path]:
    """Every temporary name of ``target`` in its folder, of any process (left by killed runs when no writer of
    ``target`` is running), sorted; empty when the folder does not exist."""
    target = Path(target)
    name = _partial_name(target)
    if not target.parent.is_dir():
        return []
    return sorted(path for path in target.parent.iterdir() if name.fullmatch(path.name))


def process_is_running(pid: int) -> bool:
    """Whether a process with this PID exists on this machine (``os.kill(pid, 0)``; one of another user counts).
    Always True where that probe is not harmless (not POSIX: Windows' ``os.kill`` would stop the process)."""
    if os.name != 'posix':
        return True
    if pid <= 0:  # os.kill would signal a process group
        return False
    try:
        os.kill(pid, 0)
    except PermissionError:
        return True
    except (ProcessLookupError, OverflowError):
        return False
    return True


def remove_dead_partials(target: PathLike) -> List[Path]:
    """Remove the temporary files of ``target`` (:func:`stale_partials`) whose PID is not a running process, which
    a writer killed with SIGKILL or by a power cut leaves behind; returns the removed paths.

    Files of this process and of running processes are left alone, and so are folders (a folder target's caller
    decides about those, as ``basicsr prepare`` does) and links. PIDs are those of this machine: a temporary file
    written on a network file system by a process of another machine (or another PID namespace) counts as dead.
    """
    target = Path(target)
    name = _partial_name(target)
    removed = []
    for path in stale_partials(target):
        pid = int(name.fullmatch(path.name).group(1))
        if pid == os.getpid() or process_is_running(pid) or path.is_symlink() or not path.is_file():
            continue
        try:
            path.unlink()
        except OSError:  # removed by another run first, or not this user's to remove: the write goes on
            continue
        removed.append(path)
    return removed


def move_into_place(partial: PathLike, target: PathLike) -> None:
    """Rename the complete file or folder ``partial`` onto ``target`` (atomic on one file system; a folder
    ``target`` must not exist or be empty). A file gets the permissions a plain ``open(target, 'w')`` would give
    it (:func:`plain_file_mode`): writers that go through a private temporary file of their own (safetensors'
    ``save_file``, torch.hub's download) leave it 0600. A folder keeps the permissions ``mkdir`` gave it."""
    if not os.path.isdir(partial):
        os.chmod(partial, plain_file_mode())
    os.replace(partial, target)


def remove_partial(partial: PathLike) -> None:
    """Remove the file or folder ``partial`` if it is there, ignoring errors (this runs while another error
    propagates, which is the one to report)."""
    if os.path.isdir(partial) and not os.path.islink(partial):
        shutil.rmtree(partial, ignore_errors=True)
        return
    try:
        os.unlink(partial)
    except OSError:
        pass


@contextmanager
def atomic_path(target: PathLike, *, folder: bool = False) -> Iterator[Path]:
    """``with atomic_path(target) as partial: write(partial)``: the block writes ``partial``
    (:func:`partial_path`), which is moved onto ``target`` when the block ends without an exception
    (:func:`move_into_place`). On any exception, in the block or in the move (``KeyboardInterrupt`` included),
    ``partial`` is removed with whatever it holds and ``target`` is left as it was.

    Temporary files of ``target`` left by processes that are no longer running are removed first
    (:func:`remove_dead_partials`).

    Args:
        target: the file or folder to write; its folder must exist.
        folder: create ``partial`` as an empty folder before the block (it must not exist yet); without it the
            block creates the file itself.
    """
    remove_dead_partials(target)
    partial = partial_path(target)
    if folder:
        partial.mkdir()
    try:
        yield partial
        move_into_place(partial, target)
    except BaseException:
        remove_partial(partial)
        raise


@contextmanager
def staged_files(folder: PathLike) -> Iterator[Path]:
    """``with staged_files(folder) as staging: write_into(staging)``, for a writer that chooses the names of the
    files it writes into ``folder``: ``staging`` is a new empty folder beside ``folder`` (the temporary name of
    ``folder``'s real path, so on the same file system). When the block ends without an exception, each file in
    ``staging`` is flushed to disk and moved into ``folder`` under its name (:func:`move_into_place`, replacing a
    file of that name). On any exception nothing is moved. ``staging`` is removed in both cases.

    ``folder`` is created if missing, and temporary folders of it left by killed runs are removed first: only one
    process may write into ``folder`` at a time.
    """
    folder = Path(os.path.realpath(folder))
    folder.mkdir(parents=True, exist_ok=True)
    for stale in stale_partials(folder):
        remove_partial(stale)
    staging = partial_path(folder)
    staging.mkdir()
    try:
        yield staging
        for path in sorted(staging.iterdir()):
            with open(path, 'rb') as f:
                os.fsync(f.fileno())
            move_into_place(path, folder / path.name)
    finally:
        remove_partial(staging)
