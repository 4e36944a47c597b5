"""The run folder of one job: BASE_VOLUME/runs/<run_id>, made safe before anything is written.

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
from typing import Any

from worker.errors import InfraError, RunInUse

LOCK_NAME = ".lock"
STATE_NAME = "state.json"
CONFIG_NAME = "config.json"


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


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


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
    os.pwrite(
        fd,
        f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}".encode(),
        0,
    )
    return fd


def open_run_dir(base: Path, run_id: str) -> RunDir:
    """Create (or reopen, for a resumed run) and lock the run folder."""
    base = base.resolve()
    runs = base / "runs"
    if runs.is_symlink():
        raise InfraError(
            f"{runs} is a symlink to {runs.resolve()}",
            "ftw only writes inside BASE_VOLUME; replace the link with a folder",
        )
    path = resolve_run_dir(base, run_id)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise volume_error(f"cannot create the run folder {path}", path, e) from e
    probe_writable(path)
    run = RunDir(run_id=run_id, path=path, base=base, lock_fd=_lock(path, run_id))
    run.state = read_json(path / STATE_NAME) or {"run_id": run_id}
    (path / "logs").mkdir(exist_ok=True)
    return run
