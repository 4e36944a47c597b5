"""Children that cannot outlive their parent: a SIGKILLed worker leaves no training run behind.

`subprocess.Popen(..., preexec_fn=die_with_parent())` asks Linux (PR_SET_PDEATHSIG) to send the
child SIGTERM when the process that started it dies, even by kill -9. SIGTERM, not SIGKILL: a
training child then saves a checkpoint of its current step before it exits, so nothing is lost.
The libc function is looked up here, in the parent: the child between fork and exec must not
load libraries (another thread may hold the loader's lock).
"""

from __future__ import annotations

import ctypes
import functools
import os
import signal
import sys
from collections.abc import Callable

PR_SET_PDEATHSIG = 1


@functools.cache
def _prctl() -> Callable[..., int] | None:
    return ctypes.CDLL(None, use_errno=True).prctl if sys.platform.startswith("linux") else None


def die_with_parent() -> Callable[[], None] | None:
    """A preexec_fn for Popen (None where the OS has no parent-death signal)."""
    prctl = _prctl()  # looked up in the parent, once
    if prctl is None:
        return None
    parent = os.getpid()

    def arm() -> None:
        prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:  # the parent died before the line above: nobody will signal
            os.kill(os.getpid(), signal.SIGTERM)

    return arm


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists (one owned by another user counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
