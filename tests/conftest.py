"""Fixtures: a fixed seed, BasicSR's log messages, and a prepared synthetic dataset tree (helpers: util.py).

The suite runs torch on one CPU thread (``OMP_NUM_THREADS=1`` unless set, which the commands it starts in
subprocesses inherit): its networks are tiny, and with a thread per core they were several times slower on a busy
machine (docs/performance.md)."""
import logging
import os
from pathlib import Path
from typing import Iterator, List, Tuple

os.environ.setdefault('OMP_NUM_THREADS', '1')

import pytest  # noqa: E402
import torch  # noqa: E402

import hmoe_arch  # noqa: F401  (registers the plugin)

from util import make_aid_tree, make_ucmerced_tree  # noqa: E402

torch.set_num_threads(int(os.environ['OMP_NUM_THREADS']))


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


class Capture(logging.Handler):
    """Keeps what a logger emits at INFO and above: the messages, and (level, message) pairs."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.messages: List[str] = []
        self.records: List[Tuple[int, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())
        self.records.append((record.levelno, record.getMessage()))


@pytest.fixture
def basicsr_capture() -> Iterator[Capture]:
    """BasicSR's logger at INFO with a :class:`Capture` attached during the test."""
    logger = logging.getLogger('basicsr')
    handler, level = Capture(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield handler
    logger.removeHandler(handler)
    logger.setLevel(level)


@pytest.fixture
def basicsr_log(basicsr_capture: Capture) -> List[str]:
    """The messages BasicSR's logger emits at INFO and above during the test."""
    return basicsr_capture.messages


@pytest.fixture
def basicsr_records(basicsr_capture: Capture) -> List[Tuple[int, str]]:
    """(level, message) of what BasicSR's logger emits at INFO and above during the test."""
    return basicsr_capture.records


@pytest.fixture(scope='session')
def workdir(tmp_path_factory) -> Path:
    """A directory with ``datasets/UCMerced`` (PNG + LMDB) and ``datasets/AID`` (PNG), x2 and x4, prepared from
    small synthetic trees in the published layouts; run ``basicsr`` commands from it (or a copy)."""
    from hmoe_arch.commands.prepare import prepare
    root = tmp_path_factory.mktemp('work')
    source = make_ucmerced_tree(root / 'src', per_class=4, size=(256, 256), odd={'beach01.tif': (251, 256)})
    prepare('ucmerced', source, root / 'datasets' / 'UCMerced', lmdb=True, progress=False)
    prepare('aid', make_aid_tree(root / 'src', per_class=5, size=(256, 256)), root / 'datasets' / 'AID', progress=False)
    return root
