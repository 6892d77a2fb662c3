"""One writer at a time: an exclusive ``flock`` on a lock file (:func:`exclusive_lock`), released by the kernel when the
process ends (also when it is killed), so a stale lock never blocks anybody. Readers of what the writer makes hold
the same file shared (:func:`shared_lock`): any number of them at once, and no writer meanwhile.

The exclusive holder writes its PID and start time into the file and empties it when done, so a refused process can
name the holder; shared holders write nothing (a writer refused by them finds the file empty)."""
import fcntl
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Callable, Iterator, Optional

from .errors import HmoeError


@contextmanager
def exclusive_lock(path: Path, busy: Callable[[str], HmoeError], *, remove_when_done: bool = False) -> Iterator[None]:
    """Hold ``path`` (created if needed) for the ``with`` block, writing this process's PID and start time into it.

    Args:
        path: The lock file.
        busy: Builds the error raised when another process holds the lock, from what that process wrote.
        remove_when_done: Delete the lock file when the block ends, also by an error (still held at that moment:
            another run either failed to get it before, or creates and locks a fresh file after).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = open(path, 'a+')
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            raise busy(handle.read().strip() or 'another process') from None
        try:
            handle.seek(0)
            handle.truncate()
            handle.write(f'pid {os.getpid()}, started {time.strftime("%Y-%m-%d %H:%M:%S")}')
            handle.flush()
            yield
        finally:
            if remove_when_done:
                path.unlink(missing_ok=True)
            else:  # still held: the record goes with the lock
                handle.seek(0)
                handle.truncate()
    finally:
        handle.close()


@contextmanager
def shared_lock(path: Path, busy: Callable[[str], HmoeError]) -> Iterator[None]:
    """Hold ``path`` shared for the ``with`` block (other shared holders are welcome; an :func:`exclusive_lock` of it
    is refused meanwhile). Nothing is written into it.

    The lock file is created when missing; where it cannot be (a read-only folder, in which no writer can work
    either) an existing one is opened for reading, and without one the block runs unlocked.

    Args:
        path: The lock file.
        busy: Builds the error raised when a process holds the lock exclusively, from what that process wrote into
            it (``'another process'`` when nothing).
    """
    handle = _open_to_read_lock(path)
    if handle is None:
        yield
        return
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            raise busy(handle.read().strip() or 'another process') from None
        yield
    finally:
        handle.close()


def _open_to_read_lock(path: Path) -> Optional[IO[str]]:
    """``path`` opened (created if missing) for :func:`shared_lock`; opened for reading where it cannot be created
    or appended to; ``None`` where it neither exists nor can be created."""
    try:
        return open(path, 'a+')
    except OSError:
        pass
    try:
        return open(path)
    except OSError:
        return None
