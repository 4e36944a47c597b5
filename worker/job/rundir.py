"""The run folder of one job, made safe before anything is written, and the one rule of reusing it.

A job's folder is BASE_VOLUME/runs/<run_id>; `ftw train`'s is a folder of the user's (`RunFolder`).
`open_run_dir` resolves the path (symlinks included) and refuses one that leaves BASE_VOLUME,
creates it, takes an exclusive lock (a second job with the same run_id at the same time fails
instead of sharing the folder), and proves the volume writable (create, fsync, delete). The lock
is held until `RunDir.close()`. `state.json` records which stages finished, so a resubmitted
run_id skips them. Files are written to a temporary name and renamed, never through a symlink.
"""

from __future__ import annotations

import fcntl
import json
import os
import secrets
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from worker.errors import InfraError, JobSpecError, RunInUse
from worker.events import read_json_object

LOCK_NAME = ".lock"
STATE_NAME = "state.json"
CONFIG_NAME = "config.json"
JOB_NAME = "job.json"
# what a run folder holds once training has saved anything
TRAINING_RESULTS = ("checkpoints", "adapter", "model", "summary.json")
Claim = Literal["job", "training"]
# how a refusal names what changed, by what claims the folder
CHANGED = {
    "job": "{label} exists with a different training config (changed: {keys})",
    "training": "{label} holds training of a different config (changed: {keys})",
}


def inside(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def resolve_run_dir(base: Path, run_id: str) -> Path:
    """BASE_VOLUME/runs/<run_id>, resolved; an InfraError if a symlink would lead it outside."""
    base = base.resolve()
    if "\x00" in run_id or "/" in run_id or run_id in ("", ".", ".."):
        raise InfraError(f"run_id {run_id!r} cannot name a folder", "use letters, digits, '.', '_' and '-' only")
    candidate = (base / "runs" / run_id).resolve()
    if not inside(candidate, base / "runs") or candidate.parent != (base / "runs").resolve():
        raise InfraError(
            f"run folder {base / 'runs' / run_id} resolves to {candidate}, outside {base / 'runs'}",
            "a symlink under BASE_VOLUME points elsewhere; remove it (ftw only writes inside BASE_VOLUME)",
            details={"base_volume": str(base), "resolved": str(candidate)},
        )
    return candidate


def probe_writable(folder: Path) -> None:
    """Create, fsync and delete a file: a read-only or full volume fails here, not mid-training."""
    probe = folder / f".ftw-probe-{os.getpid()}-{secrets.token_hex(4)}"  # jobs in threads of one process: one each
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        try:
            os.write(fd, b"ftw writability probe\n")
            os.fsync(fd)
        finally:
            os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise volume_error(f"the volume at {folder} is not writable", folder, e) from e


def volume_error(what: str, path: Path, e: OSError) -> InfraError:
    return InfraError(
        f"{what} ({e.strerror or e})",
        "attach a writable network volume (BASE_VOLUME) or check its permissions and free space",
        details={"path": str(path), "errno": e.errno},
    )


def write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, default=str)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def changed_keys(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """The top-level keys whose values differ: a run folder continues only with the config that made it."""
    return sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))


