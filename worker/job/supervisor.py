"""Run one stage as a supervised child process and turn how it ended into a typed failure.

The child starts in its own session (process group), with the secrets only in its environment:
forked from the worker's pre-imported stage template when it has one (worker/job/template.py),
else as a fresh interpreter; both look the same from here.
Its stdout/stderr are read as raw bytes (a `\\r` progress bar with no newline cannot stall us),
redacted, written to `logs/<stage>/attempt-<n>/{stdout,stderr}.log`, and the last lines kept in a
ring buffer for the error message. Progress events are tailed from FTW_EVENTS. The stage is
stopped — SIGTERM to the group, a grace period (training saves a checkpoint), then SIGKILL — on
cancellation, preemption, its time limit, or when neither events nor output moved for
`no_progress_s`. No member of the group outlives `run_stage`.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from schemas.issues import MAX_MESSAGE
from schemas.limits import clip
from schemas.secrets import Redactor, StreamRedactor
from worker import errors
from worker.events import EXIT_PREEMPTED, read_json_object
from worker.job.template import ForkedChild, StageTemplate, runnable_in_place
from worker.lifeline import die_with_parent

POLL_S = 0.2
TAIL_LINES = 40
MAX_LINE = 4096
TAIL_CHARS = 8000  # of an error's own log tail read from the child's error record
DEFAULT_GRACE_S = 60.0


class StopSignal:
    """Why the job must stop (cancelled by the caller, preempted by SIGTERM); thread-safe, first reason wins."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self.reason: str | None = None

    def request(self, reason: str) -> None:
        if not self._event.is_set():
            self.reason = reason
            self._event.set()

    def is_set(self) -> bool:
        return self._event.is_set()

    def wait(self, timeout: float) -> bool:
        return self._event.wait(timeout)

    def check(self, during: str = "before its next stage started") -> None:
        """Cancelled or Preempted (as asked) once a stop was requested."""
        if self.is_set():
            reason = self.reason or "cancelled"
            cls = errors.Preempted if reason == "preempted" else errors.Cancelled
            raise cls(f"the job was {reason} {during}", "submit it again with the same run_id to continue")


class LineRing:
    """The last lines of a byte stream, split on \\n and \\r; an endless line is cut at MAX_LINE."""

    def __init__(self, maxlen: int = 200):
        self.lines: deque[str] = deque(maxlen=maxlen)
        self.partial = b""

    def feed(self, data: bytes) -> None:
        parts = (self.partial + data).replace(b"\r\n", b"\n").replace(b"\r", b"\n").split(b"\n")
        self.partial = parts.pop()[-MAX_LINE:]
        for p in parts:
            if p.strip():
                self.lines.append(p[:MAX_LINE].decode(errors="replace"))

    def tail(self, n: int = TAIL_LINES) -> list[str]:
        last = [self.partial.decode(errors="replace")] if self.partial.strip() else []
        return (list(self.lines) + last)[-n:]


@dataclass
class Stage:
    name: str
    argv: list[str]
    env: dict[str, str]
    log_dir: Path
    time_limit_s: float | None = None
    no_progress_s: float | None = None
    grace_s: float = DEFAULT_GRACE_S
    template: StageTemplate | None = None  # forks the child pre-imported (worker/job/template.py)


@dataclass
class StageRun:
    stage: Stage
    returncode: int | None = None
    stop_reason: str | None = None
    elapsed_s: float = 0.0
    stdout: LineRing = field(default_factory=LineRing)
    stderr: LineRing = field(default_factory=LineRing)
    error_record: dict[str, Any] | None = None
    pid: int | None = None

    def log_tail(self, n: int = TAIL_LINES) -> str:
        return "\n".join((self.stdout.tail(n) + self.stderr.tail(n))[-n:])

    def last_stdout_line(self) -> str:
        tail = self.stdout.tail(1)
        return tail[0] if tail else ""


def _pump(fd: int, log_path: Path, ring: LineRing, redactor: Redactor, touch: Callable[[], None]) -> None:
    stream = StreamRedactor(redactor)
    with open(log_path, "ab", buffering=0) as log:
        while True:
            try:
                chunk = os.read(fd, 65536)
            except OSError:
                chunk = b""
            if not chunk:
                break
            touch()
            clean = stream.feed(chunk)
            log.write(clean)
            ring.feed(clean)
        rest = stream.flush()
        log.write(rest)
        ring.feed(rest)
    os.close(fd)


