"""The job store's SQLite plumbing (tables, opening and upgrading the file, transactions), apart from its job logic."""

from __future__ import annotations

import json
import os
import sqlite3
from pathlib import Path
from typing import Any

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    status TEXT NOT NULL,
    payload TEXT NOT NULL,            -- what the worker receives besides the id: input, s3Config
    webhook TEXT,
    execution_timeout_ms INTEGER NOT NULL,
    ttl_ms INTEGER NOT NULL,
    created_at REAL NOT NULL,         -- the ttl clock starts here (reset by /retry)
    queued_at REAL NOT NULL,          -- queue order
    started_at REAL,
    finished_at REAL,
    worker_id TEXT,
    output TEXT,                      -- JSON of the handler's output (or last progress update)
    error TEXT,
    retries INTEGER NOT NULL DEFAULT 0,
    stop_pending INTEGER NOT NULL DEFAULT 0,  -- the worker must stop this job and has not confirmed it
    stop_sent_at REAL,                        -- last time the stop channel carried it
    stream_read INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS jobs_by_status ON jobs (status, queued_at);
CREATE TABLE IF NOT EXISTS stream (
    job_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    output TEXT NOT NULL,
    PRIMARY KEY (job_id, seq)
);
CREATE TABLE IF NOT EXISTS webhooks (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id TEXT NOT NULL,
    url TEXT NOT NULL,
    body TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_at REAL NOT NULL,
    state TEXT NOT NULL DEFAULT 'pending'   -- pending | delivered | failed
);
CREATE TABLE IF NOT EXISTS workers (
    id TEXT PRIMARY KEY,
    last_seen REAL NOT NULL,          -- any request: job-take, job-stop, results, ping
    last_ping REAL,                   -- heartbeats only (a separate process: alive while a sync handler blocks)
    job_ids TEXT NOT NULL DEFAULT ''
);
"""

# jobs columns added after the first release, with their declarations: added to older files on open
ADDED_COLUMNS = {"stop_sent_at": "REAL"}


def open_database(path: str | os.PathLike[str]) -> sqlite3.Connection:
    """The file at `path` with this version's tables, created mode 0600: job inputs may hold secrets."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        path.touch(mode=0o600)
    db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
    db.row_factory = sqlite3.Row
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: a crash of the process loses nothing
    db.execute("PRAGMA secure_delete=ON")  # a removed secret is zeroed, not left in a page's free space
    db.executescript(SCHEMA)
    columns = {row[1] for row in db.execute("PRAGMA table_info(jobs)")}
    for name, decl in ADDED_COLUMNS.items():  # a file an older ftw endpoint wrote
        if name not in columns:
            db.execute(f"ALTER TABLE jobs ADD COLUMN {name} {decl}")
    return db


def checkpoint(db: sqlite3.Connection) -> None:
    """Copy the WAL into the file and empty it: the frames still holding a removed secret go."""
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")


def from_json(text: str | None) -> Any:
    return None if text is None else json.loads(text)


def to_json(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


class Transaction:
    """BEGIN IMMEDIATE … COMMIT; nested uses join the outer transaction."""

    def __init__(self, db: sqlite3.Connection):
        self.db = db
        self.outer = False

    def __enter__(self):
        if not self.db.in_transaction:
            self.db.execute("BEGIN IMMEDIATE")
            self.outer = True
        return self

    def __exit__(self, exc_type, *_):
        if self.outer:
            self.db.execute("COMMIT" if exc_type is None else "ROLLBACK")
        return False