@dataclass(frozen=True)
class RunFolder:
    """Where a run lives, and from when it belongs to one training config.

    A job's folder (`claimed_by="job"`) is named by its run_id and is its config's from the first
    submission on (job.json). `ftw train`'s (`claimed_by="training"`) is any folder the user names
    and becomes a config's once training saved something there: a failed preprocess leaves it free,
    and nothing is written into it before the checks pass."""

    run_id: str
    path: Path  # resolved
    base: Path  # BASE_VOLUME: the prepared-data cache and the disk check
    claimed_by: Claim
    label: str  # how messages name it: "run 'x'" or "run folder /p"
    elsewhere: str  # what to do to start another run instead

    @classmethod
    def of_job(cls, base: Path, run_id: str) -> RunFolder:
        return cls(
            run_id,
            resolve_run_dir(base, run_id),
            base.resolve(),
            "job",
            f"run {run_id!r}",
            "use a new run_id for the new config",
        )

    @classmethod
    def of_user(cls, path: Path, base: Path, run_id: str) -> RunFolder:
        path = path.expanduser().resolve()
        return cls(
            run_id,
            path,
            base.resolve(),
            "training",
            f"run folder {path}",
            "pass --run-dir with a new folder (or set output_dir) for this config",
        )

    def claimed(self) -> bool:
        if self.claimed_by == "job":
            return (self.path / JOB_NAME).exists()
        return any((self.path / name).exists() for name in TRAINING_RESULTS)

    def recorded_config(self) -> dict[str, Any] | None:
        """The training config the folder's run used (config.json, as its children read it; job.json's
        when a crash left none), without output_dir, which names the folder rather than the training."""
        config = read_json_object(self.path / CONFIG_NAME) or (read_json_object(self.path / JOB_NAME) or {}).get(
            "config"
        )
        return training_keys(config) if isinstance(config, dict) else None

    def state(self) -> dict[str, Any]:
        """state.json as it is now (read without the lock)."""
        return read_json_object(self.path / STATE_NAME) or {}

    def completed_result(self, config: dict[str, Any]) -> dict[str, Any] | None:
        """result.json of a run that completed with `config` here (None otherwise)."""
        result = read_json_object(self.path / "result.json")
        if not result or result.get("status") != "completed" or not self.claimed() or self.refusal(config):
            return None
        return result

    def refusal(self, config: dict[str, Any], resume: bool = True) -> JobSpecError | None:
        """Why this folder cannot take a run of `config` (None when it can): once claimed, a folder
        continues only with the config that made it, and only when the job asks to resume."""
        if not resume and self.state().get("stages"):
            return JobSpecError(
                f"{self.label} already has results and the job says resume: false",
                "submit with resume: true to continue it, or with a new run_id to start over (nothing is deleted)",
                stage="run_dir",
            )
        if not self.claimed():
            return None
        old = self.recorded_config()
        if old is None:
            return JobSpecError(
                f"{self.label} holds results but no readable {CONFIG_NAME}, so ftw cannot tell which config made them",
                f"{self.elsewhere} (nothing is deleted)",
                stage="run_dir",
            )
        changed = changed_keys(old, training_keys(config))
        if not changed:
            return None
        return JobSpecError(
            CHANGED[self.claimed_by].format(label=self.label, keys=", ".join(changed)),
            f"use the original config again to resume it, or {self.elsewhere}; nothing was started or deleted",
            stage="run_dir",
            details={"changed_keys": changed},
        )


def training_keys(config: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in config.items() if k != "output_dir"}


@dataclass
class RunDir:
    run_id: str
    path: Path
    base: Path
    lock_fd: int | None = None
    state: dict[str, Any] = field(default_factory=dict)

    @property
    def logs(self) -> Path:
        return self.path / "logs"

    def stage_done(self, stage: str) -> dict[str, Any] | None:
        return (self.state.get("stages") or {}).get(stage)

    def mark_done(self, stage: str, record: dict[str, Any]) -> None:
        self.state.setdefault("stages", {})[stage] = {**record, "finished_at": round(time.time(), 3)}
        write_json_atomic(self.path / STATE_NAME, self.state)

    def forget(self, stage: str) -> None:
        if (self.state.get("stages") or {}).pop(stage, None) is not None:
            write_json_atomic(self.path / STATE_NAME, self.state)

    def write_job(self, public_job: dict[str, Any]) -> Path:
        """job.json (the job without credentials, secrets masked) and config.json, the children's
        config, with output_dir pinned to this folder; config.json's path."""
        write_json_atomic(self.path / JOB_NAME, public_job)
        path = self.path / CONFIG_NAME
        write_json_atomic(path, {**public_job["config"], "output_dir": str(self.path)})
        return path

    def close(self) -> None:
        if self.lock_fd is not None:
            fcntl.flock(self.lock_fd, fcntl.LOCK_UN)
            os.close(self.lock_fd)
            self.lock_fd = None


def _lock(path: Path, run_id: str) -> int:
    fd = os.open(path / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 512, 0).decode(errors="replace").strip()
        os.close(fd)
        raise RunInUse(
            f"run {run_id!r} is being run by another job right now ({holder or 'holder unknown'})",
            "wait for that job to finish, cancel it, or submit with a different run_id",
            details={"holder": holder},
        ) from None
    os.ftruncate(fd, 0)
    since = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} since {since}".encode(), 0)
    return fd


def open_run_dir(base: Path, run_id: str) -> RunDir:
    """Create (or reopen, for a resumed run) and lock a job's run folder."""
    return open_folder(RunFolder.of_job(base, run_id))


def open_folder(folder: RunFolder) -> RunDir:
    """Create (or reopen, for a resumed run) and lock the run folder."""
    base, path, run_id = folder.base, folder.path, folder.run_id
    runs = base / "runs"
    if folder.claimed_by == "job" and runs.is_symlink():
        raise InfraError(
            f"{runs} is a symlink to {runs.resolve()}",
            "ftw only writes inside BASE_VOLUME; replace the link with a folder",
        )
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise volume_error(f"cannot create the run folder {path}", path, e) from e
    probe_writable(path)
    run = RunDir(run_id=run_id, path=path, base=base, lock_fd=_lock(path, run_id))
    run.state = read_json_object(path / STATE_NAME) or {"run_id": run_id}
    (path / "logs").mkdir(exist_ok=True)
    return run
