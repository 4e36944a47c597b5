"""The kernel warm-up's hold on the GPU, which the train stage's first step ends.

The warm-up child (worker/train/warmup.py) compiles the job's kernels beside preprocessing, the model's download and
the train stage's start-up and model loading. Once the train child's model is ready, its first step must have the GPU
to itself: the warm-up holds an exclusive lock on a file named after the run folder for as long as it lives (the
kernel drops it when the process ends, however it ends) with its pid in the file, and the train child, before its
first step, kills a warm-up that still holds it and waits for the lock (milliseconds; the orchestrator's stop on the
`ready` event would take up to its event poll). The file is in the machine's temporary folder, not on the volume,
whose network filesystem may not lock; where locking fails all the same, the orchestrator's stop is what ends the
warm-up. No torch here: the orchestrator removes the file.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import signal
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

WAIT_LIMIT_S = 30.0  # a killed warm-up lets go in milliseconds: this guards against a process that cannot die

log = logging.getLogger("ftw.train")


def lock_path(run_dir: Path) -> Path:
    """The lock of the run in `run_dir`, on this machine's own filesystem."""
    digest = hashlib.sha1(str(run_dir.resolve()).encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / f"ftw-warmup-{digest}.lock"


@contextlib.contextmanager
def holding(run_dir: Path) -> Iterator[None]:
    """The warm-up's hold, for the block (and for the process, if it is killed inside it)."""
    with open(lock_path(run_dir), "a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
        except OSError as e:  # no locks here: the orchestrator's stop on `ready` ends the warm-up
            log.warning("kernel warm-up: no lock (%s); it is stopped on the train stage's `ready` event", e)
        else:
            lock.truncate(0)
            lock.write(str(os.getpid()))
            lock.flush()
        yield


def end_warmup(run_dir: Path, limit_s: float = WAIT_LIMIT_S) -> float:
    """Kill a warm-up that still holds the lock (with what it started: it leads its own session) and wait until the
    lock is free (or `limit_s` passed, with a warning): the seconds it took."""
    started = time.monotonic()
    try:
        lock = open(lock_path(run_dir))
    except FileNotFoundError:  # no warm-up in this run, or it ended and was cleaned up
        return 0.0
    except OSError as e:  # unreadable: the orchestrator's stop on `ready` ends the warm-up; training goes on
        log.warning("the kernel warm-up's lock cannot be opened (%s): the first step starts at once", e)
        return 0.0
    with lock:
        killed = False
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_SH | fcntl.LOCK_NB)
                return time.monotonic() - started
            except BlockingIOError:
                pass
            except OSError as e:  # no locks here: the orchestrator stops the warm-up on `ready`
                log.warning("the kernel warm-up's lock cannot be read (%s): the first step starts at once", e)
                return time.monotonic() - started
            if not killed:  # held: the pid in the file is the live holder's (the lock goes with its process)
                lock.seek(0)
                pid = lock.read().strip()
                if pid.isdigit():
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.killpg(int(pid), signal.SIGKILL)
                    killed = True
            waited = time.monotonic() - started
            if waited > limit_s:
                log.warning("the kernel warm-up still runs after %.0f s: the first step starts beside it", waited)
                return waited
            time.sleep(0.005)


def remove(run_dir: Path) -> None:
    """The lock file, once its warm-up has ended."""
    lock_path(run_dir).unlink(missing_ok=True)
