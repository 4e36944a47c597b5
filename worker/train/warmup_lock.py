"""The kernel warm-up's hold on the GPU, which the train stage's first step waits out.

The warm-up child (worker/train/warmup.py) compiles the job's kernels beside preprocessing, the model's download and
the train stage's start-up and model loading; the orchestrator stops it when the train child reports its model
ready (worker/job/pipeline.py). Between that report and the kill the two would share the GPU, so the warm-up holds an
exclusive lock on RUN_DIR/warmup.lock for as long as it lives (the kernel drops it when the process ends, however it
ends), and the train child takes the lock after its report, before its first step. No torch here: the orchestrator
removes the file.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import time
from collections.abc import Iterator
from pathlib import Path

NAME = "warmup.lock"
WAIT_LIMIT_S = 30.0  # the orchestrator stops the warm-up within its event poll; this only guards against a stuck one

log = logging.getLogger("ftw.train")


@contextlib.contextmanager
def holding(run_dir: Path) -> Iterator[None]:
    """The warm-up's hold, for the block (and for the process, if it is killed inside it)."""
    with open(run_dir / NAME, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def wait_for_release(run_dir: Path, limit_s: float = WAIT_LIMIT_S) -> float:
    """Until no warm-up holds the lock (or `limit_s` passed, with a warning): the seconds waited."""
    started = time.monotonic()
    try:
        lock = open(run_dir / NAME)
    except FileNotFoundError:  # no warm-up in this run, or it ended and was cleaned up
        return 0.0
    with lock:
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_SH | fcntl.LOCK_NB)
                return time.monotonic() - started
            except BlockingIOError:
                waited = time.monotonic() - started
                if waited > limit_s:
                    log.warning("the kernel warm-up still runs after %.0f s: the first step starts beside it", waited)
                    return waited
                time.sleep(0.01)


def remove(run_dir: Path) -> None:
    """The lock file, once its warm-up has ended."""
    (run_dir / NAME).unlink(missing_ok=True)
