"""The job store of the local endpoint: one SQLite file, every state change one transaction.

Jobs move IN_QUEUE → IN_PROGRESS → COMPLETED | FAILED | CANCELLED | TIMED_OUT (and back to
IN_QUEUE on /retry). A terminal transition enqueues the job's webhook in the same transaction, so
a restart of the endpoint loses neither a job, its stream, nor a webhook still owed. Stop signals
for the worker (cancel, timeout) are a flag on the job, repeated on the stop channel until the
worker confirms it runs nothing (the SDK loses a stop that arrives before the job's task exists).

The file holds job inputs, which may carry `s3Config` or job credentials: it is created mode 0600
and nothing here logs an input. They stay only while the worker may still take the job: a terminal
transition replaces them by their key names (`removedSecrets`), with SQLite's secure_delete on and
a WAL checkpoint after, so no old copy lingers in the file, its free space or the -wal file. A job
that carried them cannot be retried (the secrets are gone); it is submitted again, with them.
All methods are synchronous and meant to be called from one thread (the server's event loop);
each is a handful of indexed statements.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
import uuid
from dataclasses import dataclass
from typing import Any

from worker.devtools.endpoint.database import Transaction, checkpoint, from_json, open_database, to_json
from worker.devtools.endpoint.scrub import REMOVED_SECRETS, RESUBMIT_WITH_SECRETS, has_secrets, without_secrets

IN_QUEUE, IN_PROGRESS = "IN_QUEUE", "IN_PROGRESS"
COMPLETED, FAILED, CANCELLED, TIMED_OUT = "COMPLETED", "FAILED", "CANCELLED", "TIMED_OUT"
TERMINAL = frozenset({COMPLETED, FAILED, CANCELLED, TIMED_OUT})
RETRYABLE = frozenset({FAILED, TIMED_OUT})
# The SDK drops a stop for a job whose task it has not created yet (a cancel right after job-take),
# so a stop is repeated until the worker confirms it (job-take with job_in_progress=0) or gives up.
STOP_REPEAT_S = 2.0
STOP_GIVE_UP_S = 60.0


@dataclass(frozen=True)
class Job:
    id: str
    status: str
    payload: dict[str, Any]
    webhook: str | None
    execution_timeout_ms: int
    ttl_ms: int
    created_at: float
    started_at: float | None
    finished_at: float | None
    worker_id: str | None
    output: Any
    error: str | None
    retries: int

    def work_item(self) -> dict[str, Any]:
        """The job as the runpod worker SDK receives it from job-take."""
        return {"id": self.id, **self.payload}

    @property
    def removed_secrets(self) -> dict[str, list[str]]:
        """Which secrets the job carried and the store deleted when it ended: {where: key names}."""
        return self.payload.get(REMOVED_SECRETS) or {}

    def status_body(self) -> dict[str, Any]:
        """The /status response, as RunPod shapes it (times in ms)."""
        body: dict[str, Any] = {"id": self.id, "status": self.status}
        if self.started_at is not None:
            body["delayTime"] = int((self.started_at - self.created_at) * 1000)
            body["workerId"] = self.worker_id
        if self.finished_at is not None and self.started_at is not None:
            body["executionTime"] = int((self.finished_at - self.started_at) * 1000)
        if self.output is not None:
            body["output"] = self.output
        if self.error is not None:
            body["error"] = self.error
        if self.retries:
            body["retries"] = self.retries
        return body


class JobStore:
    def __init__(self, path: str | os.PathLike[str]):
        self.db = open_database(path)
        self._remove_ended_jobs_secrets()  # a file an older ftw endpoint wrote kept them

    def close(self) -> None:
        self.db.close()

    def _tx(self) -> Transaction:
        return Transaction(self.db)

    # ---- reads -------------------------------------------------------------------------------
    def get(self, job_id: str) -> Job | None:
        row = self.db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None:
            return None
        return Job(
            id=row["id"],
            status=row["status"],
            payload=json.loads(row["payload"]),
            webhook=row["webhook"],
            execution_timeout_ms=row["execution_timeout_ms"],
            ttl_ms=row["ttl_ms"],
            created_at=row["created_at"],
            started_at=row["started_at"],
            finished_at=row["finished_at"],
            worker_id=row["worker_id"],
            output=from_json(row["output"]),
            error=row["error"],
            retries=row["retries"],
        )

    def counts(self) -> dict[str, int]:
        rows = self.db.execute("SELECT status, COUNT(*) AS n FROM jobs GROUP BY status").fetchall()
        by = {r["status"]: r["n"] for r in rows}
        retried = self.db.execute("SELECT COUNT(*) FROM jobs WHERE retries > 0").fetchone()[0]
        return {
            "completed": by.get(COMPLETED, 0),
            "failed": by.get(FAILED, 0) + by.get(TIMED_OUT, 0),
            "cancelled": by.get(CANCELLED, 0),
            "inProgress": by.get(IN_PROGRESS, 0),
            "inQueue": by.get(IN_QUEUE, 0),
            "retried": retried,
        }

    def workers(self, alive_after: float) -> dict[str, int]:
        """Workers heard from since `alive_after`: running when they hold a job, or their heartbeat says
        they still run one (a job the endpoint already ended on a timeout, in a handler that never returned)."""
        rows = self.db.execute(
            "SELECT id, last_ping, job_ids FROM workers WHERE last_seen >= ?", (alive_after,)
        ).fetchall()
        busy = {r["worker_id"] for r in self.db.execute("SELECT worker_id FROM jobs WHERE status = ?", (IN_PROGRESS,))}
        running = sum(1 for r in rows if r["id"] in busy or (r["job_ids"] and (r["last_ping"] or 0) >= alive_after))
        return {"idle": len(rows) - running, "running": running}

    def read_stream(self, job_id: str) -> list[Any]:
        """Stream items not yet read (RunPod's /stream hands each item out once)."""
        with self._tx():
            cursor = self.db.execute("SELECT stream_read FROM jobs WHERE id = ?", (job_id,)).fetchone()[0]
            rows = self.db.execute(
                "SELECT seq, output FROM stream WHERE job_id = ? AND seq > ? ORDER BY seq", (job_id, cursor)
            ).fetchall()
            if rows:
                self.db.execute("UPDATE jobs SET stream_read = ? WHERE id = ?", (rows[-1]["seq"], job_id))
        return [json.loads(r["output"]) for r in rows]

    # ---- client side -------------------------------------------------------------------------
    def create(
        self, payload: dict[str, Any], webhook: str | None, execution_timeout_ms: int, ttl_ms: int, id_prefix: str = ""
    ) -> Job:
        job_id = f"{id_prefix}{uuid.uuid4()}"
        now = time.time()
        self.db.execute(
            "INSERT INTO jobs (id, status, payload, webhook, execution_timeout_ms, ttl_ms, created_at, queued_at)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (job_id, IN_QUEUE, to_json(payload), webhook, execution_timeout_ms, ttl_ms, now, now),
        )
        return self.get(job_id)  # type: ignore[return-value]

    def cancel(self, job_id: str, reason: str = "cancelled by the client") -> Job | None:
        job = self.get(job_id)
        if job is not None and job.status not in TERMINAL:
            self._terminate(job, CANCELLED, error=reason)
        return self.get(job_id)

    def retry(self, job_id: str) -> Job:
        job = self.get(job_id)
        assert job is not None and job.status in RETRYABLE
        now = time.time()
        with self._tx():
            self.db.execute("DELETE FROM stream WHERE job_id = ?", (job_id,))
            self.db.execute(
                "UPDATE jobs SET status = ?, created_at = ?, queued_at = ?, started_at = NULL, finished_at = NULL,"
                " worker_id = NULL, output = NULL, error = NULL, stop_pending = 0, stop_sent_at = NULL,"
                " stream_read = 0,"
                " retries = retries + 1 WHERE id = ?",
                (IN_QUEUE, now, now, job_id),
            )
        return self.get(job_id)  # type: ignore[return-value]

    def purge_queue(self) -> int:
        ids = [r["id"] for r in self.db.execute("SELECT id FROM jobs WHERE status = ?", (IN_QUEUE,))]
        for job_id in ids:
            self.cancel(job_id, reason="removed from the queue by /purge-queue")
        return len(ids)

    # ---- worker side -------------------------------------------------------------------------
    def seen(self, worker_id: str) -> None:
        self.db.execute(
            "INSERT INTO workers (id, last_seen) VALUES (?, ?)"
            " ON CONFLICT(id) DO UPDATE SET last_seen = excluded.last_seen",
            (worker_id, time.time()),
        )

    def pinged(self, worker_id: str, job_ids: str) -> None:
        now = time.time()
        self.db.execute(
            "INSERT INTO workers (id, last_seen, last_ping, job_ids) VALUES (?, ?, ?, ?)"
            " ON CONFLICT(id) DO UPDATE SET last_seen = excluded.last_seen, last_ping = excluded.last_ping,"
            " job_ids = excluded.job_ids",
            (worker_id, now, now, job_ids),
        )

    def take(self, worker_id: str, count: int) -> list[Job]:
        now = time.time()
        with self._tx():
            rows = self.db.execute(
                "SELECT id FROM jobs WHERE status = ? ORDER BY queued_at LIMIT ?", (IN_QUEUE, count)
            ).fetchall()
            for r in rows:
                self.db.execute(
                    "UPDATE jobs SET status = ?, worker_id = ?, started_at = ? WHERE id = ?",
                    (IN_PROGRESS, worker_id, now, r["id"]),
                )
        return [self.get(r["id"]) for r in rows]  # type: ignore[misc]

    def owned_in_progress(self, job_id: str, worker_id: str) -> Job | None:
        job = self.get(job_id)
        if job is None or job.status != IN_PROGRESS or job.worker_id != worker_id:
            return None
        return job

    def append_stream(self, job_id: str, output: Any) -> None:
        with self._tx():
            last = self.db.execute("SELECT COALESCE(MAX(seq), 0) FROM stream WHERE job_id = ?", (job_id,)).fetchone()[0]
            self.db.execute(
                "INSERT INTO stream (job_id, seq, output) VALUES (?, ?, ?)", (job_id, last + 1, to_json(output))
            )

    def set_progress(self, job_id: str, output: Any) -> None:
        """`progress_update`: the output of /status while in progress (RunPod does not stream it)."""
        self.db.execute("UPDATE jobs SET output = ? WHERE id = ?", (to_json(output), job_id))

    def finish(self, job: Job, output: Any, error: str | None) -> Job:
        status = FAILED if error else COMPLETED
        self._terminate(job, status, output=output, error=error, replace_output=True)
        return self.get(job.id)  # type: ignore[return-value]

    def stop_signals(self, worker_id: str, now: float) -> list[str]:
        """Jobs the worker must stop, each repeated every STOP_REPEAT_S until confirmed."""
        with self._tx():
            ids = [
                r["id"]
                for r in self.db.execute(
                    "SELECT id FROM jobs WHERE worker_id = ? AND stop_pending = 1"
                    " AND (stop_sent_at IS NULL OR stop_sent_at <= ?)",
                    (worker_id, now - STOP_REPEAT_S),
                )
            ]
            for job_id in ids:
                self.db.execute("UPDATE jobs SET stop_sent_at = ? WHERE id = ?", (now, job_id))
        return ids

    def has_stop_signal(self, worker_id: str, now: float) -> bool:
        row = self.db.execute(
            "SELECT 1 FROM jobs WHERE worker_id = ? AND stop_pending = 1"
            " AND (stop_sent_at IS NULL OR stop_sent_at <= ?) LIMIT 1",
            (worker_id, now - STOP_REPEAT_S),
        )
        return row.fetchone() is not None

    def worker_idle(self, worker_id: str) -> None:
        """The worker says it runs no job: every stop it was sent has taken effect."""
        with self._tx():
            self.db.execute("UPDATE jobs SET stop_pending = 0 WHERE worker_id = ? AND stop_pending = 1", (worker_id,))
            self.db.execute("UPDATE workers SET job_ids = '' WHERE id = ?", (worker_id,))

    def stop_unconfirmed(self, job_id: str) -> bool:
        return self.db.execute("SELECT stop_pending FROM jobs WHERE id = ?", (job_id,)).fetchone()[0] == 1

    # ---- the clock ---------------------------------------------------------------------------
    def expire(self, now: float, worker_lost_s: float) -> list[str]:
        """Enforce executionTimeout and ttl, and fail jobs whose worker went silent."""
        self.db.execute(
            "UPDATE jobs SET stop_pending = 0 WHERE stop_pending = 1 AND finished_at < ?", (now - STOP_GIVE_UP_S,)
        )
        changed = []
        rows = self.db.execute(
            "SELECT j.id, j.status, j.created_at, j.started_at, j.execution_timeout_ms, j.ttl_ms, w.last_ping"
            " FROM jobs j LEFT JOIN workers w ON w.id = j.worker_id WHERE j.status IN (?, ?) AND ("
            " ? > j.created_at + j.ttl_ms / 1000.0 OR (j.status = ? AND ("
            "  ? > j.started_at + j.execution_timeout_ms / 1000.0 OR ? > w.last_ping + ?)))",
            (IN_QUEUE, IN_PROGRESS, now, IN_PROGRESS, now, now, worker_lost_s),
        ).fetchall()
        for r in rows:
            job = self.get(r["id"])
            if job is None:
                continue
            if now > r["created_at"] + r["ttl_ms"] / 1000:
                status, reason = (
                    TIMED_OUT,
                    (
                        f"the job's ttl of {r['ttl_ms']} ms (policy.ttl, counted from submission) expired while it was "
                        f"{r['status']}; submit with a larger policy.ttl"
                    ),
                )
            elif r["status"] == IN_PROGRESS and now > r["started_at"] + r["execution_timeout_ms"] / 1000:
                status, reason = (
                    TIMED_OUT,
                    (
                        f"the job ran longer than its executionTimeout of {r['execution_timeout_ms']} ms "
                        "(policy.executionTimeout); submit with a larger one for long fine-tuning runs"
                    ),
                )
            elif r["status"] == IN_PROGRESS and r["last_ping"] is not None and now > r["last_ping"] + worker_lost_s:
                again = (
                    RESUBMIT_WITH_SECRETS if has_secrets(job.payload) else f"POST /retry/{job.id} runs the job again"
                )
                status, reason = (
                    FAILED,
                    (
                        f"the worker running this job sent no heartbeat for {worker_lost_s:.0f} s (it died or lost its "
                        f"network); {again}"
                    ),
                )
            else:
                continue
            self._terminate(job, status, error=reason)
            changed.append(job.id)
        return changed

    def refresh_workers(self) -> None:
        """After an endpoint restart, give every worker a fresh grace period before it counts as lost."""
        self.db.execute(
            "UPDATE workers SET last_seen = ?, last_ping = CASE WHEN last_ping IS NULL THEN NULL ELSE ? END",
            (time.time(), time.time()),
        )

    # ---- webhooks ----------------------------------------------------------------------------
    def due_webhooks(self, now: float) -> list[sqlite3.Row]:
        return self.db.execute(
            "SELECT * FROM webhooks WHERE state = 'pending' AND next_at <= ? ORDER BY id", (now,)
        ).fetchall()

    def webhook_attempted(self, hook_id: int, delivered: bool, attempts_allowed: int, retry_delay_s: float) -> None:
        row = self.db.execute("SELECT attempts FROM webhooks WHERE id = ?", (hook_id,)).fetchone()
        attempts = row["attempts"] + 1
        state = "delivered" if delivered else ("failed" if attempts >= attempts_allowed else "pending")
        self.db.execute(
            "UPDATE webhooks SET attempts = ?, state = ?, next_at = ? WHERE id = ?",
            (attempts, state, time.time() + retry_delay_s, hook_id),
        )

    def webhooks_of(self, job_id: str) -> list[dict[str, Any]]:
        rows = self.db.execute("SELECT url, attempts, state FROM webhooks WHERE job_id = ? ORDER BY id", (job_id,))
        return [dict(r) for r in rows]

    # ---- internals ---------------------------------------------------------------------------
    def _terminate(
        self, job: Job, status: str, output: Any = None, error: str | None = None, replace_output: bool = False
    ) -> None:
        """The worker's own result replaces the last progress update; a cancel or timeout keeps it."""
        now = time.time()
        stop = job.status == IN_PROGRESS and status in (CANCELLED, TIMED_OUT)
        payload = without_secrets(job.payload)
        with self._tx():
            self.db.execute(
                "UPDATE jobs SET status = ?, finished_at = ?, output = CASE WHEN ? THEN ? ELSE output END,"
                " error = ?, stop_pending = ?, payload = ? WHERE id = ?",
                (
                    status,
                    now,
                    replace_output,
                    None if output is None else to_json(output),
                    error,
                    int(stop),
                    to_json(payload),
                    job.id,
                ),
            )
            if job.webhook:
                body = self.get(job.id).status_body()  # type: ignore[union-attr]
                self.db.execute(
                    "INSERT INTO webhooks (job_id, url, body, next_at) VALUES (?, ?, ?, ?)",
                    (job.id, job.webhook, to_json(body), now),
                )
        if payload != job.payload:
            checkpoint(self.db)

    def _remove_ended_jobs_secrets(self) -> None:
        rows = self.db.execute(
            f"SELECT id, payload FROM jobs WHERE status IN ({','.join('?' * len(TERMINAL))})"
            " AND (payload LIKE '%\"s3Config\"%' OR payload LIKE '%\"credentials\"%')",
            tuple(TERMINAL),
        ).fetchall()
        changed = False
        for row in rows:
            payload = json.loads(row["payload"])
            if (clean := without_secrets(payload)) != payload:
                self.db.execute("UPDATE jobs SET payload = ? WHERE id = ?", (to_json(clean), row["id"]))
                changed = True
        if changed:
            checkpoint(self.db)
