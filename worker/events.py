"""The channel between a stage's child process and the orchestrator (no torch here).

A child appends progress events as JSON lines to the file named by FTW_EVENTS and, when it dies
of an exception, writes one JSON error record to FTW_ERROR_FILE (torchelastic's error-file
pattern) before exiting non-zero. The orchestrator tails the events file and reads the error file
to build a typed failure. Exit codes: 0 done, 1 failed (see the error file), EXIT_PREEMPTED when
SIGTERM stopped the stage after it saved what it had.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

EXIT_OK, EXIT_FAILED, EXIT_PREEMPTED = 0, 1, 75
EVENT_KEYS = ("stage", "step", "total_steps", "loss", "lr", "grad_norm", "tokens_per_s", "eta_s")


def emit(event: dict[str, Any]) -> None:
    """Append one progress event; a no-op when no channel is set (plain CLI use)."""
    path = os.environ.get("FTW_EVENTS")
    if not path:
        return
    line = json.dumps({"ts": round(time.time(), 3), **event}, separators=(",", ":"), default=str)
    with open(path, "a", encoding="utf-8") as f:
        f.write(line + "\n")


def write_error(
    code: str, message: str, hint: str = "", details: dict[str, Any] | None = None, log_tail: str = ""
) -> None:
    """`log_tail`: the error's own (a grandchild's log, e.g. the vLLM engine's), which the child's output lacks."""
    path = os.environ.get("FTW_ERROR_FILE")
    record = {
        "code": code,
        "message": message,
        "hint": hint,
        "traceback": traceback.format_exc(limit=20),
        "details": details or {},
        **({"log_tail": log_tail} if log_tail else {}),
    }
    if path:
        tmp = f"{path}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(record, f)
        os.replace(tmp, path)


def read_json_object(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """A file's JSON object (an error file, a run folder's state); None when missing, unreadable or not an object."""
    try:
        with open(path, encoding="utf-8") as f:
            record = json.load(f)
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def run_child(main: Callable[[], int | None]) -> None:
    """Entry wrapper of a stage child: typed errors to the error file, exit code by outcome."""
    from worker.errors import FtwError

    try:
        code = main()
    except FtwError as e:
        write_error(e.code, e.message, e.hint, e.details, e.log_tail)
        print(f"ftw: {e.code}: {e.message}" + (f"\nhint: {e.hint}" if e.hint else ""), file=sys.stderr)
        sys.exit(EXIT_FAILED)
    except KeyboardInterrupt:
        sys.exit(130)
    except Exception as e:  # the child's last word: recorded, then re-raised for the traceback in the log
        write_error("crash", f"{type(e).__name__}: {e}")
        raise
    sys.exit(code or EXIT_OK)