class EventTail:
    """Reads the complete JSON lines appended to an events file since the last call."""

    def __init__(self, path: Path):
        self.path, self.offset, self.buffer = path, 0, b""

    def read(self) -> list[dict[str, Any]]:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
        except FileNotFoundError:
            return []
        self.offset += len(data)
        lines = (self.buffer + data).split(b"\n")
        self.buffer = lines.pop()
        events = []
        for line in lines:
            try:
                value = json.loads(line)
            except ValueError:
                continue
            if isinstance(value, dict):
                events.append(value)
        return events


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def next_attempt_dir(log_root: Path, name: str) -> Path:
    stage_dir = log_root / name
    stage_dir.mkdir(parents=True, exist_ok=True)
    n = 1 + sum(1 for p in stage_dir.iterdir() if p.name.startswith("attempt-"))
    attempt = stage_dir / f"attempt-{n}"
    attempt.mkdir()
    return attempt


def start_child(stage: Stage, env: dict[str, str], out_w: int, err_w: int) -> subprocess.Popen[bytes] | ForkedChild:
    return start_process(stage.argv, env, stage.template, out_w, err_w)


def start_process(
    argv: list[str], env: Mapping[str, str], template: StageTemplate | None, out_w: int, err_w: int
) -> subprocess.Popen[bytes] | ForkedChild:
    """A child in its own session, dying with us: forked from the stage template when there is
    one that can run the command, else a fresh interpreter."""
    if template is not None and runnable_in_place(argv):
        try:
            return template.spawn(argv, env, out_w, err_w)
        except OSError as e:  # a dead template costs the imports, not the job
            os.write(err_w, f"ftw: stage template unavailable ({e}); starting a fresh process\n".encode())
    return subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=out_w,
        stderr=err_w,
        env=dict(env),
        start_new_session=True,
        close_fds=True,
        preexec_fn=die_with_parent(),
    )


def run_stage(
    stage: Stage, stop: StopSignal, redactor: Redactor, on_event: Callable[[dict[str, Any]], None] = lambda e: None
) -> StageRun:
    """Run the child to its end (or stop it); always returns, with every group member gone."""
    run = StageRun(stage)
    events_path, error_path = stage.log_dir / "events.jsonl", stage.log_dir / "error.json"
    env = {**stage.env, "FTW_EVENTS": str(events_path), "FTW_ERROR_FILE": str(error_path), "PYTHONUNBUFFERED": "1"}
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    start = time.monotonic()
    activity = [start]

    def touch() -> None:
        activity[0] = time.monotonic()

    try:
        proc = start_child(stage, env, out_w, err_w)
    finally:
        os.close(out_w)
        os.close(err_w)
    run.pid = proc.pid
    pumps = [
        threading.Thread(
            target=_pump, args=(out_r, stage.log_dir / "stdout.log", run.stdout, redactor, touch), daemon=True
        ),
        threading.Thread(
            target=_pump, args=(err_r, stage.log_dir / "stderr.log", run.stderr, redactor, touch), daemon=True
        ),
    ]
    for t in pumps:
        t.start()
    tail = EventTail(events_path)
    term_at: float | None = None
    try:
        while proc.poll() is None:
            for event in tail.read():
                touch()
                on_event(event)
            now = time.monotonic()
            if term_at is None:
                if stop.is_set():
                    run.stop_reason = stop.reason
                elif stage.time_limit_s and now - start > stage.time_limit_s:
                    run.stop_reason = "timeout"
                elif stage.no_progress_s and now - activity[0] > stage.no_progress_s:
                    run.stop_reason = "no_progress"
                if run.stop_reason:
                    _signal_group(proc.pid, signal.SIGTERM)
                    term_at = now
            elif now - term_at > stage.grace_s:
                _signal_group(proc.pid, signal.SIGKILL)
            time.sleep(POLL_S)
    finally:
        if proc.poll() is None:  # we are being torn down ourselves: take the group with us
            _signal_group(proc.pid, signal.SIGKILL)
        proc.wait()
        _signal_group(proc.pid, signal.SIGKILL)  # grandchildren left in the group
        for t in pumps:
            t.join(timeout=5)
    for event in tail.read():
        on_event(event)
    run.returncode = proc.returncode
    run.elapsed_s = time.monotonic() - start
    run.error_record = read_json_object(error_path)
    scrub_file(error_path, redactor)
    scrub_file(events_path, redactor)
    return run


