"""The kernel warm-up's hold on the GPU, which the train stage's first step ends or waits out.

The warm-up child (worker/train/warmup.py) compiles the job's kernels beside preprocessing, the model's download and
the train stage's start-up and model loading. Once the train child's model is ready, its first step must have the GPU
to itself: the warm-up holds an exclusive lock on a file named after the run folder for as long as it lives (the
kernel drops it when the process ends, however it ends), with its pid and its phase in the file. Before its first
step the train child waits for the lock. It waits out the phases that end sooner than it would compile the same
kernels itself: the recording pass (a one-layer model's forward and backward with no kernel compiled: well under a
second) and the compiles side by side in worker processes (off the GPU), each up to its patience. In any other phase
(the warm-up building its model: a warm worker's next job is ready sooner than that; compiling one kernel after
another), or past its patience, it kills the warm-up (with what it started) and waits for the lock (milliseconds).
The file is in the machine's temporary folder, not on the volume, whose network filesystem may not lock; where
locking fails all the same, the orchestrator stops the warm-up at the first step. No torch here: the orchestrator
removes the file.
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
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, NamedTuple

WAIT_LIMIT_S = 30.0  # a killed warm-up lets go in milliseconds: this guards against a process that cannot die
RECORDING = "recording"  # the pass that records the kernels to compile (on the GPU, compiling none)
SIDE_BY_SIDE = "side-by-side"  # those kernels compiling in worker processes (off the GPU)
COMPILING = "compiling"  # building the model, or a pass that compiles each kernel as it first runs, one after another
LINE_WIDTH = 64  # the file holds one line, rewritten in place
# how long the first step waits out each phase (others: none). A LoRA job's kernels take ~7 s one after another on
# an H100 host; a phase far past that is stuck (a compile worker that hangs), and the first step compiles them itself
PATIENCE_S = {RECORDING: 10.0, SIDE_BY_SIDE: 60.0}


class Ended(NamedTuple):
    """How `end_warmup` found and left the warm-up."""

    seconds: float  # the first step's wait
    killed: bool
    phase: str  # the last phase it saw ("" where there was no warm-up to see)


log = logging.getLogger("ftw.train")


def lock_path(run_dir: Path) -> Path:
    """The lock of the run in `run_dir`, on this machine's own filesystem."""
    digest = hashlib.sha1(str(run_dir.resolve()).encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / f"ftw-warmup-{digest}.lock"


class Hold:
    """The warm-up's side: its phase, for the train child to read."""

    def __init__(self, lock: IO[str] | None):
        self.lock = lock  # None: no locks here

    def phase(self, name: str) -> None:
        if self.lock is not None:
            self.lock.seek(0)  # one write of a fixed width, never an empty file for the reader to meet
            self.lock.write(f"{os.getpid()} {name}".ljust(LINE_WIDTH))
            self.lock.flush()


@contextlib.contextmanager
def holding(run_dir: Path, phase: str = COMPILING) -> Iterator[Hold]:
    """The warm-up's hold, for the block (and for the process, if it is killed inside it), starting in `phase`."""
    with open(os.open(lock_path(run_dir), os.O_RDWR | os.O_CREAT, 0o644), "r+") as lock:  # writes at 0, not appended
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
        except OSError as e:  # no locks here: the orchestrator's stop at the first step ends the warm-up
            log.warning("kernel warm-up: no lock (%s); it is stopped at the train stage's first step", e)
            hold = Hold(None)
        else:
            hold = Hold(lock)
        hold.phase(phase)
        yield hold


def end_warmup(run_dir: Path, limit_s: float = WAIT_LIMIT_S, on_wait: Callable[[str], None] | None = None) -> Ended:
    """Wait out a warm-up in a phase shorter than compiling without it (`PATIENCE_S`; `on_wait(phase)` is told once,
    for the user), else kill it (with what it started: it leads its own session), and wait until the lock is free (or
    `limit_s` after the kill, with a warning)."""
    started = time.monotonic()
    try:
        lock = open(lock_path(run_dir))
    except FileNotFoundError:  # no warm-up in this run, or it ended and was cleaned up
        return Ended(0.0, False, "")
    except OSError as e:  # unreadable: the orchestrator stops the warm-up at the first step; training goes on
        log.warning("the kernel warm-up's lock cannot be opened (%s): the first step starts at once", e)
        return Ended(0.0, False, "")
    with lock:
        killed_at: float | None = None
        pid, phase, phase_since = "", "", started
        while True:
            now = time.monotonic()
            try:
                fcntl.flock(lock, fcntl.LOCK_SH | fcntl.LOCK_NB)
                return Ended(now - started, killed_at is not None, phase)
            except BlockingIOError:
                pass
            except OSError as e:  # no locks here: the orchestrator stops the warm-up at the first step
                log.warning("the kernel warm-up's lock cannot be read (%s): the first step starts at once", e)
                return Ended(now - started, False, phase)
            if killed_at is None:  # held: the pid in the file is the live holder's (the lock goes with its process)
                lock.seek(0)
                pid, _, seen = lock.read().strip().partition(" ")
                if seen != phase:
                    phase, phase_since = seen, now
                    if phase in PATIENCE_S and on_wait is not None:
                        on_wait(phase)
                        on_wait = None
                if pid.isdigit() and now - phase_since >= PATIENCE_S.get(phase, 0.0):
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.killpg(int(pid), signal.SIGKILL)
                    killed_at = now
            # past the limit after the kill, or from the start when the file names no process to kill
            stuck_since = killed_at if killed_at is not None or pid.isdigit() else started
            if stuck_since is not None and now - stuck_since > limit_s:
                log.warning(
                    "the kernel warm-up still holds its lock after %.0f s: the first step starts beside it", limit_s
                )
                return Ended(now - started, killed_at is not None, phase)
            time.sleep(0.005)


def remove(run_dir: Path) -> None:
    """The lock file, once its warm-up has ended."""
    lock_path(run_dir).unlink(missing_ok=True)
