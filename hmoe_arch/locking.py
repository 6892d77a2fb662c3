"""One process at a time: an exclusive ``flock`` on a lock file, released by the kernel when the process ends (also
when it is killed), so a stale lock never blocks anybody."""
import fcntl
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

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
    finally:
        handle.close()