def scrub_file(path: Path, redactor: Redactor) -> None:
    """Redact a file a child wrote directly (error record, events): it may quote a secret."""
    try:
        data = path.read_bytes()
    except OSError:
        return
    clean = redactor.bytes(data)
    if clean != data:
        path.write_bytes(clean)


# ---- how a stage ended → the typed failure the caller sees ------------------------------------

ERROR_CLASSES: dict[str, type[errors.FtwError]] = {}


def _register(cls: type[errors.FtwError]) -> None:
    ERROR_CLASSES.setdefault(cls.code, cls)
    for sub in cls.__subclasses__():
        _register(sub)


_register(errors.FtwError)

HINTS = {
    "timeout": "raise limits.{stage}_s in the job, or make the stage smaller (max_steps, fewer rows)",
    "no_progress": "the stage printed nothing and sent no progress for limits.no_progress_s; "
    "look at the log tail — a hung download or collective? — and raise limits.no_progress_s if the wait is expected",
    "cancelled": "the job was cancelled; submit it again with the same run_id to continue from its last checkpoint",
    "preempted": "the worker was stopped by the platform; submit again with the same run_id to resume from the "
    "saved checkpoint",
    "oom": "lower micro_batch_size or sequence_len, turn on gradient_checkpointing, or use a GPU with more memory",
    "nccl": "a collective between GPUs failed; resubmit (it resumes from the last checkpoint); if it repeats, "
    "try fewer GPUs",
    "crash": "the process died without reporting an error; resubmit with the same run_id to resume; "
    "if it repeats, the log tail says where (a kill -9 or the kernel's out-of-memory killer leave no trace of "
    "their own)",
}


def stage_failure(run: StageRun) -> errors.FtwError | None:
    """None when the stage succeeded; otherwise the error that says what happened and what to do."""
    name, rc, tail = run.stage.name, run.returncode, run.log_tail()
    if rc == 0 and run.stop_reason is None:
        return None
    common = {"stage": name, "log_tail": tail}
    details = {"exit_code": rc, "log_dir": str(run.stage.log_dir), "elapsed_s": round(run.elapsed_s, 1)}
    if run.stop_reason == "cancelled":
        return errors.Cancelled(f"{name} was cancelled", HINTS["cancelled"], details=details, **common)
    if run.stop_reason == "preempted" or rc == EXIT_PREEMPTED:
        return errors.Preempted(
            f"{name} was stopped by SIGTERM (preemption) after saving", HINTS["preempted"], details=details, **common
        )
    if run.stop_reason == "timeout":
        return errors.StageTimeout(
            f"{name} ran past its time limit of {run.stage.time_limit_s:.0f} s",
            HINTS["timeout"].format(stage=name),
            details=details,
            **common,
        )
    if run.stop_reason == "no_progress":
        return errors.NoProgress(
            f"{name} made no progress for {run.stage.no_progress_s:.0f} s and was stopped",
            HINTS["no_progress"],
            details=details,
            **common,
        )
    record = run.error_record
    if record and record.get("code") and record.get("code") != "crash":
        cls = ERROR_CLASSES.get(record["code"], errors.FtwError)
        message, hint = (
            clip(str(record.get("message") or f"{name} failed"), MAX_MESSAGE),
            clip(str(record.get("hint") or HINTS.get(cls.code, "")), MAX_MESSAGE),
        )
        own_tail = record.get("log_tail")  # the error's own log (e.g. the vLLM engine's) says more than the child's
        if isinstance(own_tail, str) and own_tail.strip():
            common["log_tail"] = own_tail[-TAIL_CHARS:]
        return cls(message, hint, details={**details, **(record.get("details") or {})}, **common)
    lowered = tail.lower()
    if "out of memory" in lowered or "outofmemoryerror" in lowered:
        return errors.OutOfMemory(f"{name} ran out of GPU memory", HINTS["oom"], details=details, **common)
    if "nccl" in lowered and ("error" in lowered or "timeout" in lowered):
        return errors.DistributedError(
            f"{name}: a distributed (NCCL) operation failed", HINTS["nccl"], details=details, **common
        )
    if rc is not None and rc < 0:
        signame = signal.Signals(-rc).name if -rc in signal.Signals._value2member_map_ else f"signal {-rc}"
        return errors.ChildCrash(
            f"{name} was killed by {signame}", HINTS["crash"], details={**details, "signal": signame}, **common
        )
    message = clip(str((record or {}).get("message") or f"{name} exited with code {rc}"), MAX_MESSAGE)
    return errors.ChildCrash(f"{name} crashed: {message}", HINTS["crash"], details=details, **common)
